"""The pull-request report: this workspace's metrics, params and plots against a base.

``visionops report compare --base REF`` reads only the small files the DVC pipeline
writes (``metrics/``, ``plots/``, ``params.yaml``), never models or data, so the base
needs no retraining: its files (a :class:`~visionops.snapshot.Snapshot`) come from a git
ref (committed by the PR flow with ``git add dvc.lock metrics plots params.yaml``),
another workspace folder, or a metrics file (``dvc metrics show --json > base.json``).

The report is Markdown for a PR comment (``cml comment create``): the selected model's
headline, every metric with base, new and delta marked better or worse by the metric's
direction, per-class results, the changed params, the gate's decision, the model
comparison table (rebuilt from the train and eval metrics with compare's rule), and
confusion matrices and learning curves side by side, rendered into image files next to
the report from each side's plot data (so both sides look alike).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from visionops.errors import DataError
from visionops.layout import Layout
from visionops.snapshot import (
    CONFUSION_GLOB,
    CURVE_GLOB,
    EVAL_GLOB,
    GATE_FILE,
    PER_CLASS_GLOB,
    TRAIN_GLOB,
    Snapshot,
    flatten_numbers,
    load_base,
    snapshot_from_directory,
)

log = logging.getLogger(__name__)

Direction = Literal["higher", "lower"]
Verdict = Literal["better", "worse", "same", "changed", "added", "removed"]

COMMIT_HINT = "git add dvc.lock metrics plots params.yaml"

_VERDICT_MARK = {
    "better": "🟢 better",
    "worse": "🔴 worse",
    "same": "same",
    "changed": "changed",
    "added": "new",
    "removed": "removed",
}
# Leaf-name tokens that say which way is better.
_HIGHER_TOKENS = {"accuracy", "f1", "precision", "recall", "auc", "throughput"}
_LOWER_TOKENS = {"ece", "nll", "loss", "latency", "seconds", "ms", "errors", "parity", "error"}


# --------------------------------------------------------------------------- metrics


def metric_direction(name: str) -> Direction | None:
    """Which way a metric improves, from its (leaf) name; None when it is not a score.

    ``accuracy``, ``f1``, ``precision``, ``recall`` and ``*_per_second`` go up;
    ``ece``, ``nll``, ``loss``, ``latency``, ``*_seconds``, ``*_ms`` and ``errors`` go
    down; counts, epochs, parameter counts and p-values have no direction.
    """
    leaf = name.rsplit(".", 1)[-1].lower()
    if "per_second" in leaf:
        return "higher"
    tokens = set(leaf.split("_"))
    if tokens & _HIGHER_TOKENS:
        return "higher"
    if tokens & _LOWER_TOKENS:
        return "lower"
    return None


@dataclass(frozen=True)
class MetricDelta:
    """One metric on both sides."""

    source: str  # eval | train | gate
    model: str | None
    metric: str
    base: float | None
    new: float | None

    @property
    def direction(self) -> Direction | None:
        return metric_direction(self.metric)

    @property
    def delta(self) -> float | None:
        if self.base is None or self.new is None:
            return None
        return self.new - self.base

    @property
    def verdict(self) -> Verdict:
        if self.base is None:
            return "added"
        if self.new is None:
            return "removed"
        delta = self.new - self.base
        if delta == 0 or math.isclose(self.new, self.base, rel_tol=1e-12, abs_tol=1e-15):
            return "same"
        if self.direction is None:
            return "changed"
        improved = delta > 0 if self.direction == "higher" else delta < 0
        return "better" if improved else "worse"


def flatten_params(obj: Any, prefix: str = "") -> dict[str, Any]:
    """Every leaf of a params mapping under dotted keys (lists are leaves)."""
    out: dict[str, Any] = {}
    if isinstance(obj, Mapping):
        for key, value in obj.items():
            name = f"{prefix}.{key}" if prefix else str(key)
            out.update(flatten_params(value, name))
    else:
        out[prefix] = obj
    return out


# --------------------------------------------------------------------------- comparison


def _model_order(base: Snapshot, new: Snapshot) -> list[str]:
    names: list[str] = []
    best = new.best_model() or base.best_model()
    if best:
        names.append(best)
    for snap in (new, base):
        for pattern in (EVAL_GLOB, TRAIN_GLOB, CURVE_GLOB, CONFUSION_GLOB, PER_CLASS_GLOB):
            names += [m for m in snap.matching(pattern) if m not in names]
    return names


def _gate_numbers(gate: Any) -> dict[str, float]:
    # Version numbers are identifiers, not metrics.
    return {k: v for k, v in flatten_numbers(gate).items() if "version" not in k}


def _per_class(rows: Any) -> dict[str, float]:
    """``per_class.<class>.<field>`` numbers of a per-class plot file (rows by class)."""
    if not isinstance(rows, list):
        return {}
    by_class = {str(r["class"]): r for r in rows if isinstance(r, dict) and "class" in r}
    return flatten_numbers({"per_class": by_class})


def metric_deltas(base: Snapshot, new: Snapshot) -> list[MetricDelta]:
    """Every metric of the eval, train and gate files on both sides, models in order."""
    rows: list[MetricDelta] = []
    models = _model_order(base, new)
    for source, pattern in (("eval", EVAL_GLOB), ("train", TRAIN_GLOB)):
        base_files, new_files = base.matching(pattern), new.matching(pattern)
        for model in models:
            if model not in base_files and model not in new_files:
                continue
            b = flatten_numbers(base_files.get(model) or {})
            n = flatten_numbers(new_files.get(model) or {})
            if source == "eval":
                b |= _per_class(base.matching(PER_CLASS_GLOB).get(model))
                n |= _per_class(new.matching(PER_CLASS_GLOB).get(model))
            for name in list(n) + [k for k in b if k not in n]:
                rows.append(MetricDelta(source, model, name, b.get(name), n.get(name)))
    b, n = _gate_numbers(base.get(GATE_FILE)), _gate_numbers(new.get(GATE_FILE))
    for name in list(n) + [k for k in b if k not in n]:
        rows.append(MetricDelta("gate", None, name, b.get(name), n.get(name)))
    return rows


@dataclass(frozen=True)
class ParamChange:
    key: str
    base: Any
    new: Any
    status: Literal["changed", "added", "removed"]


_MISSING = object()


def param_changes(base: Snapshot, new: Snapshot) -> list[ParamChange] | None:
    """Changed, added and removed params (dotted keys); None when a side has no params."""
    b_raw, n_raw = base.params(), new.params()
    if b_raw is None or n_raw is None:
        return None
    b, n = flatten_params(b_raw), flatten_params(n_raw)
    changes = []
    for key in list(n) + [k for k in b if k not in n]:
        old, cur = b.get(key, _MISSING), n.get(key, _MISSING)
        if old is _MISSING:
            changes.append(ParamChange(key, None, cur, "added"))
        elif cur is _MISSING:
            changes.append(ParamChange(key, old, None, "removed"))
        elif old != cur:
            changes.append(ParamChange(key, old, cur, "changed"))
    return changes


# --------------------------------------------------------------------------- plots


def _class_order(labels: Iterable[str]) -> list[str]:
    unique = set(labels)
    if all(label.lstrip("-").isdigit() for label in unique):
        return sorted(unique, key=int)
    return sorted(unique)


def confusion_from_csv(text: str, classes: list[str] | None = None) -> tuple[Any, list[str]]:
    """``(K, K)`` counts and class names from DVC's ``actual,predicted`` CSV."""
    import numpy as np

    rows = list(csv.DictReader(io.StringIO(text)))
    if rows and not {"actual", "predicted"} <= set(rows[0]):
        raise DataError(f"confusion CSV needs 'actual' and 'predicted' columns, got {rows[0]}")
    pairs = [(r["actual"], r["predicted"]) for r in rows]
    names = classes or _class_order(label for pair in pairs for label in pair)
    index = {name: i for i, name in enumerate(names)}
    cm = np.zeros((len(names), len(names)), dtype=np.int64)
    for actual, predicted in pairs:
        cm[index[actual], index[predicted]] += 1
    return cm, names


def _render_confusion(text: str, classes: list[str], path: Path) -> None:
    from visionops.evaluate import plot_confusion_matrix

    cm, names = confusion_from_csv(text, classes)
    total = int(cm.sum())
    accuracy = float(cm.trace()) / total if total else 0.0
    plot_confusion_matrix(cm, names, accuracy).savefig(path, format="png")


def _render_curves(rows: Any, path: Path) -> None:
    from visionops.evaluate import plot_learning_curves

    rows = rows if isinstance(rows, list) else []
    plot_learning_curves([r for r in rows if isinstance(r, dict) and "epoch" in r]).savefig(
        path, format="png"
    )


@dataclass(frozen=True)
class PlotPair:
    """One plot kind of one model: the image of each side (None: no data on that side)."""

    model: str
    kind: Literal["confusion matrix", "learning curves"]
    base: Path | None
    new: Path | None


def render_plots(base: Snapshot, new: Snapshot, images_dir: Path) -> list[PlotPair]:
    """Confusion matrices and learning curves of both sides as PNG files in ``images_dir``."""
    images_dir.mkdir(parents=True, exist_ok=True)
    pairs: list[PlotPair] = []
    for model in _model_order(base, new):
        csvs = {side: snap.matching(CONFUSION_GLOB).get(model) for side, snap in _sides(base, new)}
        # One class order for both sides, so the matrices line up.
        classes = _class_order(
            label
            for text in csvs.values()
            if isinstance(text, str)
            for row in csv.DictReader(io.StringIO(text))
            for label in (row.get("actual"), row.get("predicted"))
            if label is not None
        )
        confusion: dict[str, Path | None] = {"base": None, "new": None}
        for side, text in csvs.items():
            if isinstance(text, str):
                path = images_dir / f"{model}-confusion-{side}.png"
                _render_confusion(text, classes, path)
                confusion[side] = path
        if any(confusion.values()):
            pairs.append(PlotPair(model, "confusion matrix", confusion["base"], confusion["new"]))
        curves: dict[str, Path | None] = {"base": None, "new": None}
        for side, snap in _sides(base, new):
            rows = snap.matching(CURVE_GLOB).get(model)
            if rows is not None:
                path = images_dir / f"{model}-learning-curves-{side}.png"
                _render_curves(rows, path)
                curves[side] = path
        if any(curves.values()):
            pairs.append(PlotPair(model, "learning curves", curves["base"], curves["new"]))
    return pairs


def _sides(base: Snapshot, new: Snapshot) -> list[tuple[str, Snapshot]]:
    return [("base", base), ("new", new)]


# --------------------------------------------------------------------------- markdown


def _fmt(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        if value.is_integer() and (abs(value) >= 1 or value == 0):
            return f"{int(value):,}"
        if abs(value) >= 100:
            return f"{value:,.1f}"
        if abs(value) >= 10:
            return f"{value:.2f}"
        if value == 0 or abs(value) >= 1e-3:
            return f"{value:.4f}"
        return f"{value:.3g}"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, list | dict):
        return "`" + json.dumps(value) + "`"
    return f"`{value}`"


def _fmt_param(value: Any, present: bool = True) -> str:
    """A params value as written in params.yaml: ``0.003``, ``mnist``, ``null``, ``[...]``."""
    if not present:
        return "—"
    text = value if isinstance(value, str) else json.dumps(value)
    return f"`{text}`"


def _fmt_delta(row: MetricDelta) -> str:
    delta = row.delta
    if delta is None or row.verdict == "same":
        return ""
    if row.base is not None and row.base.is_integer() and delta.is_integer():
        text = f"{int(delta):+,}"
    elif abs(delta) >= 100:
        text = f"{delta:+,.1f}"
    elif abs(delta) >= 1:
        text = f"{delta:+.2f}"
    elif abs(delta) >= 5e-5:
        text = f"{delta:+.4f}"
    else:
        text = f"{delta:+.2g}"
    if row.base and delta:
        relative = delta / abs(row.base)
        text += f" ({relative:+.1%})" if abs(relative) >= 0.001 else f" ({relative:+.2%})"
    return text


def _metric_row(row: MetricDelta) -> str:
    return (
        f"| {row.model or ''} | {row.source} | {row.metric} | {_fmt(row.base)} | "
        f"{_fmt(row.new)} | {_fmt_delta(row)} | {_VERDICT_MARK[row.verdict]} |"
    )


_METRIC_HEADER = [
    "| model | file | metric | base | new | Δ | |",
    "|---|---|---|---:|---:|---:|---|",
]


def _link(path: Path, report_dir: Path, alt: str) -> str:
    rel = Path(os.path.relpath(path, report_dir)).as_posix()
    return f"![{alt}]({rel})"


def _gate_lines(gate: Any, base_gate: Any) -> list[str]:
    if not isinstance(gate, dict):
        return ["No gate decision in this workspace (`metrics/gate.json` missing)."]
    champion = gate.get("champion_version_before")
    if gate.get("promoted"):
        head = f"**Promoted**: version {gate.get('challenger_version')} is now `champion`"
        head += f" (was version {champion})." if champion is not None else "."
    else:
        head = (
            f"**Not promoted**: version {gate.get('challenger_version')} stays `challenger`; "
            f"`champion` remains version {champion}."
        )
    if gate.get("forced"):
        head += " (forced)"
    lines = [head, ""]
    lines += [f"- {reason}" for reason in gate.get("reasons") or ["(no reasons recorded)"]]
    checks = gate.get("checks")
    if isinstance(checks, dict) and checks:
        lines += ["", "| check | passed | value | threshold |", "|---|:---:|---:|---:|"]
        for name, check in checks.items():
            if isinstance(check, dict):
                lines.append(
                    f"| {name} | {'✔' if check.get('passed') else '✘'} | "
                    f"{_fmt(check.get('value'))} | {_fmt(check.get('threshold'))} |"
                )
    if isinstance(base_gate, dict):
        lines += [
            "",
            "Base: "
            + ("promoted" if base_gate.get("promoted") else "not promoted")
            + f" (version {base_gate.get('challenger_version')}).",
        ]
    return lines


_COMPARISON_COLUMNS = (
    ("val_accuracy", "val accuracy", True),
    ("accuracy", "test accuracy", True),
    ("macro_f1", "macro F1", False),
    ("ece", "ECE", False),
    ("params", "params", False),
    ("train_seconds", "train s", False),
    ("images_per_second", "img/s", False),
)


def _cell(value: Any, percent: bool) -> str:
    if not isinstance(value, int | float) or isinstance(value, bool):
        return "—"
    if percent:
        return f"{value:.2%}"
    if float(value).is_integer() or abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:.1f}" if abs(value) >= 10 else f"{value:.4f}"


def _comparison_lines(base: Snapshot, new: Snapshot) -> list[str]:
    tables = {side: snap.comparison() for side, snap in _sides(base, new)}
    if not tables["base"] and not tables["new"]:
        return ["No model with both train and eval metrics on either side."]
    best = {"base": base.best_model(), "new": new.best_model()}
    header = "| model | " + " | ".join(c[1] for c in _COMPARISON_COLUMNS) + " |"
    lines = [
        "Each cell is base → new; ✔ marks the model selected for export (on validation accuracy).",
        "",
        header,
        "|---|" + "---:|" * len(_COMPARISON_COLUMNS),
    ]
    names = list(tables["new"]) + [m for m in tables["base"] if m not in tables["new"]]
    for name in names:
        b, n = tables["base"].get(name) or {}, tables["new"].get(name) or {}
        chosen = (best["base"] == name, best["new"] == name)
        marks = {(True, True): " ✔", (False, True): " ✔ (new)", (True, False): " ✔ (base)"}
        mark = marks.get(chosen, "")
        cells = [
            f"{_cell(b.get(key), pct)} → {_cell(n.get(key), pct)}"
            for key, _, pct in _COMPARISON_COLUMNS
        ]
        lines.append(f"| {name}{mark} | " + " | ".join(cells) + " |")
    lines += ["", f"Selected model: base **{best['base'] or '—'}**, new **{best['new'] or '—'}**."]
    return lines


def _headline(rows: list[MetricDelta], base: Snapshot, new: Snapshot) -> str:
    best = new.best_model() or base.best_model()
    row = next(
        (r for r in rows if r.source == "eval" and r.model == best and r.metric == "accuracy"),
        None,
    )
    if row is None or row.new is None:
        return "No test accuracy of a selected model in this workspace."
    if row.base is None:
        return f"Test accuracy of the selected model **{best}**: **{row.new:.2%}** (no base)."
    return (
        f"Test accuracy of the selected model **{best}**: {row.base:.2%} → "
        f"**{row.new:.2%}** ({(row.new - row.base) * 100:+.2f} pp, "
        f"{_VERDICT_MARK[row.verdict]})."
    )


def render_markdown(
    base: Snapshot,
    new: Snapshot,
    rows: list[MetricDelta],
    params: list[ParamChange] | None,
    plots: list[PlotPair],
    report_dir: Path,
    title: str,
) -> str:
    """The report's Markdown; image links are relative to ``report_dir``."""
    # Per-class metrics go into a collapsed table: the main table stays readable.
    main = [r for r in rows if not r.metric.startswith("per_class.")]
    per_class = [r for r in rows if r.metric.startswith("per_class.")]
    counts = {v: sum(1 for r in main if r.verdict == v) for v in _VERDICT_MARK}
    base_name = f"`{base.label}`"
    kind = {"git": "git ref", "directory": "folder", "metrics-file": "metrics file"}[base.kind]
    lines = [f"# {title}", ""]
    lines += [
        f"This workspace compared with {base_name} ({kind}).",
        "",
        _headline(rows, base, new),
        "",
        f"Metrics: {counts['better']} better, {counts['worse']} worse, {counts['same']} "
        f"unchanged, {counts['changed']} changed without a direction"
        + (f", {counts['added']} new" if counts["added"] else "")
        + (f", {counts['removed']} removed" if counts["removed"] else "")
        + f"; {len(params) if params is not None else 'unknown number of'} params changed.",
        "",
    ]
    if not base.has_metrics:
        lines += [
            f"> **Note:** {base_name} holds no pipeline metrics, so there is nothing to compare "
            "with. The PR flow commits them after `dvc repro`: "
            f"`{COMMIT_HINT}`.",
            "",
        ]
    lines += ["## Metrics", "", *_METRIC_HEADER, *(_metric_row(r) for r in main), ""]
    if per_class:
        moved = sum(1 for r in per_class if r.verdict not in ("same",))
        lines += [
            "<details>",
            f"<summary>Per-class metrics ({len(per_class)}, {moved} changed)</summary>",
            "",
            *_METRIC_HEADER,
            *(_metric_row(r) for r in per_class),
            "",
            "</details>",
            "",
        ]
    lines += ["## Params", ""]
    if params is None:
        lines.append("Params not compared: `params.yaml` is missing on one side.")
    elif not params:
        lines.append("No params changed.")
    else:
        lines += ["| param | base | new |", "|---|---|---|"]
        lines += [
            f"| {p.key} | {_fmt_param(p.base, p.status != 'added')} | "
            f"{_fmt_param(p.new, p.status != 'removed')} |"
            for p in params
        ]
    lines += ["", "## Promotion gate", "", *_gate_lines(new.gate(), base.gate())]
    lines += ["", "## Models", "", *_comparison_lines(base, new), ""]
    lines += ["## Plots", ""]
    if not plots:
        lines.append("No plot data (`plots/`) on either side.")
    models = list(dict.fromkeys(p.model for p in plots))
    for model in models:
        lines += [f"### {model}", "", f"| base ({base_name}) | new |", "|---|---|"]
        for pair in (p for p in plots if p.model == model):
            cells = [
                _link(path, report_dir, f"{model} {pair.kind}, {side}") if path else "(no data)"
                for side, path in (("base", pair.base), ("new", pair.new))
            ]
            lines.append(f"| {cells[0]} | {cells[1]} |")
        lines.append("")
    lines += [
        "---",
        "",
        f"Generated by `visionops report compare --base {base.label}` from the DVC metrics "
        "and plots files (`metrics/`, `plots/`, `params.yaml`).",
        "",
    ]
    return "\n".join(lines)


# --------------------------------------------------------------------------- entry point


@dataclass(frozen=True)
class CompareReportResult:
    path: Path
    images: list[Path]
    rows: list[MetricDelta]
    params: list[ParamChange] | None
    base_label: str

    def count(self, verdict: Verdict) -> int:
        """Metrics with this verdict, per-class metrics left out (as in the report's summary)."""
        return sum(
            1 for r in self.rows if r.verdict == verdict and not r.metric.startswith("per_class.")
        )

    def summary(self) -> dict[str, float]:
        return {
            "metrics_better": float(self.count("better")),
            "metrics_worse": float(self.count("worse")),
            "params_changed": float(len(self.params or [])),
        }

    def describe(self) -> str:
        return (
            f"compared with {self.base_label}: {self.count('better')} metrics better, "
            f"{self.count('worse')} worse, {len(self.params or [])} params changed; "
            f"{len(self.images)} images -> {self.path}"
        )


def default_images_dir(out: Path) -> Path:
    """``reports/compare.md`` -> ``reports/compare-img/``: beside the report."""
    return out.with_name(f"{out.stem}-img")


def run_compare_report(
    layout: Layout,
    base: str = "main",
    out: Path | None = None,
    images_dir: Path | None = None,
    title: str = "Model report",
) -> CompareReportResult:
    """Compare ``layout.root``'s metrics, params and plots with ``base``; write the report.

    ``base`` is a folder, a JSON metrics file, or a git ref of the repository holding
    ``layout.root``. Images go to ``images_dir`` (default: ``<report stem>-img/`` beside
    the report) and are linked relatively.
    """
    root = layout.root.resolve()
    new = snapshot_from_directory(root, label="workspace")
    if not new.has_metrics:
        raise DataError(
            f"{root / 'metrics'}: no pipeline metrics in this workspace: run `dvc repro` "
            "(or `make run`) first"
        )
    base_snap = load_base(base, root)
    out = (out or layout.reports_dir / "compare.md").resolve()
    images_dir = (images_dir or default_images_dir(out)).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)

    rows = metric_deltas(base_snap, new)
    params = param_changes(base_snap, new)
    plots = render_plots(base_snap, new, images_dir)
    out.write_text(render_markdown(base_snap, new, rows, params, plots, out.parent, title))
    images = [p for pair in plots for p in (pair.base, pair.new) if p is not None]
    result = CompareReportResult(out, images, rows, params, base_snap.label)
    log.info("%s", result.describe())
    return result
