"""Per-image statistics and the reference profile written beside an exported model."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import asdict
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from visionops.data.transforms import PreprocessSpec, normalize
from visionops.errors import DataError, ModelError
from visionops.monitor.reference import (
    EMBEDDINGS_FILE,
    REFERENCE_FILE,
    ReferenceStore,
    build_reference_profile,
    load_reference,
    open_onnx,
    resolve_reference,
)
from visionops.monitor.stats import (
    LOGGED_STATS,
    image_statistics,
    logged_statistics,
    stroke_thickness,
    thumbnail_base64,
)
from visionops.serve.predlog import input_statistics

SPEC = PreprocessSpec(image_size=28, channels=1, mean=(0.13,), std=(0.31,))
CLASSES = ["a", "b", "c"]


def tiny_onnx(folder: Path, seed: int = 0) -> Path:
    """model.onnx (input -> flatten -> 6-d ReLU embedding -> softmax over 3) + metadata."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    w1 = numpy_helper.from_array(rng.normal(0, 0.05, (784, 6)).astype(np.float32), "w1")
    w2 = numpy_helper.from_array(rng.normal(0, 1.0, (6, 3)).astype(np.float32), "w2")
    nodes = [
        helper.make_node("Flatten", ["input"], ["flat"], axis=1),
        helper.make_node("MatMul", ["flat", "w1"], ["hidden"]),
        helper.make_node("Relu", ["hidden"], ["embedding"]),
        helper.make_node("MatMul", ["embedding", "w2"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 1, 28, 28])],
        [
            helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", 3]),
            helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["N", 6]),
        ],
        [w1, w2],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    folder.mkdir(parents=True, exist_ok=True)
    onnx.save(model, folder / "model.onnx")
    meta = {"name": "tiny", "classes": CLASSES, "preprocess": SPEC.to_dict()}
    (folder / "metadata.json").write_text(json.dumps(meta))
    return folder


def digits(n: int, seed: int = 0) -> np.ndarray:
    """uint8 (n, 28, 28, 1) images of bars of random size, position and brightness."""
    rng = np.random.default_rng(seed)
    x = np.zeros((n, 28, 28, 1), np.uint8)
    for i in range(n):
        top, left = rng.integers(2, 10), rng.integers(4, 18)
        x[i, top : top + rng.integers(8, 18), left : left + rng.integers(1, 6), 0] = rng.integers(
            120, 256
        )
    return x


# --------------------------------------------------------------------------- statistics


def test_logged_statistics_equal_the_servers_input_statistics() -> None:
    rng = np.random.default_rng(0)
    images = np.concatenate(
        [
            digits(40)[..., 0],
            rng.integers(0, 256, (5, 28, 28), dtype=np.uint8),
            np.zeros((1, 28, 28), np.uint8),
            np.full((1, 28, 28), 255, np.uint8),
        ]
    )
    batch = logged_statistics(images)
    for i, img in enumerate(images):
        expected = asdict(input_statistics(img))
        for name in LOGGED_STATS:
            assert batch[name][i] == pytest.approx(expected[name], abs=1e-6), (i, name)
    rgb = rng.integers(0, 256, (3, 10, 12, 3), dtype=np.uint8)
    assert logged_statistics(rgb)["center_x"][2] == pytest.approx(
        input_statistics(rgb[2]).center_x, abs=1e-6
    )


def test_stroke_thickness_of_known_bars() -> None:
    bars = np.zeros((6, 28, 28), np.uint8)
    for w in range(1, 6):
        bars[w - 1, 4:24, 10 : 10 + w] = 255
    # bars[5] stays blank
    assert list(stroke_thickness(bars)) == [1.5, 1.5, 3.5, 3.5, 5.5, 0.0]
    faint = np.full((1, 28, 28), 100, np.uint8)  # below the ink threshold: no strokes
    assert stroke_thickness(faint)[0] == 0.0
    stats = image_statistics(bars[:, :, :, None])
    assert set(stats) == {*LOGGED_STATS, "stroke_thickness"}
    assert list(stats["bbox_width"]) == [1, 2, 3, 4, 5, 0]


def test_stroke_thickness_of_a_batch_equals_one_transform_per_whole_image() -> None:
    from scipy import ndimage

    from visionops.monitor.stats import INK_THRESHOLD, STROKE_CHUNK

    # More images than a chunk, ink anywhere (up to the edges), and blank chunks.
    rng = np.random.default_rng(7)
    n = 3 * STROKE_CHUNK + 5
    x = np.zeros((n, 28, 28), np.uint8)
    for i in range(n):
        if STROKE_CHUNK <= i < 2 * STROKE_CHUNK:
            continue  # a chunk without ink
        top, left = rng.integers(0, 24, 2)
        x[i, top : top + rng.integers(2, 12), left : left + rng.integers(1, 8)] = 255
    x[3, 0, :] = 255  # a stroke along the border

    def one(img: np.ndarray) -> float:
        ink = img >= INK_THRESHOLD
        dist = ndimage.distance_transform_edt(np.pad(ink, 1))[1:-1, 1:-1]
        ridge = ink & (dist >= ndimage.maximum_filter(dist, size=3))
        return float(np.clip(2 * dist[ridge].mean() - 0.5, 1, 28)) if ridge.any() else 0.0

    expected = np.asarray([one(img) for img in x])
    assert np.allclose(stroke_thickness(x), expected, atol=1e-9)
    assert (expected[STROKE_CHUNK : 2 * STROKE_CHUNK] == 0).all() and (expected[:5] > 0).all()


def test_thumbnail_is_a_png_of_the_image() -> None:
    import base64
    import io

    from PIL import Image

    img = digits(1)[0]
    text = thumbnail_base64(img)
    decoded = np.asarray(Image.open(io.BytesIO(base64.b64decode(text))))
    assert decoded.shape == (28, 28) and np.array_equal(decoded, img[..., 0])
    assert len(text) < 1000


# --------------------------------------------------------------------------- profile


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_onnx(tmp_path_factory.mktemp("exported") / "exported")


def test_build_reference_profile_writes_and_round_trips(model_dir: Path) -> None:
    x = digits(300, seed=1)
    session = open_onnx(model_dir / "model.onnx")
    probs, emb = session.run(["probabilities", "embedding"], {"input": normalize(x, SPEC)})
    y = probs.argmax(1).copy()
    y[:30] = (y[:30] + 1) % 3  # 10 % wrong labels

    profile = build_reference_profile(
        model_dir, x, SPEC, y, max_samples=200, embedding_samples=50, seed=3
    )
    assert (model_dir / REFERENCE_FILE).is_file() and (model_dir / EMBEDDINGS_FILE).is_file()
    assert profile.classes == tuple(CLASSES) and profile.n_images == 300
    assert list(profile.class_counts) == list(np.bincount(probs.argmax(1), minlength=3))
    assert profile.accuracy == pytest.approx(0.9)
    # The accuracy estimate's threshold comes from all 300 images, not the sample:
    # 90 % of the confidences lie above it.
    assert profile.atc_threshold is not None
    assert np.mean(probs.max(1) > profile.atc_threshold) == pytest.approx(0.9, abs=0.01)
    assert len(profile.confidence) == 200 and profile.embeddings.shape == (50, 6)
    assert profile.model_name == "tiny" and profile.model_version is None
    digest = hashlib.sha256((model_dir / "model.onnx").read_bytes()).hexdigest()[:16]
    assert profile.model_digest == digest
    # Every sampled confidence and embedding is one the model really produced.
    top = probs.max(1).astype(np.float64)
    assert np.abs(profile.confidence[:, None] - top[None, :]).min(axis=1).max() < 1e-6
    nearest = np.abs(profile.embeddings[:, None, :] - emb[None, :, :]).max(axis=2).min(axis=1)
    assert nearest.max() < 1e-6
    # The stats sample follows the images' statistics.
    full = image_statistics(x)
    assert profile.stats["bbox_height"].mean() == pytest.approx(full["bbox_height"].mean(), rel=0.1)

    loaded = load_reference(model_dir)
    assert resolve_reference(str(model_dir / REFERENCE_FILE)).n_images == 300
    assert loaded.classes == profile.classes and loaded.accuracy == profile.accuracy
    assert loaded.atc_threshold == profile.atc_threshold
    assert np.allclose(loaded.confidence, profile.confidence, atol=1e-6)
    assert np.array_equal(loaded.embeddings, profile.embeddings)
    for name in profile.stats:
        assert np.allclose(loaded.stats[name], profile.stats[name], atol=1e-5)
    assert np.load(model_dir / EMBEDDINGS_FILE, allow_pickle=False).dtype == np.float32
    assert (model_dir / REFERENCE_FILE).stat().st_size < 100_000


def test_build_reference_profile_refuses_bad_input(model_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ModelError, match=r"model\.onnx not found"):
        build_reference_profile(tmp_path, digits(5), SPEC)
    with pytest.raises(DataError, match="uint8"):
        build_reference_profile(model_dir, digits(5).astype(np.float32), SPEC, write=False)
    with pytest.raises(ModelError, match="3 probabilities per image but 2 classes"):
        build_reference_profile(model_dir, digits(5), SPEC, classes=["x", "y"], write=False)
    with pytest.raises(DataError, match="4 labels for 5"):
        build_reference_profile(model_dir, digits(5), SPEC, np.zeros(4), write=False)


def test_load_reference_names_the_broken_file(model_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no reference profile at"):
        load_reference(tmp_path)
    bad = tmp_path / REFERENCE_FILE
    bad.write_text("{not json")
    with pytest.raises(DataError, match=f"{REFERENCE_FILE}: unreadable"):
        load_reference(bad)
    bad.write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(DataError, match="not a reference profile"):
        load_reference(tmp_path)
    raw = json.loads((model_dir / REFERENCE_FILE).read_text())
    raw["class_counts"] = [1, 2]
    bad.write_text(json.dumps(raw))
    with pytest.raises(DataError, match="2 entries for 3 classes"):
        load_reference(tmp_path)
    raw["class_counts"] = [1, 2, 3]
    bad.write_text(json.dumps(raw))
    with pytest.raises(DataError, match=f"{EMBEDDINGS_FILE} not found"):
        load_reference(tmp_path)


def test_reference_store_matches_the_served_model(model_dir: Path, tmp_path: Path) -> None:
    profile = load_reference(model_dir)
    store = ReferenceStore()
    served = SimpleNamespace(path=model_dir, version="7", digest=profile.model_digest)
    got = store.for_model(served)
    assert got is not None and got.model_version == "7"  # filled in from the registry
    assert store.for_model(served) is not None  # cached

    other = SimpleNamespace(path=model_dir, version="8", digest="0000000000000000")
    assert store.for_model(other) is None
    assert store.last_error is not None and "0000000000000000 is served" in store.last_error
    with pytest.raises(DataError, match="is served"):
        store.require(other)

    assert store.for_model(SimpleNamespace(path=tmp_path, version=None, digest=None)) is None
    assert store.last_error is not None and "has no reference.json" in store.last_error
    assert store.for_model(None) is None

    # A rewritten reference.json is read again (keyed on its modification time).
    raw = json.loads((model_dir / REFERENCE_FILE).read_text())
    raw["accuracy"] = 0.5
    (model_dir / REFERENCE_FILE).write_text(json.dumps(raw))
    stat = (model_dir / REFERENCE_FILE).stat()
    os.utime(model_dir / REFERENCE_FILE, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    refreshed = store.for_model(served)
    assert refreshed is not None and refreshed.accuracy == 0.5


def test_format_counts_round_trip_and_a_broken_one_is_named(
    model_dir: Path, tmp_path: Path
) -> None:
    # A copy of the module's model: this test writes its own reference.
    model_dir = Path(shutil.copytree(model_dir, tmp_path / "model"))
    broken = tmp_path / "broken"
    broken.mkdir()
    x = digits(40, seed=2)
    formats = ["PNG"] * 30 + ["JPEG"] * 10
    profile = build_reference_profile(model_dir, x, SPEC, original_formats=formats)
    assert profile.format_counts == {"JPEG": 10, "PNG": 30}
    assert load_reference(model_dir).format_counts == {"JPEG": 10, "PNG": 30}
    with pytest.raises(DataError, match="3 original formats for 40 images"):
        build_reference_profile(model_dir, x, SPEC, original_formats=formats[:3], write=False)
    raw = json.loads((model_dir / REFERENCE_FILE).read_text())
    raw["format_counts"] = {"PNG": -1}
    (broken / REFERENCE_FILE).write_text(json.dumps(raw))
    (broken / EMBEDDINGS_FILE).write_bytes((model_dir / EMBEDDINGS_FILE).read_bytes())
    with pytest.raises(DataError, match="'format_counts' must map format names to counts"):
        load_reference(broken)


def test_per_class_ood_quantiles_are_built_from_the_detector_and_round_trip(
    model_dir: Path, tmp_path: Path
) -> None:
    from visionops.ood import calibrate

    model_dir = Path(shutil.copytree(model_dir, tmp_path / "model"))
    session = open_onnx(model_dir / "model.onnx")
    bank_x, val_x = digits(200, seed=4), digits(400, seed=5)
    _, bank = session.run(["probabilities", "embedding"], {"input": normalize(bank_x, SPEC)})
    probs, val = session.run(["probabilities", "embedding"], {"input": normalize(val_x, SPEC)})
    detector = calibrate(bank, val, 0.01, k=1)
    profile = build_reference_profile(model_dir, val_x, SPEC, ood_detector=detector)
    ood = profile.ood_scores
    assert ood is not None and ood.k == 1 and ood.levels == (0.5, 0.75, 0.9, 0.95, 0.99)
    predicted = probs.argmax(1)
    scores = detector.score(val)
    assert list(ood.counts) == list(np.bincount(predicted, minlength=3))
    q90 = ood.thresholds(0.9)
    assert q90 is not None and ood.thresholds(0.8) is None
    for c in range(3):
        mine = scores[predicted == c]
        # A class with too few predictions falls back to the pooled quantile.
        want = np.quantile(mine, 0.9) if len(mine) >= 50 else np.quantile(scores, 0.9)
        assert q90[c] == pytest.approx(want, abs=1e-6)
    loaded = load_reference(model_dir)
    assert loaded.ood_scores is not None
    assert np.allclose(loaded.ood_scores.by_class, ood.by_class, atol=1e-6)
    assert list(loaded.ood_scores.counts) == list(ood.counts)

    # A profile written before the quantiles were recorded still loads, without them.
    raw = json.loads((model_dir / REFERENCE_FILE).read_text())
    del raw["ood_scores"]
    (model_dir / REFERENCE_FILE).write_text(json.dumps(raw))
    assert load_reference(model_dir).ood_scores is None
    # A malformed entry is named.
    raw["ood_scores"] = {**ood.to_json_dict(), "by_class": [[0.1, 0.2]]}
    (model_dir / REFERENCE_FILE).write_text(json.dumps(raw))
    with pytest.raises(DataError, match="'ood_scores' must hold 5 finite quantiles"):
        load_reference(model_dir)
