"""ONNX export: contract of model.onnx + metadata.json, torch parity, clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from visionops.artifacts import git_sha
from visionops.config import params_from_dict
from visionops.data.transforms import PreprocessSpec, normalize
from visionops.errors import DataError, ModelError
from visionops.export import check_parity, export_module, export_onnx, run_export
from visionops.layout import Layout
from visionops.models.zoo import build_model

CLASSES = ["a", "b", "c"]
SPEC = PreprocessSpec(image_size=8, channels=1, mean=(0.2,), std=(0.3,), center=False)


def _workspace(root: Path, best: str = "mlp") -> Layout:
    """A prepared test split, a trained (random) zoo model and its evaluation metrics."""
    layout = Layout(root)
    rng = np.random.default_rng(0)
    layout.prepared_dir.mkdir(parents=True)
    x = rng.integers(0, 256, size=(70, 8, 8, 1), dtype=np.uint8)
    y = rng.integers(0, 3, size=70).astype(np.int64)
    np.savez(layout.split_npz("test"), x=x, y=y)
    # The monitoring reference and the OOD calibration set; the OOD bank comes from train.
    x_val = rng.integers(0, 256, size=(200, 8, 8, 1), dtype=np.uint8)
    np.savez(layout.split_npz("val"), x=x_val, y=rng.integers(0, 3, size=200).astype(np.int64))
    x_train = rng.integers(0, 256, size=(120, 8, 8, 1), dtype=np.uint8)
    np.savez(layout.split_npz("train"), x=x_train, y=rng.integers(0, 3, 120).astype(np.int64))
    meta = {"classes": CLASSES, "image_size": 8, "channels": 1, "mean": [0.2], "std": [0.3]}
    meta["preprocess"] = {"invert": "auto", "center": False, "digit_box": 20}
    layout.prepared_meta.write_text(json.dumps(meta))

    torch.manual_seed(0)
    model = build_model(best, in_channels=1, image_size=8, num_classes=3, width=8, dropout=0.1)
    model_dir = layout.model_dir(best)
    model_dir.mkdir(parents=True)
    torch.save(model.state_dict(), model_dir / "model.pt")
    config = {
        "architecture": best,
        "in_channels": 1,
        "image_size": 8,
        "num_classes": 3,
        "width": 8,
        "dropout": 0.1,
        "classes": CLASSES,
        "preprocess": SPEC.to_dict(),
        "best_epoch": 1,
        "val_accuracy": 0.5,
    }
    (model_dir / "config.json").write_text(json.dumps(config))
    layout.eval_metrics(best).parent.mkdir(parents=True)
    metrics = {"accuracy": 0.875, "macro_f1": 0.75, "per_class": {"a": 0.9}, "ok": True}
    layout.eval_metrics(best).write_text(json.dumps(metrics))
    layout.comparison_json.parent.mkdir(parents=True, exist_ok=True)
    layout.comparison_json.write_text(json.dumps({"best_model": best, "models": [best]}))
    return layout


@pytest.fixture
def layout(tmp_path: Path) -> Layout:
    return _workspace(tmp_path)


def _params(ood: dict[str, float] | None = None, **gate: float):
    return params_from_dict(
        {"registry": {"model_name": "tiny-model"}, "gate": gate, "ood": ood or {}}
    )


def test_export_writes_the_contract(layout: Layout) -> None:
    result = run_export(_params(), layout)

    onnx_path = layout.export_dir / "model.onnx"
    assert result.onnx_path == onnx_path and onnx_path.is_file()
    assert sorted(p.name for p in layout.export_dir.iterdir()) == [
        "metadata.json",
        "model.onnx",
        "ood_bank.npy",
        "reference.json",
        "reference_embeddings.npy",
    ]
    meta = json.loads((layout.export_dir / "metadata.json").read_text())
    assert meta["name"] == "tiny-model"
    assert meta["architecture"] == "mlp"
    assert meta["classes"] == CLASSES
    assert PreprocessSpec.from_dict(meta["preprocess"]) == SPEC
    assert meta["input_name"] == "input"
    assert meta["outputs"] == ["probabilities", "embedding"]
    # Only the top-level numbers of the evaluation, booleans excluded.
    assert meta["metrics"] == {"accuracy": 0.875, "macro_f1": 0.75}
    assert meta["opset"] == 18
    assert meta["git_sha"] is None  # tmp_path is not a git checkout
    assert 0.0 <= meta["parity_max_abs_diff"] <= 1e-4
    assert meta["parity_max_abs_diff"] == result.parity_max_abs_diff
    summary = result.summary()
    assert summary["parity_max_abs_diff"] == result.parity_max_abs_diff
    assert summary["onnx_latency_p95_ms"] >= summary["onnx_latency_p50_ms"] > 0
    assert "mlp" in result.describe()


def test_exported_graph_matches_torch_at_any_batch_size(layout: Layout) -> None:
    run_export(_params(), layout)
    session = ort.InferenceSession(
        str(layout.export_dir / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    (inp,) = session.get_inputs()
    assert inp.name == "input"
    assert inp.type == "tensor(float)"
    assert not isinstance(inp.shape[0], int)  # symbolic batch dimension
    assert inp.shape[1:] == [1, 8, 8]
    assert [o.name for o in session.get_outputs()] == ["probabilities", "embedding"]

    from visionops.models.zoo import load_trained

    model, _ = load_trained(layout.model_dir("mlp"))
    # The graph applies the temperature fitted on the validation split.
    meta = json.loads((layout.export_dir / "metadata.json").read_text())
    temperature = meta["calibration"]["temperature"]
    assert meta["calibration"]["method"] == "temperature scaling" and temperature > 0
    with np.load(layout.split_npz("test")) as data:
        x_all = normalize(data["x"], SPEC)
    for n in (1, 5, 70):
        x = x_all[:n]
        probs, emb = session.run(None, {"input": x})
        with torch.no_grad():
            want_probs = torch.softmax(model(torch.from_numpy(x)) / temperature, dim=1).numpy()
            want_emb = model.forward_features(torch.from_numpy(x)).numpy()
        assert probs.shape == (n, 3)
        assert emb.shape == (n, model.embedding_dim)
        np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
        np.testing.assert_allclose(probs, want_probs, atol=1e-5)
        np.testing.assert_allclose(emb, want_emb, atol=1e-4)


def test_parity_check_catches_a_perturbed_model(tmp_path: Path) -> None:
    torch.manual_seed(1)
    model = build_model("mlp", in_channels=1, image_size=8, num_classes=3, width=8).eval()
    module = export_module(model)
    x = np.random.default_rng(1).normal(size=(16, 1, 8, 8)).astype(np.float32)
    path = tmp_path / "m.onnx"
    export_onnx(module, x[:2], path)
    assert check_parity(path, module, x, atol=1e-4) <= 1e-4

    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.5)
    with pytest.raises(ModelError, match="disagree"):
        check_parity(path, module, x, atol=1e-4)


def test_failed_parity_leaves_no_model_behind(
    layout: Layout, monkeypatch: pytest.MonkeyPatch
) -> None:
    import visionops.export as export

    real_export = export.export_onnx

    def export_then_perturb(module, example, path, opset=18):  # type: ignore[no-untyped-def]
        name = real_export(module, example, path, opset)
        with torch.no_grad():
            for p in module.parameters():
                p.add_(0.3)
        return name

    monkeypatch.setattr(export, "export_onnx", export_then_perturb)
    with pytest.raises(ModelError, match="parity_atol"):
        run_export(_params(), layout)
    assert not (layout.export_dir / "model.onnx").exists()
    assert not layout.export_dir.with_name("exported.tmp").exists()


def test_missing_inputs_are_named(tmp_path: Path) -> None:
    layout = Layout(tmp_path)
    with pytest.raises(DataError, match=r"comparison\.json not found"):
        run_export(_params(), layout)

    layout = _workspace(tmp_path / "ws")
    layout.comparison_json.write_text(json.dumps({"best_model": "cnn"}))
    with pytest.raises(ModelError, match=r"models/cnn/model\.pt not found"):
        run_export(_params(), layout)

    layout.comparison_json.write_text(json.dumps({"models": ["mlp"]}))
    with pytest.raises(DataError, match="best_model"):
        run_export(_params(), layout)

    layout.comparison_json.write_text(json.dumps({"best_model": "mlp"}))
    layout.split_npz("test").unlink()
    with pytest.raises(DataError, match=r"test\.npz not found"):
        run_export(_params(), layout)


def test_git_sha_outside_a_repository_is_none(tmp_path: Path) -> None:
    assert git_sha(tmp_path) is None


def test_stored_ood_threshold_rejects_the_set_share_of_validation(layout: Layout) -> None:
    """The threshold in metadata.json, applied as the server applies it, rejects
    ``ood.false_rejection_rate`` of the validation split: 10 of 200 at 5 %."""
    from visionops.ood import OodDetector, screen_pixels

    run_export(_params(ood={"false_rejection_rate": 0.05, "bank_size": 100, "k": 3}), layout)
    folder = layout.export_dir
    meta = json.loads((folder / "metadata.json").read_text())
    assert meta["ood"]["false_rejection_rate"] == 0.05
    assert meta["ood"]["bank_size"] == 100 and meta["ood"]["k"] == 3
    detector = OodDetector.load(folder, meta)
    assert detector.bank.shape == (100, detector.dim)
    np.testing.assert_allclose(np.linalg.norm(detector.bank, axis=1), 1.0, rtol=1e-5)

    with np.load(layout.split_npz("val")) as npz:
        x_val = npz["x"]
    session = ort.InferenceSession(str(folder / "model.onnx"))
    _, emb = session.run(["probabilities", "embedding"], {"input": normalize(x_val, SPEC)})
    screen = screen_pixels(x_val, detector.min_ink_pixels, detector.min_edge_density)
    rejected = screen.no_ink | screen.no_strokes | detector.is_out(detector.score(emb))
    assert int(rejected.sum()) == 10
    assert meta["ood"]["calibration"]["rejected_share"] == pytest.approx(10 / 200)
    # The edge-density test took its part (0.2 of the budget) before the embedding test.
    assert 0 < int(screen.no_strokes.sum()) <= 2
    assert detector.min_edge_density > 0


def test_ood_calibration_needs_a_training_split(layout: Layout) -> None:
    layout.split_npz("train").unlink()
    with pytest.raises(DataError, match=r"train\.npz not found"):
        run_export(_params(), layout)
    assert not layout.export_dir.exists()


def test_reference_records_the_pictures_original_sizes_and_formats(layout: Layout) -> None:
    rng = np.random.default_rng(1)
    val = dict(np.load(layout.split_npz("val")))
    sizes = np.stack([rng.integers(300, 400, len(val["y"])), rng.integers(200, 260, 200)], 1)
    formats = np.asarray(["PNG"] * 150 + ["JPEG"] * 50)
    np.savez(layout.split_npz("val"), **val, size=sizes.astype(np.int64), format=formats)
    run_export(_params(), layout)
    saved = json.loads((layout.export_dir / "reference.json").read_text())
    assert saved["format_counts"] == {"JPEG": 50, "PNG": 150}
    stats = saved["stats"]
    assert min(stats["original_width"]) >= 300 and max(stats["original_width"]) < 400
    assert min(stats["original_height"]) >= 200 and max(stats["original_height"]) < 260
    assert all(300 / 260 < a < 400 / 200 for a in stats["original_aspect"])


def test_reference_without_sizes_records_none_and_a_wrong_size_array_is_named(
    layout: Layout,
) -> None:
    run_export(_params(), layout)
    stats = json.loads((layout.export_dir / "reference.json").read_text())["stats"]
    assert "original_width" not in stats
    val = dict(np.load(layout.split_npz("val")))
    formats = np.asarray(["PNG"] * 200)
    np.savez(layout.split_npz("val"), **val, size=np.ones((3, 2), np.int64), format=formats)
    with pytest.raises(DataError, match=r"'size' is \(3, 2\) .* expected \(200, 2\)"):
        run_export(_params(), layout)
