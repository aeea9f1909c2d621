"""The monitoring report: one self-contained HTML page (``visionops monitor report`` and
``GET /monitoring``).

Sections: the verdict at both levels — the alarm (a risk to performance: estimated
accuracy, rejected inputs, realised accuracy from feedback) and data drift (a warning) —
and every test; reference-vs-current distributions of each
statistic, the confidence, the predicted classes and the embeddings (a PCA map); the
drift score over time (consecutive windows of the log); the most atypical recent inputs
(farthest from the reference in embedding space, and least confident); the served
model's accuracy on labelled feedback. Plots are matplotlib PNGs embedded as base64
``data:`` URIs; there is no script and nothing is fetched from anywhere.
"""

from __future__ import annotations

import base64
import html
import io
import logging
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy.engine import Engine

from visionops.monitor.drift import DriftReport, DriftTest, detect_drift
from visionops.monitor.feedback import FeedbackAccuracy, feedback_accuracy
from visionops.monitor.performance import PerformanceReport, atypicality
from visionops.monitor.reference import ReferenceProfile
from visionops.monitor.stats import STAT_DESCRIPTIONS
from visionops.monitor.verdict import MonitoringVerdict, assess_window
from visionops.monitor.window import (
    MIN_WINDOW_ROWS,
    InsufficientDataError,
    Window,
    load_window,
)
from visionops.serve.predlog import create_predlog_engine, safe_url

log = logging.getLogger(__name__)

_BASE64 = re.compile(r"^[A-Za-z0-9+/]+={0,2}$")
REF_COLOR, CUR_COLOR, ALARM_COLOR = "#8c8c8c", "#1f77b4", "#d62728"

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2rem auto;
max-width:1100px;padding:0 1rem;color:#222;line-height:1.45}
h1{margin-bottom:.2rem}h2{border-bottom:1px solid #ddd;padding-bottom:.2rem;margin-top:2.2rem}
.muted{color:#666}.verdict{font-size:1.2rem;padding:.7rem 1rem;border-radius:6px}
.drift{background:#fde8e8;border:1px solid #d62728}.ok{background:#e8f6ea;border:1px solid #2ca02c}
.warn{background:#fff6e0;border:1px solid #d89a00}
table{border-collapse:collapse;margin:.6rem 0;font-size:.92rem}
th,td{border:1px solid #ddd;padding:.3rem .55rem;text-align:left;vertical-align:top}
th{background:#f6f6f6}td.num{text-align:right;font-variant-numeric:tabular-nums}
tr.alarm td{background:#fff3f3}img.plot{max-width:100%;height:auto}
img.thumb{width:56px;height:56px;image-rendering:pixelated;background:#000}
ul.notes li{color:#8a5300}
"""


@dataclass(frozen=True)
class MonitoringReportResult:
    path: Path | None
    verdict: MonitoringVerdict
    html_bytes: int
    timeline_windows: int

    @property
    def drift(self) -> DriftReport:
        return self.verdict.drift

    def summary(self) -> dict[str, float]:
        return {**self.verdict.summary(), "report_bytes": float(self.html_bytes)}

    def describe(self) -> str:
        where = f" written to {self.path}" if self.path else ""
        return f"monitoring report{where}: {self.verdict.describe()}"


# --------------------------------------------------------------------------- plots


def _png_uri(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _figure(width: float, height: float) -> Any:
    # Figure directly, not pyplot: no global state, safe in the server's worker threads.
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height))


def _img(uri: str, alt: str) -> str:
    return f'<img class="plot" src="{uri}" alt="{html.escape(alt)}">'


def plot_distributions(
    reference: ReferenceProfile, window: Window, tests: dict[str, DriftTest]
) -> str:
    """Histograms of every compared statistic and the confidence, reference vs current."""
    names = [n for n in reference.stats if n in window.stats] + ["confidence"]
    cols = 3
    rows = (len(names) + cols - 1) // cols
    fig = _figure(4.0 * cols, 2.7 * rows)
    for i, name in enumerate(names):
        ax = fig.add_subplot(rows, cols, i + 1)
        ref = reference.confidence if name == "confidence" else reference.stats[name]
        cur = window.confidence if name == "confidence" else window.stats[name]
        cur = cur[np.isfinite(cur)]
        if len(cur) == 0:
            continue
        lo, hi = float(min(ref.min(), cur.min())), float(max(ref.max(), cur.max()))
        integer = np.allclose(ref, np.round(ref)) and np.allclose(cur, np.round(cur))
        if integer and hi - lo <= 60:
            bins: Any = np.arange(lo - 0.5, hi + 1.5)
        else:
            bins = np.linspace(lo, hi if hi > lo else lo + 1e-6, 31)
        ax.hist(ref, bins=bins, density=True, alpha=0.55, color=REF_COLOR, label="reference")
        test = tests.get(name)
        color = ALARM_COLOR if test and test.drift else CUR_COLOR
        ax.hist(cur, bins=bins, density=True, histtype="step", lw=2, color=color, label="current")
        p = f"p={test.p_value:.2g}" if test and test.p_value is not None else ""
        ax.set_title(
            f"{name} {p}{' DRIFT' if test and test.drift else ''}", fontsize=10, color=color
        )
        ax.tick_params(labelsize=8)
        ax.set_yticks([])
        if i == 0:
            ax.legend(fontsize=8)
    fig.tight_layout()
    return _png_uri(fig)


def plot_classes(reference: ReferenceProfile, window: Window, test: DriftTest | None) -> str:
    classes = list(reference.classes)
    ref = reference.class_distribution
    counts = np.zeros(len(classes))
    index = {c: i for i, c in enumerate(classes)}
    for label in window.labels:
        if label in index:
            counts[index[label]] += 1
    cur = counts / max(len(window.labels), 1)
    fig = _figure(min(1.0 + 0.55 * len(classes), 12.0), 3.0)
    ax = fig.add_subplot(1, 1, 1)
    x = np.arange(len(classes))
    ax.bar(x - 0.2, ref, 0.4, color=REF_COLOR, label="reference")
    color = ALARM_COLOR if test and test.drift else CUR_COLOR
    ax.bar(x + 0.2, cur, 0.4, color=color, label="current")
    ax.set_xticks(x, [c[:12] for c in classes], fontsize=8)
    ax.set_ylabel("share of predictions")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _png_uri(fig)


def plot_embeddings(
    reference: ReferenceProfile, window: Window, highlight: np.ndarray
) -> str | None:
    """Reference and current embeddings on the reference's first two principal axes."""
    ref = reference.embeddings.astype(np.float64)
    cur = window.embeddings.astype(np.float64)
    if len(ref) < 3 or len(cur) == 0 or cur.shape[1] != ref.shape[1]:
        return None
    mean = ref.mean(axis=0)
    _, _, vt = np.linalg.svd(ref - mean, full_matrices=False)
    axes = vt[:2].T
    pr, pc = (ref - mean) @ axes, (cur - mean) @ axes
    fig = _figure(5.5, 4.2)
    ax = fig.add_subplot(1, 1, 1)
    ax.scatter(pr[:, 0], pr[:, 1], s=6, c=REF_COLOR, alpha=0.45, label="reference")
    ax.scatter(pc[:, 0], pc[:, 1], s=8, c=CUR_COLOR, alpha=0.7, label="current")
    row_to_emb = {int(r): i for i, r in enumerate(window.embedding_rows)}
    pos = np.asarray([row_to_emb[int(r)] for r in highlight if int(r) in row_to_emb], dtype=int)
    if len(pos):
        ax.scatter(
            pc[pos, 0],
            pc[pos, 1],
            s=60,
            facecolors="none",
            edgecolors=ALARM_COLOR,
            lw=1.5,
            label="most atypical",
        )
    ax.set_xlabel("principal axis 1")
    ax.set_ylabel("principal axis 2")
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    return _png_uri(fig)


@dataclass(frozen=True)
class TimelinePoint:
    end: datetime | None
    last_id: int
    size: int
    score: float
    drift: bool
    scores: dict[str, float]


def drift_timeline(
    reference: ReferenceProfile,
    history: Window,
    size: int,
    max_windows: int,
    permutations: int = 200,
) -> list[TimelinePoint]:
    """Drift on consecutive windows of ``size`` rows, newest last (at most ``max_windows``)."""
    points = []
    ends = list(range(history.size, size - 1, -size))[:max_windows]
    for end in reversed(ends):
        part = history.slice(end - size, end)
        rep = detect_drift(reference, part, permutations=permutations, seed=end)
        points.append(
            TimelinePoint(
                end=part.end,
                last_id=int(part.ids[-1]),
                size=part.size,
                score=rep.drift_score,
                drift=rep.drift_detected,
                scores={t.name: t.score for t in rep.tests},
            )
        )
    return points


def plot_timeline(points: list[TimelinePoint]) -> str:
    fig = _figure(10.0, 3.6)
    ax = fig.add_subplot(1, 1, 1)
    x = np.arange(len(points))
    names = sorted({n for p in points for n in p.scores})
    for name in names:
        ax.plot(x, [p.scores.get(name, np.nan) for p in points], lw=1, alpha=0.6, label=name)
    ax.plot(
        x, [p.score for p in points], color="black", lw=2.2, marker="o", label="drift score (max)"
    )
    alarms = [i for i, p in enumerate(points) if p.drift]
    ax.scatter(alarms, [points[i].score for i in alarms], s=90, color=ALARM_COLOR, zorder=5)
    ax.axhline(1.0, color=ALARM_COLOR, ls="--", lw=1, label="threshold")
    ax.set_yscale("symlog", linthresh=1.0)
    ax.set_ylim(bottom=0.0)
    labels = [p.end.strftime("%m-%d %H:%M:%S") if p.end else str(p.last_id) for p in points]
    step = max(1, len(points) // 8)
    ax.set_xticks(x[::step], labels[::step], fontsize=7, rotation=20)
    ax.set_ylabel("score (≥ 1: drift)")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    return _png_uri(fig)


# --------------------------------------------------------------------------- html


def _e(value: Any) -> str:
    return html.escape(str(value))


def _num(value: float | None, digits: int = 3) -> str:
    if value is None or not np.isfinite(value):
        return "—"
    return f"{value:.{digits}g}"


def _share(value: float) -> str:
    return "—" if not np.isfinite(value) else f"{value:.2f}"


def _tests_table(report: DriftReport) -> str:
    rows = []
    for t in report.tests:
        cls = ' class="alarm"' if t.drift else ""
        result = "DRIFT" if t.drift else ("small effect" if t.significant else "ok")
        rows.append(
            f"<tr{cls}><td>{_e(t.name)}</td><td>{_e(t.method)}</td>"
            f'<td class="num">{_num(t.statistic)}</td><td class="num">{_num(t.p_value, 2)}</td>'
            f'<td class="num">{_num(t.threshold, 2)}</td>'
            f'<td class="num">{_num(t.effect)}</td><td class="num">{_num(t.min_effect)}</td>'
            f"<td>{result}</td><td>{_e(t.verdict)}</td></tr>"
        )
    return (
        "<table><tr><th>test</th><th>method</th><th>statistic</th><th>p-value</th>"
        "<th>threshold</th><th>effect</th><th>min effect</th><th>result</th><th>verdict</th>"
        "</tr>" + "".join(rows) + "</table>"
    )


def _pct(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.1f} %"


def _performance_section(perf: PerformanceReport) -> str:
    """The alarm level: estimated vs realised accuracy and the rejected share."""
    est, real, rej = perf.estimated, perf.realised, perf.rejected
    rows = [
        "<tr><th>signal</th><th>current window</th><th>95 % interval</th><th>reference</th></tr>",
        f'<tr id="estimated-accuracy"><td>estimated accuracy ({est.method}, no labels; '
        f"mean confidence {_pct(est.cbpe)})</td>"
        f'<td class="num">{_pct(est.value)}</td>'
        f'<td class="num">{_pct(est.low)} – {_pct(est.high)}</td>'
        f'<td class="num">{_pct(est.reference)}</td></tr>',
    ]
    if real is not None and real.value is not None:
        rows.append(
            f'<tr id="realised-accuracy"><td>realised accuracy ({real.labelled} labelled)</td>'
            f'<td class="num">{_pct(real.value)}</td>'
            f'<td class="num">{_pct(real.low)} – {_pct(real.high)}</td>'
            f'<td class="num">{_pct(real.reference)}</td></tr>'
        )
    else:
        rows.append(
            '<tr id="realised-accuracy"><td>realised accuracy</td>'
            '<td colspan="3" class="muted">no labelled predictions in this window</td></tr>'
        )
    ood = perf.ood
    if ood is not None:
        rows.append(
            f"<tr><td>out-of-distribution inputs (embedding)</td>"
            f'<td class="num">{_pct(ood.rate)}</td>'
            f'<td class="num">binomial p = {ood.p_value:.2g}</td>'
            f'<td class="num">{_pct(ood.reference)} expected</td></tr>'
        )
    shift = perf.ood_shift
    if shift is not None and shift.skipped:
        rows.append(
            '<tr id="ood-score-shift"><td>OOD scores above their class\'s '
            f"{100 * shift.level:g}th percentile (ood_score_shift)</td>"
            f'<td colspan="3" class="muted">skipped: {_e(shift.skipped)}</td></tr>'
        )
    elif shift is not None and shift.rate is not None:
        rows.append(
            '<tr id="ood-score-shift"><td>OOD scores above their class\'s '
            f"{100 * shift.level:g}th percentile (ood_score_shift)</td>"
            f'<td class="num">{_pct(shift.rate)}</td>'
            f'<td class="num">binomial p = {shift.p_value:.2g}</td>'
            f'<td class="num">{_pct(shift.expected)} expected</td></tr>'
        )
    if rej is not None:
        what = "rejected" if rej.source == "reason" else "low-confidence (not accepted)"
        rows.append(
            f'<tr><td>{what} inputs</td><td class="num">{_pct(rej.rate)}</td>'
            f'<td class="num">binomial p = {rej.p_value:.2g}</td>'
            f'<td class="num">{_pct(rej.reference)}</td></tr>'
        )
    return (
        "<table>"
        + "".join(rows)
        + "</table>"
        + f'<p class="muted">The alarm needs a fall of more than '
        f"{100 * perf.min_accuracy_drop:g} points beyond the interval, or a rise of the "
        f"rejected share of at least {100 * perf.min_rejected_rise:g} points"
        + (
            f", or of the OOD-score share of at least {100 * shift.min_rise:g} points"
            if shift is not None
            else ""
        )
        + ".</p>"
    )


def _thumb(value: str | None) -> str:
    if not value or len(value) > 20_000 or not _BASE64.match(value):
        return '<span class="muted">—</span>'
    return f'<img class="thumb" src="data:image/png;base64,{value}" alt="input">'


def _atypical_table(
    window: Window, order: np.ndarray, scores: np.ndarray, with_thumbs: bool
) -> str:
    head = "<tr>" + ("<th>input</th>" if with_thumbs else "")
    head += (
        "<th>time (UTC)</th><th>request id</th><th>#</th><th>predicted</th>"
        "<th>confidence</th><th>atypicality</th></tr>"
    )
    rows = []
    for i in order:
        thumb = (
            f"<td>{_thumb(window.thumbnails[i])}</td>" if with_thumbs and window.thumbnails else ""
        )
        when = window.created_at[i].strftime("%Y-%m-%d %H:%M:%S")
        rows.append(
            f"<tr>{thumb}<td>{_e(when)}</td><td><code>{_e(window.request_ids[i])}</code></td>"
            f'<td class="num">{int(window.input_index[i])}</td><td>{_e(window.labels[i])}</td>'
            f'<td class="num">{window.confidence[i]:.3f}</td>'
            f'<td class="num">{_share(float(scores[i]))}</td></tr>'
        )
    return "<table>" + head + "".join(rows) + "</table>"


def _rejections_line(window: Window) -> str:
    """How many predictions of the window were not accepted, by reason."""
    counts = window.rejections()
    if counts is None:
        return ""
    total = sum(counts.values())
    parts = ", ".join(f"{_e(reason)} {n}" for reason, n in counts.items())
    return (
        f'<p id="rejections">Not accepted: <b>{total}</b> of {window.size} predictions '
        f"({100 * total / max(window.size, 1):.1f} %): {parts}.</p>"
    )


def feedback_section(acc: FeedbackAccuracy | None, reference: ReferenceProfile | None) -> str:
    """The feedback part of the report: realised accuracy over every labelled prediction
    (also shown on /monitoring when the rest of the report cannot be built)."""
    ref_acc = (
        f" The reference (validation) accuracy is <b>{reference.accuracy:.4f}</b>."
        if reference is not None and reference.accuracy is not None
        else ""
    )
    if acc is None or acc.labelled == 0:
        return (
            '<p id="feedback-summary" data-labelled="0">No labelled predictions yet: say '
            '"wrong" (or "right") under a prediction on the web page, or send true labels '
            'with <code>POST /v1/feedback {"request_id": …, "label": …}</code>.' + ref_acc + "</p>"
        )
    assert acc.accuracy is not None
    rows = "".join(
        f'<tr><td>{_e(k)}</td><td class="num">{n}</td><td class="num">{c / n:.3f}</td></tr>'
        for k, (n, c) in acc.per_class.items()
    )
    versions = "".join(
        f'<tr><td>{_e(k)}</td><td class="num">{n}</td><td class="num">{c / n:.3f}</td></tr>'
        for k, (n, c) in acc.by_version.items()
    )
    return (
        f'<p id="feedback-summary" data-labelled="{acc.labelled}" data-correct="{acc.correct}">'
        f"Realised accuracy on <b>{acc.labelled}</b> labelled predictions: "
        f"<b>{acc.accuracy:.4f}</b> ({acc.correct} correct).{ref_acc} Labels given on the web "
        "page are self-selected (people report mistakes more often than successes): read "
        "this as a lower bound.</p>"
        "<h3>By model version</h3><table>"
        "<tr><th>version</th><th>labelled</th><th>accuracy</th></tr>"
        + versions
        + "</table><h3>By true class</h3><table>"
        "<tr><th>class</th><th>labelled</th><th>recall</th></tr>" + rows + "</table>"
    )


def build_monitoring_html(
    reference: ReferenceProfile,
    predlog_url: str,
    window: int = 500,
    *,
    history_windows: int = 12,
    atypical: int = 12,
    engine: Engine | None = None,
    confidence_threshold: float = 0.7,
) -> tuple[str, MonitoringVerdict, int]:
    """The report's HTML, the current window's :class:`MonitoringVerdict` and the number
    of timeline windows. Raises ``InsufficientDataError`` below the minimum of rows."""
    history = load_window(
        predlog_url,
        window * max(history_windows, 1),
        thumbnails=True,
        engine=engine,
        photos=reference.kind == "natural",
    )
    current = history.slice(max(0, history.size - window), history.size)
    if current.size < MIN_WINDOW_ROWS:
        raise InsufficientDataError(current.size, MIN_WINDOW_ROWS, f"a window of {window}")
    own = engine is None
    eng = engine if engine is not None else create_predlog_engine(predlog_url)
    try:
        verdict = assess_window(
            reference, current, engine=eng, confidence_threshold=confidence_threshold
        )
        acc = feedback_accuracy(eng)
    finally:
        if own:
            eng.dispose()
    report = verdict.drift
    tests = {t.name: t for t in report.tests}

    step = window if history.size >= 2 * window else max(MIN_WINDOW_ROWS, history.size // 6)
    points = drift_timeline(reference, history, step, history_windows)
    scores = atypicality(reference, current)
    finite = np.where(np.isfinite(scores), scores, -1.0)
    far = np.argsort(-finite, kind="stable")[:atypical]
    far = far[finite[far] >= 0]
    unsure = np.argsort(current.confidence, kind="stable")[:atypical]

    alarm_cls = "drift" if verdict.alarm else "ok"
    verdict_cls = "warn" if report.drift_detected else "ok"
    generated = datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    info = reference.info()
    model = " ".join(
        str(v)
        for v in (
            info.get("model_name"),
            f"version {info['model_version']}" if info.get("model_version") else None,
            f"({info['model_digest']})" if info.get("model_digest") else None,
        )
        if v
    )
    with_thumbs = current.thumbnails is not None
    thumbs_note = (
        ""
        if with_thumbs
        else '<p class="muted">Thumbnails unavailable: the prediction log stores statistics and '
        "embeddings, not pixels (a <code>thumbnail</code> column would add them). The map "
        "below shows where these inputs lie.</p>"
    )
    emb_uri = plot_embeddings(reference, current, far)
    notes = "".join(f"<li>{_e(n)}</li>" for n in report.notes)
    stat_rows = "".join(
        f"<li><b>{_e(n)}</b>: {_e(STAT_DESCRIPTIONS.get(n, n))}</li>"
        for n in [*[s for s in reference.stats if s in current.stats], "confidence"]
    )
    parts = [
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        "<title>visionops monitoring</title><style>" + CSS + "</style></head><body>",
        "<h1>visionops monitoring</h1>",
        f'<p class="muted">Model {_e(model or "unknown")} · prediction log '
        f"{_e(safe_url(predlog_url))} · generated {generated}</p>",
        '<section id="summary"><h2>Verdict</h2>',
        f'<p id="alarm" class="verdict {alarm_cls}"><b>Alarm</b> (risk to performance): '
        f"{_e(verdict.performance.describe())}</p>",
        f'<p id="data-drift" class="verdict {verdict_cls}"><b>Data drift</b> (a warning: '
        f"the inputs differ): {_e(report.describe())}</p>",
        _performance_section(verdict.performance),
        f"<p>Current window: the last <b>{current.size}</b> predictions, "
        f"{_e(current.start.isoformat(timespec='seconds') if current.start else '?')} to "
        f"{_e(current.end.isoformat(timespec='seconds') if current.end else '?')}. "
        f"Reference: {reference.n_images} validation images. Drift score "
        f"<b>{report.drift_score:.2f}</b> (≥ 1 means at least one test crossed its "
        f"threshold; {report.correction} correction over {len(report.tests)} tests, overall "
        f"false alarm rate {report.alpha:g}).</p>",
        f'<ul class="notes">{notes}</ul>' if notes else "",
        _rejections_line(current),
        "</section>",
        '<section id="tests"><h2>Tests</h2>' + _tests_table(report) + "</section>",
        '<section id="distributions"><h2>Distributions: reference vs current</h2>',
        f"<ul>{stat_rows}</ul>",
        _img(plot_distributions(reference, current, tests), "histograms of each statistic"),
        "<h3>Predicted classes</h3>",
        _img(plot_classes(reference, current, tests.get("predicted_class")), "predicted classes"),
        "<h3>Embeddings</h3>",
        _img(emb_uri, "embedding map") if emb_uri else "<p>No comparable embeddings.</p>",
        "</section>",
        '<section id="drift-over-time"><h2>Drift over time</h2>',
        f"<p>{len(points)} consecutive windows of {step} predictions; "
        "the black line is the largest test score, red dots are windows that alarm.</p>",
        _img(plot_timeline(points), "drift score over time")
        if points
        else "<p>Not enough rows.</p>",
        "</section>",
        '<section id="atypical"><h2>Most atypical recent inputs</h2>',
        thumbs_note,
        "<p>Atypicality: how far an input's embedding lies from its nearest reference "
        "embeddings, as the share of reference images that lie closer to theirs (1.00 = "
        "farther than any).</p><h3>Farthest from the reference</h3>",
        _atypical_table(current, far, scores, with_thumbs),
        "<h3>Least confident</h3>",
        _atypical_table(current, unsure, scores, with_thumbs),
        "</section>",
        '<section id="feedback"><h2>Accuracy on labelled feedback</h2>',
        feedback_section(acc, reference),
        "</section></body></html>",
    ]
    return "\n".join(parts), verdict, len(points)


def write_monitoring_report(
    reference: ReferenceProfile,
    predlog_url: str,
    out: Path,
    window: int = 500,
    *,
    history_windows: int = 12,
    confidence_threshold: float = 0.7,
) -> MonitoringReportResult:
    """Write the self-contained HTML report of the last ``window`` predictions to ``out``."""
    text, verdict, n_points = build_monitoring_html(
        reference,
        predlog_url,
        window,
        history_windows=history_windows,
        confidence_threshold=confidence_threshold,
    )
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(out)
    log.info("wrote %s (%d bytes)", out, len(text))
    return MonitoringReportResult(out, verdict, len(text.encode("utf-8")), n_points)
