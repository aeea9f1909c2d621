"""Evaluate trained models on the untouched test split, and compare the zoo.

``run_evaluate`` loads ``models/<name>`` (``zoo.load_trained``), normalises the test
split with the preprocessing stored *in the model's config* (the one it was trained
with), and writes:

- ``layout.eval_metrics(name)``: the headline numbers ``dvc metrics show`` lists --
  accuracy, macro precision/recall/F1, expected calibration error, negative
  log-likelihood, test images and errors;
- ``layout.per_class_plot(name)``: precision, recall, F1 and support of every class,
  one row per class, for ``dvc plots`` (a bar chart of F1);
- ``layout.confusion_csv(name)``: one ``actual,predicted`` row per test image, with class
  names, for DVC's confusion-matrix template;
- PNGs in ``layout.eval_report_dir(name)``: ``confusion_matrix.png``,
  ``misclassified.png``, ``learning_curves.png``, ``reliability.png``.

``run_compare`` puts the evaluated models side by side and selects the one to export.
The selection uses **validation** accuracy (from training), not test accuracy: the test
set must stay a fair, untouched estimate of the chosen model, which it no longer is if
it also made the choice. Ties go to the model with fewer parameters.

The metric functions are plain NumPy so they can be checked on hand-made cases.
"""

from __future__ import annotations

import csv
import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from visionops.errors import DataError, ModelError
from visionops.stages import missing_input

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from visionops.config import Params
    from visionops.layout import Layout

log = logging.getLogger(__name__)

REPORT_FILES = (
    "confusion_matrix.png",
    "misclassified.png",
    "learning_curves.png",
    "reliability.png",
)


# --------------------------------------------------------------------------- results


@dataclass(frozen=True)
class EvalResult:
    """Test-set metrics of one model and where its report went."""

    model_name: str
    accuracy: float
    macro_precision: float
    macro_recall: float
    macro_f1: float
    ece: float
    nll: float
    n_test: int
    errors: int
    metrics_path: Path
    report_dir: Path

    def summary(self) -> dict[str, float]:
        return {
            "test_accuracy": self.accuracy,
            "test_macro_precision": self.macro_precision,
            "test_macro_recall": self.macro_recall,
            "test_macro_f1": self.macro_f1,
            "test_ece": self.ece,
            "test_nll": self.nll,
            "test_errors": float(self.errors),
        }

    def describe(self) -> str:
        from visionops.train import display_path

        return (
            f"{self.model_name}: test accuracy {self.accuracy:.2%} ({self.errors} of "
            f"{self.n_test} wrong), macro F1 {self.macro_f1:.4f}, ECE {self.ece:.4f}, "
            f"NLL {self.nll:.4f} -> {display_path(self.report_dir)}"
        )


@dataclass(frozen=True)
class CompareResult:
    """The zoo side by side and the model selected (on validation accuracy)."""

    best_model: str
    models: dict[str, dict[str, float]]
    selected_by: str = "val_accuracy"
    table_path: Path | None = field(default=None, compare=False)

    def summary(self) -> dict[str, float]:
        best = self.models[self.best_model]
        return {
            "best_val_accuracy": best["val_accuracy"],
            "best_test_accuracy": best["accuracy"],
            "models_compared": float(len(self.models)),
        }

    def describe(self) -> str:
        best = self.models[self.best_model]
        return (
            f"best model: {self.best_model} (val {best['val_accuracy']:.2%}, test "
            f"{best['accuracy']:.2%}) of {', '.join(self.models)}; selected on {self.selected_by}"
        )


# --------------------------------------------------------------------------- metrics


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    """``(K, K)`` counts, rows = actual class, columns = predicted class."""
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(cm, (np.asarray(y_true, np.int64), np.asarray(y_pred, np.int64)), 1)
    return cm


def calibration_bins(
    confidence: np.ndarray, correct: np.ndarray, n_bins: int
) -> tuple[float, list[dict[str, float]]]:
    """Expected calibration error over ``n_bins`` equal-width confidence bins.

    Bin ``i`` holds confidences in ``(i/n, (i+1)/n]`` (the first also holds 0).
    ECE = sum over bins of ``count/N * |accuracy - mean confidence|``. Returns the ECE
    and one row per bin (``lower``, ``upper``, ``count``, ``accuracy``, ``confidence``).
    """
    confidence = np.asarray(confidence, dtype=np.float64)
    correct = np.asarray(correct, dtype=np.float64)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    index = np.clip(np.searchsorted(edges[1:-1], confidence, side="left"), 0, n_bins - 1)
    total = max(len(confidence), 1)
    ece, rows = 0.0, []
    for b in range(n_bins):
        mask = index == b
        count = int(mask.sum())
        acc = float(correct[mask].mean()) if count else 0.0
        conf = float(confidence[mask].mean()) if count else 0.0
        ece += count / total * abs(acc - conf)
        rows.append(
            {"lower": float(edges[b]), "upper": float(edges[b + 1]), "count": count,
             "accuracy": acc, "confidence": conf}
        )  # fmt: skip
    return ece, rows


def classification_metrics(
    y_true: np.ndarray, probs: np.ndarray, classes: Sequence[str], n_bins: int = 15
) -> dict[str, Any]:
    """Accuracy, macro and per-class precision/recall/F1, ECE and NLL from probabilities.

    ``probs`` is ``(N, K)`` with rows summing to 1; the prediction is the arg-max.
    Precision of a class never predicted, and recall of a class absent from ``y_true``,
    are 0 (as scikit-learn's ``zero_division=0``); the macro averages include them.
    Besides the numbers, the dict carries what the plots need: ``calibration`` (bins),
    ``confusion`` (matrix), ``y_pred`` and ``confidence`` (arrays).
    """
    y_true = np.asarray(y_true, dtype=np.int64)
    probs = np.asarray(probs, dtype=np.float64)
    k = len(classes)
    if probs.ndim != 2 or probs.shape != (len(y_true), k):
        raise DataError(f"probabilities of shape {probs.shape} do not match {len(y_true)}x{k}")
    if len(y_true) == 0:
        raise DataError("cannot compute metrics on an empty test set")
    y_pred = probs.argmax(axis=1)
    cm = confusion_matrix(y_true, y_pred, k)
    tp = np.diag(cm).astype(np.float64)
    predicted, support = cm.sum(axis=0), cm.sum(axis=1)
    precision = np.divide(tp, predicted, out=np.zeros(k), where=predicted > 0)
    recall = np.divide(tp, support, out=np.zeros(k), where=support > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros(k), where=denom > 0)
    confidence = probs.max(axis=1)
    correct = y_pred == y_true
    ece, bins = calibration_bins(confidence, correct, n_bins)
    p_true = probs[np.arange(len(y_true)), y_true]
    nll = float(-np.log(np.clip(p_true, np.finfo(np.float64).tiny, None)).mean())
    return {
        "accuracy": float(correct.mean()),
        "macro_precision": float(precision.mean()),
        "macro_recall": float(recall.mean()),
        "macro_f1": float(f1.mean()),
        "ece": float(ece),
        "nll": nll,
        "n_test": len(y_true),
        "errors": int((~correct).sum()),
        "per_class": {
            str(name): {
                "precision": float(precision[i]),
                "recall": float(recall[i]),
                "f1": float(f1[i]),
                "support": int(support[i]),
            }
            for i, name in enumerate(classes)
        },
        "calibration": bins,
        "confusion": cm,
        "y_pred": y_pred,
        "confidence": confidence,
    }


# --------------------------------------------------------------------------- evaluate


def predict_probabilities(model: Any, x: np.ndarray, batch_size: int) -> np.ndarray:
    """Softmax probabilities (float64, via log-softmax) of normalised ``x (N, C, H, W)``."""
    import torch

    from visionops.train import evaluate_logits

    logits = evaluate_logits(model, torch.from_numpy(x), batch_size)
    return torch.log_softmax(logits.double(), dim=1).exp().numpy()


def run_evaluate(params: Params, layout: Layout, model_name: str) -> EvalResult:
    """Evaluate ``models/<model_name>`` on the test split; write metrics, CSV and plots."""
    from visionops.data.transforms import PreprocessSpec, normalize
    from visionops.models.zoo import load_trained
    from visionops.train import load_split

    model, config = load_trained(layout.model_dir(model_name))
    classes = [str(c) for c in config.get("classes") or range(int(config["num_classes"]))]
    if "preprocess" not in config:
        raise ModelError(f"{layout.model_dir(model_name) / 'config.json'}: no 'preprocess'")
    spec = PreprocessSpec.from_dict(config["preprocess"])
    x_raw, y_test = load_split(layout, "test", len(classes))
    expected = (spec.image_size, spec.image_size, spec.channels)
    if tuple(x_raw.shape[1:]) != expected:
        raise DataError(
            f"{layout.split_npz('test')}: images are {x_raw.shape[1:]}, "
            f"model '{model_name}' expects {expected}"
        )
    probs = predict_probabilities(model, normalize(x_raw, spec), params.evaluate.batch_size)
    m = classification_metrics(y_test, probs, classes, params.evaluate.calibration_bins)

    metrics = {k: m[k] for k in ("accuracy", "macro_precision", "macro_recall", "macro_f1")}
    metrics |= {k: m[k] for k in ("ece", "nll", "n_test", "errors")}
    metrics_path = layout.eval_metrics(model_name)
    metrics_path.parent.mkdir(parents=True, exist_ok=True)
    metrics_path.write_text(json.dumps(metrics, indent=2) + "\n")
    per_class = [{"class": c, **row} for c, row in m["per_class"].items()]
    layout.per_class_plot(model_name).parent.mkdir(parents=True, exist_ok=True)
    layout.per_class_plot(model_name).write_text(json.dumps(per_class, indent=2) + "\n")
    write_confusion_csv(layout.confusion_csv(model_name), y_test, m["y_pred"], classes)

    report_dir = layout.eval_report_dir(model_name)
    report_dir.mkdir(parents=True, exist_ok=True)
    _save(
        plot_confusion_matrix(m["confusion"], classes, m["accuracy"]), report_dir / REPORT_FILES[0]
    )
    wrong = np.flatnonzero(m["y_pred"] != y_test)
    # Most confident mistakes first: the most telling ones.
    wrong = wrong[np.argsort(-m["confidence"][wrong], kind="stable")][
        : params.evaluate.gallery_size
    ]
    _save(
        plot_gallery(
            x_raw[wrong], [classes[i] for i in y_test[wrong]],
            [classes[i] for i in m["y_pred"][wrong]], m["confidence"][wrong],
        ),
        report_dir / REPORT_FILES[1],
    )  # fmt: skip
    _save(
        plot_learning_curves(_read_learning_curve(layout, model_name)), report_dir / REPORT_FILES[2]
    )
    _save(plot_reliability(m["calibration"], m["ece"]), report_dir / REPORT_FILES[3])

    result = EvalResult(
        model_name=model_name,
        accuracy=m["accuracy"],
        macro_precision=m["macro_precision"],
        macro_recall=m["macro_recall"],
        macro_f1=m["macro_f1"],
        ece=m["ece"],
        nll=m["nll"],
        n_test=m["n_test"],
        errors=m["errors"],
        metrics_path=metrics_path,
        report_dir=report_dir,
    )
    log.info("evaluated %s", result.describe())
    return result


def write_confusion_csv(
    path: Path, y_true: np.ndarray, y_pred: np.ndarray, classes: Sequence[str]
) -> None:
    """``actual,predicted`` with class names, one row per image (DVC confusion template)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["actual", "predicted"])
        writer.writerows((classes[a], classes[p]) for a, p in zip(y_true, y_pred, strict=True))


def _read_learning_curve(layout: Layout, model_name: str) -> list[dict[str, float]]:
    path = layout.learning_curve(model_name)
    try:
        rows = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        log.warning("no learning curve for %s (%s)", model_name, exc)
        return []
    return rows if isinstance(rows, list) else []


# --------------------------------------------------------------------------- plots


def _figure(width: float, height: float) -> Figure:
    # A bare Figure with the Agg canvas: no pyplot, no global backend switch, no display.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: Path) -> None:
    fig.savefig(path, format="png")


def plot_confusion_matrix(cm: np.ndarray, classes: Sequence[str], accuracy: float) -> Figure:
    """Row-normalised heat map (colour) annotated with counts."""
    k = len(classes)
    size = min(max(4.0, 0.5 * k + 2.0), 20.0)
    fig = _figure(size, size)
    ax = fig.add_subplot()
    rows = cm.sum(axis=1, keepdims=True)
    share = np.divide(cm, rows, out=np.zeros(cm.shape), where=rows > 0)
    ax.imshow(share, cmap="Blues", vmin=0.0, vmax=1.0)
    if k <= 30:
        for i in range(k):
            for j in range(k):
                if cm[i, j]:
                    color = "white" if share[i, j] > 0.5 else "black"
                    ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=7, color=color)
    ax.set_xticks(range(k), labels=list(classes), rotation=90 if k > 10 else 0)
    ax.set_yticks(range(k), labels=list(classes))
    ax.set_xlabel("predicted")
    ax.set_ylabel("actual")
    ax.set_title(f"confusion matrix (accuracy {accuracy:.2%})")
    fig.tight_layout()
    return fig


def plot_gallery(
    images: np.ndarray, actual: Sequence[str], predicted: Sequence[str], confidence: np.ndarray
) -> Figure:
    """Grid of uint8 NHWC images titled ``true / pred (confidence)``."""
    n = len(images)
    cols = max(1, min(n, math.ceil(math.sqrt(n))))
    rows = max(1, math.ceil(n / cols))
    fig = _figure(1.6 * cols + 0.4, 1.8 * rows + 0.6)
    if n == 0:
        ax = fig.add_subplot()
        ax.text(0.5, 0.5, "no misclassified test images", ha="center", va="center")
        ax.axis("off")
        return fig
    for i in range(n):
        ax = fig.add_subplot(rows, cols, i + 1)
        img = images[i]
        if img.shape[-1] == 1:
            ax.imshow(img[..., 0], cmap="gray", vmin=0, vmax=255)
        else:
            ax.imshow(img)
        ax.set_title(
            f"true {actual[i]} / pred {predicted[i]}\n{confidence[i]:.0%}", fontsize=8, color="red"
        )
        ax.axis("off")
    fig.suptitle(f"{n} misclassified test images (most confident first)")
    fig.tight_layout()
    return fig


def plot_learning_curves(rows: Sequence[dict[str, float]]) -> Figure:
    """Loss and accuracy per epoch, train and validation."""
    fig = _figure(10, 4)
    if not rows:
        ax = fig.add_subplot()
        ax.text(0.5, 0.5, "no learning curve recorded", ha="center", va="center")
        ax.axis("off")
        return fig
    epochs = [r["epoch"] for r in rows]
    for i, metric in enumerate(("loss", "accuracy")):
        ax = fig.add_subplot(1, 2, i + 1)
        for split in ("train", "val"):
            key = f"{split}_{metric}"
            if all(key in r for r in rows):
                ax.plot(epochs, [r[key] for r in rows], marker="o", label=split)
        ax.set_xlabel("epoch")
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    return fig


def plot_reliability(bins: Sequence[dict[str, float]], ece: float) -> Figure:
    """Accuracy per confidence bin against the diagonal of perfect calibration."""
    fig = _figure(5, 5)
    ax = fig.add_subplot()
    width = bins[0]["upper"] - bins[0]["lower"] if bins else 0.1
    filled = [b for b in bins if b["count"]]
    ax.bar(
        [b["lower"] for b in filled], [b["accuracy"] for b in filled], width=width,
        align="edge", edgecolor="black", alpha=0.7, label="accuracy",
    )  # fmt: skip
    ax.plot([0, 1], [0, 1], linestyle="--", color="gray", label="perfect calibration")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("confidence")
    ax.set_ylabel("accuracy")
    ax.set_title(f"reliability (ECE {ece:.4f})")
    ax.legend(loc="upper left")
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------- compare


def _read_json(path: Path, what: str, fix: str) -> dict[str, Any]:
    if not path.is_file():
        raise ModelError(f"no {what}: {missing_input(path, fix)}")
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelError(f"{path}: not readable JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ModelError(f"{path}: expected a JSON object")
    return data


def select_best(models: dict[str, dict[str, float]]) -> str:
    """Highest validation accuracy; ties go to fewer parameters, then to the name."""
    return min(models, key=lambda m: (-models[m]["val_accuracy"], models[m]["params"], m))


def run_compare(params: Params, layout: Layout) -> CompareResult:
    """Tabulate every model of ``train.models`` and select the best on validation accuracy."""
    models: dict[str, dict[str, float]] = {}
    for name in params.train.models:
        ev = _read_json(
            layout.eval_metrics(name), f"evaluation of '{name}'", f"visionops evaluate {name}"
        )
        tr = _read_json(
            layout.train_metrics(name), f"training metrics of '{name}'", f"visionops train {name}"
        )
        try:
            models[name] = {
                "val_accuracy": float(tr["val_accuracy"]),
                "accuracy": float(ev["accuracy"]),
                "macro_f1": float(ev["macro_f1"]),
                "ece": float(ev["ece"]),
                "params": int(tr["params"]),
                "train_seconds": float(tr["train_seconds"]),
                "images_per_second": float(tr["images_per_second"]),
            }
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelError(f"metrics of '{name}' lack or mistype {exc}") from None
    best = select_best(models)
    out = {
        "best_model": best,
        "selected_by": "val_accuracy (ties: fewer params); test accuracy is reported, not used",
        "models": models,
    }
    layout.comparison_json.parent.mkdir(parents=True, exist_ok=True)
    layout.comparison_json.write_text(json.dumps(out, indent=2) + "\n")
    layout.reports_dir.mkdir(parents=True, exist_ok=True)
    table_path = layout.reports_dir / "models.md"
    table_path.write_text(comparison_markdown(models, best))
    _save(plot_comparison(models, best), layout.reports_dir / "models.png")
    result = CompareResult(best_model=best, models=models, table_path=table_path)
    log.info("%s", result.describe())
    return result


def comparison_markdown(models: dict[str, dict[str, float]], best: str) -> str:
    """The comparison as a markdown table; the selected model in bold."""
    lines = [
        "# Model comparison",
        "",
        "| model | val accuracy | test accuracy | macro F1 | ECE | params | train s | img/s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, m in models.items():
        label = f"**{name}** (selected)" if name == best else name
        lines.append(
            f"| {label} | {m['val_accuracy']:.2%} | {m['accuracy']:.2%} | {m['macro_f1']:.4f} "
            f"| {m['ece']:.4f} | {int(m['params']):,} | {m['train_seconds']:.0f} "
            f"| {m['images_per_second']:.0f} |"
        )
    lines += [
        "",
        "The model is selected on **validation** accuracy (ties: fewer parameters) so that",
        "the test set stays an untouched estimate of the selected model.",
        "",
    ]
    return "\n".join(lines)


def plot_comparison(models: dict[str, dict[str, float]], best: str) -> Figure:
    """Bars of validation and test accuracy per model."""
    fig = _figure(max(5.0, 1.5 * len(models) + 2), 4)
    ax = fig.add_subplot()
    names = list(models)
    x = np.arange(len(names))
    for offset, key, label in ((-0.2, "val_accuracy", "validation"), (0.2, "accuracy", "test")):
        values = [models[n][key] for n in names]
        bars = ax.bar(x + offset, values, width=0.4, label=label)
        ax.bar_label(bars, labels=[f"{v:.2%}" for v in values], fontsize=7)
    lowest = min(min(m["val_accuracy"], m["accuracy"]) for m in models.values())
    ax.set_ylim(max(0.0, lowest - 0.05), 1.0)
    ax.set_xticks(x, labels=[f"{n} *" if n == best else n for n in names])
    ax.set_ylabel("accuracy")
    ax.set_title("accuracy per model (* selected on validation)", fontsize=10)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.1), ncols=2, frameon=False)
    fig.tight_layout()
    return fig
