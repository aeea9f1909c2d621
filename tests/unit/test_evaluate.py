"""Evaluation metrics on hand-made cases, the evaluate stage's files, and model comparison."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from visionops import evaluate
from visionops.config import Params, params_from_dict
from visionops.errors import ModelError
from visionops.evaluate import (
    calibration_bins,
    classification_metrics,
    confusion_matrix,
    run_compare,
    run_evaluate,
    select_best,
)
from visionops.layout import Layout
from visionops.models.zoo import build_model

CLASSES = ["a", "b", "c"]
# Six predictions worked out by hand below (rows: probabilities of a, b, c).
Y_TRUE = np.array([0, 0, 1, 1, 2, 2])
PROBS = np.array(
    [
        [0.90, 0.05, 0.05],  # a, right, confidence 0.90
        [0.35, 0.62, 0.03],  # b, wrong, 0.62
        [0.20, 0.70, 0.10],  # b, right, 0.70
        [0.10, 0.85, 0.05],  # b, right, 0.85
        [0.10, 0.20, 0.70],  # c, right, 0.70
        [0.55, 0.05, 0.40],  # a, wrong, 0.55
    ]
)


def test_classification_metrics_match_a_hand_computed_case() -> None:
    m = classification_metrics(Y_TRUE, PROBS, CLASSES, n_bins=5)
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["errors"] == 2 and m["n_test"] == 6
    # a: predicted twice, right once; b: predicted 3x, right 2x; c: predicted once, right.
    per = m["per_class"]
    assert per["a"] == pytest.approx({"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2})
    assert per["b"] == pytest.approx({"precision": 2 / 3, "recall": 1.0, "f1": 0.8, "support": 2})
    assert per["c"] == pytest.approx({"precision": 1.0, "recall": 0.5, "f1": 2 / 3, "support": 2})
    assert m["macro_precision"] == pytest.approx((0.5 + 2 / 3 + 1.0) / 3)
    assert m["macro_recall"] == pytest.approx((0.5 + 1.0 + 0.5) / 3)
    assert m["macro_f1"] == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)
    # Bins of width 0.2: (0.4,0.6] = {0.55 wrong}; (0.6,0.8] = {0.62 wrong, 0.70, 0.70};
    # (0.8,1] = {0.85, 0.90}.
    expected_ece = (
        1 / 6 * abs(0 - 0.55)
        + 3 / 6 * abs(2 / 3 - (0.62 + 0.70 + 0.70) / 3)
        + 2 / 6 * abs(1 - (0.85 + 0.90) / 2)
    )
    assert m["ece"] == pytest.approx(expected_ece)
    p_true = [0.90, 0.35, 0.70, 0.85, 0.70, 0.40]
    assert m["nll"] == pytest.approx(-sum(math.log(p) for p in p_true) / 6)
    assert m["confusion"].tolist() == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]


def test_ece_is_zero_when_confidence_equals_accuracy() -> None:
    probs = np.array([[0.75, 0.25]] * 4)
    m = classification_metrics(np.array([0, 0, 0, 1]), probs, ["x", "y"], n_bins=10)
    assert m["accuracy"] == 0.75
    assert m["ece"] == pytest.approx(0.0, abs=1e-12)


def test_calibration_bins_put_the_extremes_in_the_first_and_last_bin() -> None:
    ece, bins = calibration_bins(np.array([0.0, 1.0, 1.0]), np.array([0, 1, 0]), 4)
    assert [b["count"] for b in bins] == [1, 0, 0, 2]
    assert bins[3]["accuracy"] == 0.5 and bins[3]["confidence"] == 1.0
    assert ece == pytest.approx(2 / 3 * 0.5)


def test_a_class_never_predicted_gets_zero_precision_not_nan() -> None:
    m = classification_metrics(np.array([0, 1]), np.array([[0.9, 0.1], [0.8, 0.2]]), ["p", "q"])
    assert m["per_class"]["q"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}
    assert not any(math.isnan(v) for v in (m["macro_precision"], m["macro_f1"]))
    assert confusion_matrix(np.array([0, 1]), np.array([0, 0]), 2).tolist() == [[1, 0], [1, 0]]


# --------------------------------------------------------------------------- the stage


def params(**evaluate_settings: int) -> Params:
    return params_from_dict(
        {
            "train": {"models": ["cnn", "mlp"]},
            "evaluate": {"calibration_bins": 5, **evaluate_settings},
        }
    )


def make_trained_model(
    layout: Layout, name: str = "cnn", size: int = 16, channels: int = 1
) -> None:
    """A model folder as `train` writes it (untrained weights are enough here)."""
    torch.manual_seed(0)
    model = build_model(name, channels, size, len(CLASSES), width=8, dropout=0.0)
    model_dir = layout.model_dir(name)
    model_dir.mkdir(parents=True)
    torch.save(model.state_dict(), model_dir / "model.pt")
    preprocess = {"image_size": size, "channels": channels, "mean": [0.2] * channels}
    preprocess |= {"std": [0.3] * channels, "invert": "never", "center": False, "digit_box": 20}
    config = {"architecture": name, "in_channels": channels, "image_size": size}
    config |= {"num_classes": 3, "width": 8, "dropout": 0.0, "classes": CLASSES}
    (model_dir / "config.json").write_text(json.dumps(config | {"preprocess": preprocess}))


def write_test_split(layout: Layout, n: int, size: int = 16, channels: int = 1) -> np.ndarray:
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (n, size, size, channels)).astype(np.uint8)
    y = np.resize(np.arange(len(CLASSES)), n).astype(np.int64)
    layout.prepared_dir.mkdir(parents=True, exist_ok=True)
    np.savez(layout.split_npz("test"), x=x, y=y)
    return y


def assert_png(path: Path) -> None:
    with Image.open(path) as img:
        assert img.format == "PNG"
        assert img.width >= 200 and img.height >= 200
        img.verify()


def test_run_evaluate_writes_hand_checked_metrics_csv_and_plots(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    layout = Layout.at(tmp_path)
    make_trained_model(layout)
    layout.prepared_dir.mkdir(parents=True)
    rng = np.random.default_rng(0)
    np.savez(
        layout.split_npz("test"), x=rng.integers(0, 256, (6, 16, 16, 1), dtype=np.uint8), y=Y_TRUE
    )
    # Replace the network's output by the hand-made probabilities above.
    monkeypatch.setattr(evaluate, "predict_probabilities", lambda model, x, batch_size: PROBS)
    layout.learning_curve("cnn").parent.mkdir(parents=True)
    curve = [
        {"epoch": e, "train_loss": 1 / e, "val_loss": 1.2 / e, "lr": 0.001,
         "train_accuracy": 0.5 + e / 10, "val_accuracy": 0.4 + e / 10}
        for e in (1, 2, 3)
    ]  # fmt: skip
    layout.learning_curve("cnn").write_text(json.dumps(curve))

    result = run_evaluate(params(gallery_size=1), layout, "cnn")

    assert result.accuracy == pytest.approx(4 / 6) and result.errors == 2
    assert result.summary()["test_macro_f1"] == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)
    assert "cnn" in result.describe()
    metrics = json.loads(layout.eval_metrics("cnn").read_text())
    assert metrics["accuracy"] == pytest.approx(4 / 6)
    assert {"macro_precision", "macro_recall", "macro_f1", "ece", "nll", "n_test"} <= set(metrics)
    # A metrics file holds headline numbers only: `dvc metrics show` stays readable.
    assert all(isinstance(v, int | float) for v in metrics.values()), metrics
    per_class = json.loads(layout.per_class_plot("cnn").read_text())
    assert [r["class"] for r in per_class] == ["a", "b", "c"]
    assert per_class[1]["f1"] == pytest.approx(0.8) and per_class[1]["support"] == 2

    with layout.confusion_csv("cnn").open() as f:
        rows = list(csv.DictReader(f))
    assert [(r["actual"], r["predicted"]) for r in rows] == [
        ("a", "a"), ("a", "b"), ("b", "b"), ("b", "b"), ("c", "c"), ("c", "a"),
    ]  # fmt: skip

    for name in evaluate.REPORT_FILES:
        assert_png(layout.eval_report_dir("cnn") / name)


def test_run_evaluate_with_a_real_model_on_rgb_images(tmp_path: Path) -> None:
    layout = Layout.at(tmp_path)
    make_trained_model(layout, "resnet", size=20, channels=3)
    y = write_test_split(layout, 30, size=20, channels=3)
    result = run_evaluate(params(), layout, "resnet")

    # Recompute the accuracy independently of run_evaluate.
    from visionops.models.zoo import load_trained

    model, _ = load_trained(layout.model_dir("resnet"))
    with np.load(layout.split_npz("test")) as npz:
        x = (npz["x"].astype(np.float32) / 255 - 0.2) / 0.3
    with torch.no_grad():
        pred = model(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).argmax(1).numpy()
    assert result.accuracy == pytest.approx(float((pred == y).mean()))
    assert result.n_test == 30
    # No learning curve was written: the plot says so instead of failing.
    assert_png(layout.eval_report_dir("resnet") / "learning_curves.png")
    assert_png(layout.eval_report_dir("resnet") / "misclassified.png")


def test_run_evaluate_without_a_model_names_the_folder(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match=r"models/mlp"):
        run_evaluate(params(), Layout.at(tmp_path), "mlp")


# --------------------------------------------------------------------------- compare


def write_model_metrics(layout: Layout, name: str, val: float, test: float, n_params: int) -> None:
    for path, data in (
        (layout.train_metrics(name), {"val_accuracy": val, "val_loss": 0.1, "best_epoch": 3,
                                      "epochs_run": 4, "train_seconds": 12.5,
                                      "images_per_second": 2000.0, "params": n_params}),
        (layout.eval_metrics(name), {"accuracy": test, "macro_f1": test - 0.001, "ece": 0.01,
                                     "nll": 0.05, "n_test": 100}),
    ):  # fmt: skip
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(data))


def test_compare_selects_on_validation_not_test_accuracy(tmp_path: Path) -> None:
    layout = Layout.at(tmp_path)
    write_model_metrics(layout, "cnn", val=0.995, test=0.990, n_params=300_000)
    write_model_metrics(layout, "mlp", val=0.985, test=0.993, n_params=500_000)
    result = run_compare(params(), layout)

    assert result.best_model == "cnn"  # mlp has the better *test* accuracy: not used
    assert result.summary()["best_test_accuracy"] == pytest.approx(0.990)
    saved = json.loads(layout.comparison_json.read_text())
    assert saved["best_model"] == "cnn"
    assert saved["models"]["mlp"] == {
        "val_accuracy": 0.985, "accuracy": 0.993, "macro_f1": 0.992, "ece": 0.01,
        "params": 500_000, "train_seconds": 12.5, "images_per_second": 2000.0,
    }  # fmt: skip
    table = (layout.reports_dir / "models.md").read_text()
    assert "| **cnn** (selected) | 99.50% | 99.00% |" in table
    assert "| mlp | 98.50% | 99.30% |" in table
    assert_png(layout.reports_dir / "models.png")


def test_ties_on_validation_accuracy_go_to_fewer_parameters() -> None:
    models = {
        "resnet": {"val_accuracy": 0.99, "params": 700_000.0},
        "cnn": {"val_accuracy": 0.99, "params": 300_000.0},
        "mlp": {"val_accuracy": 0.98, "params": 100_000.0},
    }
    assert select_best(models) == "cnn"


def test_compare_names_the_missing_stage(tmp_path: Path) -> None:
    layout = Layout.at(tmp_path)
    write_model_metrics(layout, "cnn", val=0.99, test=0.99, n_params=1)
    with pytest.raises(ModelError, match="`dvc repro evaluate@mlp`"):
        run_compare(params(), layout)
