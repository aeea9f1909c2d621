"""The pipeline's closing report: ``reports/summary.md``, then the MLflow parent run ends.

The summary answers what a person asks after ``make run``: which models were trained and
how good they are, which one was selected and registered, whether the gate promoted it
(and why), and where to look next (reports, metrics, the MLflow UI).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from visionops.config import load_settings
from visionops.errors import DataError

if TYPE_CHECKING:
    from visionops.config import Params
    from visionops.layout import Layout

log = logging.getLogger(__name__)

SUMMARY_FILE = "summary.md"
# Columns of the model table, in order, when the evaluation wrote them.
_METRIC_COLUMNS = ("accuracy", "macro_f1", "ece", "loss")


@dataclass(frozen=True)
class ModelRow:
    model: str
    metrics: dict[str, float]
    selected: bool

    @property
    def accuracy(self) -> float | None:
        return self.metrics.get("accuracy")


@dataclass(frozen=True)
class ReportResult:
    path: Path
    rows: list[ModelRow]
    best_model: str
    model_name: str
    version: str
    promoted: bool
    champion_version: str | None
    reasons: list[str] = field(default_factory=list)
    tracking_uri: str = ""
    parent_run_id: str | None = None

    @property
    def best_accuracy(self) -> float | None:
        return next((r.accuracy for r in self.rows if r.model == self.best_model), None)

    def summary(self) -> dict[str, float]:
        out = {"promoted": float(self.promoted), "models_trained": float(len(self.rows))}
        if self.best_accuracy is not None:
            out["best_test_accuracy"] = self.best_accuracy
        return out

    def describe(self) -> str:
        acc = self.best_accuracy
        acc_text = f"test accuracy {acc:.4f}" if acc is not None else "test accuracy n/a"
        if self.promoted:
            gate = f"promoted to champion ({'; '.join(self.reasons)})"
        else:
            gate = (
                f"NOT promoted, champion stays version {self.champion_version} "
                f"({'; '.join(self.reasons)})"
            )
        return (
            f"best model {self.best_model} ({acc_text}) registered as {self.model_name} "
            f"version {self.version}: {gate}\nsummary: {self.path}"
        )


def _models_in(comparison: dict[str, Any], source: Path) -> list[str]:
    """The compared models: ``models`` (list or mapping) or the table of ``comparison``."""
    models = comparison.get("models")
    if isinstance(models, dict):
        return [str(m) for m in models]
    if isinstance(models, list) and all(isinstance(m, str) for m in models):
        return list(models)
    table = comparison.get("table")
    if isinstance(table, list):
        names = [str(r["model"]) for r in table if isinstance(r, dict) and "model" in r]
        if names:
            return names
    raise DataError(f"{source}: no compared models; run `dvc repro compare`")


def _fmt(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return "—" if value is None else str(value).lower()
    if isinstance(value, float):
        return f"{value:.4f}" if value == 0 or 1e-3 <= abs(value) < 1e4 else f"{value:.3g}"
    return str(value)


def _rel(path: Path, root: Path) -> str:
    try:
        return str(path.relative_to(root))
    except ValueError:
        return str(path)


def render_summary(
    layout: Layout,
    rows: list[ModelRow],
    best: str,
    registration: dict[str, Any],
    gate: dict[str, Any],
    tracking_uri: str,
    data_source: str,
) -> str:
    """The Markdown text of ``reports/summary.md``."""
    root = layout.root
    columns = [c for c in _METRIC_COLUMNS if any(c in r.metrics for r in rows)]
    lines = [
        "# visionops pipeline summary",
        "",
        f"Generated {datetime.now(UTC).isoformat(timespec='seconds')} · data source "
        f"`{data_source}`",
        "",
        "## Models",
        "",
        "| model | " + " | ".join(f"test {c}" for c in columns) + " | selected |",
        "|---|" + "---:|" * len(columns) + ":---:|",
    ]
    for r in rows:
        cells = [_fmt(r.metrics.get(c)) for c in columns]
        lines.append(f"| {r.model} | " + " | ".join(cells) + f" | {'✔' if r.selected else ''} |")
    lines += [
        "",
        f"Selected for export: **{best}**.",
        "",
        "## Registry",
        "",
        f"Registered **{registration.get('name')}** version **{registration.get('version')}** "
        f"(`{registration.get('model_uri')}`, run `{registration.get('run_id')}`), "
        "alias `challenger`.",
        "",
        "## Promotion gate",
        "",
    ]
    before = gate.get("champion_version_before")
    if gate.get("promoted"):
        lines.append(
            f"**Promoted**: version {gate.get('challenger_version')} is the `champion`"
            + (
                f" (was version {before})."
                if before not in (None, gate.get("challenger_version"))
                else "."
            )
        )
    else:
        lines.append(
            f"**Not promoted**: version {gate.get('challenger_version')} stays `challenger`; "
            f"`champion` remains version {before}."
        )
    lines += ["", "Reasons:", ""]
    lines += [f"- {reason}" for reason in gate.get("reasons") or ["(none recorded)"]]
    checks = gate.get("checks") or {}
    if isinstance(checks, dict) and checks:
        lines += ["", "| check | passed | value | threshold |", "|---|:---:|---:|---:|"]
        for name, check in checks.items():
            if isinstance(check, dict):
                lines.append(
                    f"| {name} | {'✔' if check.get('passed') else '✘'} | "
                    f"{_fmt(check.get('value'))} | {_fmt(check.get('threshold'))} |"
                )
    figures = [
        layout.reports_dir / "models.md",
        layout.reports_dir / "models.png",
        *(layout.eval_report_dir(r.model) for r in rows),
        layout.comparison_json,
        layout.gate_report,
        layout.registration_json,
        layout.export_dir / "model.onnx",
        layout.export_dir / "metadata.json",
    ]
    lines += ["", "## Where to look", ""]
    lines += [f"- `{_rel(p, root)}`" for p in figures if p.exists()]
    lines += [
        f"- TensorBoard: `tensorboard --logdir {_rel(layout.tensorboard_dir, root)}`",
        "- DVC: `dvc metrics show`, `dvc plots show`",
        "",
        "## MLflow",
        "",
    ]
    if tracking_uri.startswith(("http://", "https://")):
        lines.append(f"Open {tracking_uri} in a browser.")
    else:
        lines += [
            "```",
            f"mlflow ui --backend-store-uri {tracking_uri}",
            "```",
            "",
            "then open http://127.0.0.1:5000.",
        ]
    return "\n".join(lines) + "\n"


def run_report(params: Params, layout: Layout) -> ReportResult:
    """Write ``reports/summary.md``, log it to the parent run and end that run (FINISHED)."""
    from visionops import registry
    from visionops.artifacts import numeric_metrics, read_json

    comparison = read_json(layout.comparison_json, "visionops compare")
    registration = read_json(layout.registration_json, "visionops register")
    gate = read_json(layout.gate_report, "visionops gate")
    best = comparison.get("best_model")
    if not isinstance(best, str) or not best:
        raise DataError(f"{layout.comparison_json}: no 'best_model' (got {best!r})")
    rows = []
    for model in _models_in(comparison, layout.comparison_json):
        metrics = read_json(layout.eval_metrics(model), f"visionops evaluate {model}")
        rows.append(ModelRow(model, numeric_metrics(metrics), selected=model == best))

    settings = load_settings(layout.root)
    tracking_uri = registry.display_uri(settings.tracking_uri)
    text = render_summary(layout, rows, best, registration, gate, tracking_uri, params.data.source)
    path = layout.reports_dir / SUMMARY_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)

    with registry.stage_run("report", params, layout) as tracker:
        tracker.log_artifact(path)
        tracker.log_parent_artifact(path)
        parent_id = tracker.parent_run_id
    registry.end_pipeline_run(layout, "FINISHED", run_id=parent_id)

    before = gate.get("champion_version_before")
    promoted = bool(gate.get("promoted"))
    champion = gate.get("challenger_version") if promoted else before
    result = ReportResult(
        path=path,
        rows=rows,
        best_model=best,
        model_name=str(registration.get("name")),
        version=str(registration.get("version")),
        promoted=promoted,
        champion_version=None if champion is None else str(champion),
        reasons=[str(r) for r in gate.get("reasons") or []],
        tracking_uri=tracking_uri,
        parent_run_id=parent_id,
    )
    log.info("wrote %s", path)
    return result
