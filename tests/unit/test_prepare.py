"""Prepare: seeded split, caps, train-only statistics, reproducible bytes, train == serve."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from visionops.config import Params
from visionops.data.ingest import run_ingest, write_json, write_npz
from visionops.data.prepare import channel_stats, run_prepare
from visionops.data.transforms import PreprocessSpec, decode_image, image_to_array, normalize
from visionops.errors import DataError
from visionops.layout import Layout

SPLITS = ("train", "val", "test")


def write_dataset(layout: Layout, n_train: int = 200, n_test: int = 40) -> dict[str, np.ndarray]:
    """Training image i is filled with the value i % 256 (plus a unique marker pixel);
    every test image is white, so any leak of test pixels into the statistics shows."""
    x_train = np.zeros((n_train, 28, 28, 1), dtype=np.uint8)
    for i in range(n_train):
        x_train[i] = i % 256
        x_train[i, 0, 0, 0] = i // 256
        x_train[i, 1, 1, 0] = i % 7
    x_test = np.full((n_test, 28, 28, 1), 255, dtype=np.uint8)
    x_test[:, 0, 0, 0] = np.arange(n_test)
    arrays: dict[str, np.ndarray] = {
        "x_train": x_train,
        "y_train": np.arange(n_train, dtype=np.int64) % 10,
        "x_test": x_test,
        "y_test": np.arange(n_test, dtype=np.int64) % 10,
    }
    write_npz(layout.dataset_npz, arrays)
    write_json(
        layout.dataset_json,
        {
            "source": "mnist",
            "classes": [str(i) for i in range(10)],
            "image_size": 28,
            "channels": 1,
            "train_files": None,
            "test_files": None,
            "unreadable": [],
            "checksums": {},
            "preprocess": {"invert": "auto", "center": True, "digit_box": 20},
        },
    )
    return arrays


def load(layout: Layout, split: str) -> dict[str, np.ndarray]:
    with np.load(layout.split_npz(split), allow_pickle=False) as npz:
        return {k: npz[k] for k in npz.files}


def test_split_sizes_are_stratified_and_disjoint(tmp_path: Path) -> None:
    layout = Layout(tmp_path)
    arrays = write_dataset(layout)
    result = run_prepare(Params(), layout)
    assert (result.n_train, result.n_val, result.n_test) == (180, 20, 40)
    train, val, test = (load(layout, s) for s in SPLITS)
    assert set(train) == {"x", "y", "index"}
    assert set(val) == set(test) == {"x", "y", "index"}  # MNIST: no own size or format
    assert train["x"].dtype == np.uint8 and train["y"].dtype == np.int64
    assert not set(train["index"]) & set(val["index"])
    assert sorted([*train["index"], *val["index"]]) == list(range(200))
    assert np.bincount(val["y"], minlength=10).tolist() == [2] * 10
    np.testing.assert_array_equal(train["x"], arrays["x_train"][train["index"]])
    np.testing.assert_array_equal(val["y"], arrays["y_train"][val["index"]])
    np.testing.assert_array_equal(test["index"], np.arange(40))

    meta = json.loads(layout.prepared_meta.read_text())
    assert meta["classes"] == [str(i) for i in range(10)]
    assert (meta["image_size"], meta["channels"], meta["source"]) == (28, 1, "mnist")
    assert (meta["n_train"], meta["n_val"], meta["n_test"]) == (180, 20, 40)
    assert meta["preprocess"] == {"invert": "auto", "center": True, "digit_box": 20}
    assert PreprocessSpec.from_meta(meta).mean == tuple(meta["mean"])


def test_statistics_come_from_the_training_split_only(tmp_path: Path) -> None:
    layout = Layout(tmp_path)
    arrays = write_dataset(layout)
    result = run_prepare(Params(), layout)
    x = load(layout, "train")["x"].astype(np.float64) / 255
    assert result.mean == [pytest.approx(x.mean(), abs=1e-12)]
    assert result.std == [pytest.approx(x.std(), abs=1e-12)]
    pool = arrays["x_train"].astype(np.float64) / 255
    assert abs(result.mean[0] - pool.mean()) > 1e-6  # validation images are excluded
    assert result.mean[0] < 0.6  # the all-white test images are excluded
    meta = json.loads(layout.prepared_meta.read_text())
    assert meta["mean"] == result.mean and meta["std"] == result.std


def test_same_seed_gives_identical_files_and_another_seed_does_not(tmp_path: Path) -> None:
    layout = Layout(tmp_path)
    write_dataset(layout)
    run_prepare(Params(), layout)
    first = {s: layout.split_npz(s).read_bytes() for s in SPLITS}
    first_meta = layout.prepared_meta.read_bytes()
    run_prepare(Params(), layout)
    assert {s: layout.split_npz(s).read_bytes() for s in SPLITS} == first
    assert layout.prepared_meta.read_bytes() == first_meta
    run_prepare(Params(seed=7), layout)
    assert layout.split_npz("val").read_bytes() != first["val"]


def test_limits_cap_train_pool_and_test_set(tmp_path: Path) -> None:
    layout = Layout(tmp_path)
    write_dataset(layout)
    params = Params.model_validate({"data": {"limit": 50, "test_limit": 7}})
    result = run_prepare(params, layout)
    assert result.n_train + result.n_val == 50 and result.n_val == 5
    test = load(layout, "test")
    assert len(test["y"]) == 7 and len(set(test["index"])) == 7
    assert list(test["index"]) == sorted(test["index"])
    assert list(test["index"]) != list(range(7))  # a seeded sample, not a prefix
    with pytest.raises(DataError, match=r"0 validation images .*data\.limit=1"):
        run_prepare(Params.model_validate({"data": {"limit": 1}}), layout)


def test_training_copies_of_test_images_are_dropped(tmp_path: Path) -> None:
    layout = Layout(tmp_path)
    arrays = write_dataset(layout)
    arrays["x_train"][5] = arrays["x_test"][0]
    arrays["x_train"][77] = arrays["x_test"][3]
    write_npz(layout.dataset_npz, arrays)
    result = run_prepare(Params(), layout)
    assert result.dropped_duplicates == 2 and result.n_train + result.n_val == 198
    used = {*load(layout, "train")["index"], *load(layout, "val")["index"]}
    assert 5 not in used and 77 not in used
    assert json.loads(layout.prepared_meta.read_text())["dropped_train_duplicates"] == 2


def test_channel_stats_per_channel() -> None:
    x = np.zeros((2, 2, 2, 3), dtype=np.uint8)
    x[..., 0] = 255
    x[0, ..., 1] = 51  # half the pixels 51, half 0
    mean, std = channel_stats(x)
    assert mean == pytest.approx([1.0, 0.1, 0.0], abs=1e-12)
    assert std == pytest.approx([1.0, 0.1, 1.0], abs=1e-12)  # constant channels get std 1


def test_ingested_tensor_equals_serving_tensor(tmp_path: Path) -> None:
    """Train-time and serve-time preprocessing are the same function, bit for bit."""
    root = tmp_path / "digits"
    rng = np.random.default_rng(0)
    for cls in ("even", "odd"):
        for i in range(6):
            h, w = int(rng.integers(20, 90)), int(rng.integers(20, 90))
            a = np.full((h, w), 250, np.uint8)
            a[h // 5 : 4 * h // 5, w // 4 : w // 4 + max(2, w // 6)] = rng.integers(0, 60)
            img = Image.fromarray(a).convert("RGB" if i % 2 else "L")
            (root / cls).mkdir(parents=True, exist_ok=True)
            img.save(root / cls / f"{i}.{'jpg' if i % 3 == 0 else 'png'}")
    params = Params.model_validate(
        {"data": {"source": "imagefolder", "path": str(root), "val_fraction": 0.2}}
    )
    layout = Layout(tmp_path)
    run_ingest(params, layout)
    run_prepare(params, layout)
    spec = PreprocessSpec.from_meta(json.loads(layout.prepared_meta.read_text()))
    files = json.loads(layout.dataset_json.read_text())["train_files"]
    train = load(layout, "train")
    assert len(train["y"]) >= 5
    for row, idx in enumerate(train["index"]):
        data = (root / files[idx]).read_bytes()
        served = normalize(image_to_array(decode_image(data, params.serve.max_pixels), spec), spec)
        trained = normalize(train["x"][row : row + 1], spec)
        assert served.shape == (1, 1, 28, 28)
        np.testing.assert_array_equal(trained, served)


def test_preprocessing_is_the_one_ingest_applied(tmp_path: Path) -> None:
    """prepare does not read preprocess.*: the model's metadata gets what ingest used."""
    layout = Layout(tmp_path)
    write_dataset(layout)
    meta = json.loads(layout.dataset_json.read_text())
    meta["preprocess"] = {"invert": "never", "center": False, "digit_box": 18}
    layout.dataset_json.write_text(json.dumps(meta))
    run_prepare(Params(), layout)  # Params() says digit_box 20
    prepared = json.loads(layout.prepared_meta.read_text())
    assert prepared["preprocess"] == {"invert": "never", "center": False, "digit_box": 18}
    del meta["preprocess"]
    layout.dataset_json.write_text(json.dumps(meta))
    with pytest.raises(DataError, match="preprocess"):
        run_prepare(Params(), layout)
