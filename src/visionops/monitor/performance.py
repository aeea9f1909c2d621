"""Is the model's performance at risk? The alarm level of a monitoring verdict.

Data drift (:mod:`visionops.monitor.drift`) says the inputs differ; this module says
whether that harms the model. Three signals, each needing both significance and a
minimum effect before it raises the alarm:

- **Estimated accuracy** without labels, from the calibrated top-1 probabilities (the
  confidence-based performance estimation family of NannyML's CBPE). Plain CBPE — the
  mean confidence — assumes calibration survives the shift, and it does not: on foreign
  digits it said 80 % where a champion of an earlier recipe was right on 71 % (ATC: 70 %).
  So the estimate is the
  **average thresholded confidence** (ATC; Garg et al., "Leveraging Unlabeled Data to
  Predict Out-of-Distribution Performance", ICLR 2022): the threshold ``t`` is the
  confidence above which the reference's share of predictions equals its accuracy
  (``t`` = the ``1 - accuracy`` quantile of the reference confidences), and the
  window's estimated accuracy is its share of predictions with confidence above ``t``
  (measured within 2 points on foreign digits, benchmarks/results/drift.md). The
  interval is the Wilson interval of that share for the window's size. The alarm: the
  interval's upper end lies more than ``min_accuracy_drop`` below the reference's
  accuracy. The mean confidence is reported beside it (``cbpe``). Both need calibrated
  confidences: export fits a temperature and the gate bounds the test ECE.
- **Rejected and out-of-distribution inputs** — the share of predictions the server
  rejected (a non-null ``reason`` when the log has that column, else ``accepted =
  false``: confidence below ``serve.confidence_threshold``) against the reference's
  share of confidences below the same threshold; and the share of inputs whose
  embedding lies farther from its nearest reference embeddings than 99 % of the
  reference's own (:func:`atypicality` ≥ 0.99; 1 % expected) — a model can be confidently
  wrong on inputs unlike anything it was trained on (uniform noise: 100 % confident).
  Each: a one-sided binomial test at ``REJECTED_ALPHA`` and a rise of at least
  ``min_rejected_rise``.
- **OOD-score shift within the predicted classes** (``ood_score_shift``): the share of
  the window's logged ``ood_score`` values (the server's kNN distance,
  :class:`visionops.ood.OodDetector`) above the reference's ``OOD_SHIFT_LEVEL``
  quantile of *their predicted class* (:class:`~visionops.monitor.reference.OodScoreProfile`;
  ``1 - OOD_SHIFT_LEVEL`` expected). It sees inputs that are each only a little less
  typical — blurred, printed or foreign digits move most scores up without crossing the
  rejection threshold — and, being class-conditional, it stays quiet when only the class
  mix changes (label shift). A one-sided binomial test at ``REJECTED_ALPHA`` and a rise of
  at least ``min_ood_shift`` (:data:`MIN_OOD_SHIFT`, chosen on calibration windows
  disjoint from the reported ones: benchmarks/results/ood_shift_calibration.md). Skipped,
  with the reason in the verdict, when the reference has no per-class OOD quantiles
  (written before they were recorded) or the window's rows logged no ``ood_score``.
- **Realised accuracy** from feedback (true labels sent to ``POST /v1/feedback``) over
  the window's labelled rows, with a Wilson interval; the alarm: at least
  ``MIN_LABELLED`` labels and the interval's upper end more than ``min_accuracy_drop``
  below the reference's accuracy. Feedback given from the web page is self-selected
  (people report mistakes more often than successes), so read it as a lower bound.

NumPy and SciPy only: the server imports this module.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from visionops.errors import ConfigError
from visionops.monitor.reference import ReferenceProfile, atc_threshold
from visionops.monitor.window import Window

#: Two-sided 95 % normal quantile for the intervals.
Z_95 = 1.959963984540054
#: Smallest fall in accuracy (estimated or realised, as a fraction) that raises the
#: alarm, beyond the interval. Two points: the spread of the model's accuracy between
#: MNIST test writers (blocks of 200 consecutive test images range from 97 % to 100 %)
#: is harmless and stays below it (benchmarks/results/drift.md).
MIN_ACCURACY_DROP = 0.02
#: Smallest rise of the rejected or out-of-distribution share (a fraction) that raises the
#: alarm. Five points: over the 50 writer blocks of 200 MNIST test images both shares stay
#: at or below 2 %.
MIN_REJECTED_RISE = 0.05
#: Atypicality at or above which an input counts as out of distribution (farther from the
#: reference than 99 % of the reference's own images).
OOD_ATYPICALITY = 0.99
#: Nearest reference embeddings the atypicality averages over.
OOD_NEIGHBOURS = 5
#: Significance of the rejected-rate test (one-sided binomial).
REJECTED_ALPHA = 0.01
#: Quantile of the reference's per-class OOD scores a window's scores are compared with:
#: 10 % of in-distribution rows lie above it. Among the levels 0.5–0.95 it separated the
#: harmful MNIST scenarios from in-distribution writer blocks best
#: (benchmarks/results/ood_shift_calibration.md).
OOD_SHIFT_LEVEL = 0.9
#: Smallest rise of the share above ``OOD_SHIFT_LEVEL`` (a fraction, over the expected
#: ``1 - OOD_SHIFT_LEVEL``) that raises the alarm: the midpoint between the largest share
#: of in-distribution calibration windows of 200 (i.i.d. and writer blocks of the MNIST
#: test set) and the smallest of harmful-scenario calibration windows, rounded down to a
#: whole point (benchmarks/calibrate_ood_shift.py).
MIN_OOD_SHIFT = 0.14
#: Fewest labelled predictions in a window before realised accuracy can raise the alarm.
MIN_LABELLED = 30


@dataclass(frozen=True)
class AccuracyEstimate:
    """Estimated accuracy of a window and its 95 % interval (fractions)."""

    value: float
    low: float
    high: float
    n: int
    reference: float  # the reference's accuracy (its estimate when it has no labels)
    method: str  # "ATC" (thresholded confidence) or "CBPE" (mean confidence)
    threshold: float | None  # ATC's confidence threshold
    cbpe: float  # the mean confidence, for comparison

    def to_dict(self) -> dict[str, Any]:
        return {
            "value": round(self.value, 6),
            "low": round(self.low, 6),
            "high": round(self.high, 6),
            "n": self.n,
            "reference": round(self.reference, 6),
            "method": self.method,
            "threshold": None if self.threshold is None else round(self.threshold, 6),
            "cbpe": round(self.cbpe, 6),
        }


@dataclass(frozen=True)
class RealisedAccuracy:
    """Accuracy over the window's predictions that received a true label."""

    labelled: int
    correct: int
    low: float
    high: float
    reference: float | None  # accuracy on the validation split

    @property
    def value(self) -> float | None:
        return self.correct / self.labelled if self.labelled else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "value": None if self.value is None else round(self.value, 6),
            "low": round(self.low, 6),
            "high": round(self.high, 6),
            "labelled": self.labelled,
            "correct": self.correct,
            "reference": self.reference,
        }


@dataclass(frozen=True)
class RejectedRate:
    """Share of the window's predictions the server rejected, vs the reference's."""

    rate: float
    reference: float
    n: int
    p_value: float
    source: str  # "reason" (non-null reason), "accepted" (low confidence) or "embedding" (OOD)

    def to_dict(self) -> dict[str, Any]:
        return {
            "rate": round(self.rate, 6),
            "reference": round(self.reference, 6),
            "n": self.n,
            "p_value": self.p_value,
            "source": self.source,
        }


@dataclass(frozen=True)
class OodScoreShift:
    """The class-conditional OOD-score check of a window (``ood_score_shift``).

    ``rate``: share of the scored rows above their predicted class's ``level`` quantile of
    the reference; ``expected`` = ``1 - level``. ``skipped`` says why the check did not
    run (then ``rate`` and ``p_value`` are None and ``n`` is 0).
    """

    rate: float | None
    expected: float
    n: int
    p_value: float | None
    level: float
    min_rise: float
    alarm: bool
    skipped: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "status": "skipped" if self.skipped else ("alarm" if self.alarm else "ok"),
            "rate": None if self.rate is None else round(self.rate, 6),
            "expected": round(self.expected, 6),
            "n": self.n,
            "p_value": self.p_value,
            "level": self.level,
            "min_rise": self.min_rise,
            "skipped": self.skipped,
        }


@dataclass(frozen=True)
class PerformanceReport:
    """The alarm level: whether the window puts the model's performance at risk."""

    estimated: AccuracyEstimate
    rejected: RejectedRate | None
    ood: RejectedRate | None
    realised: RealisedAccuracy | None
    alarm: bool
    reasons: tuple[str, ...]
    min_accuracy_drop: float
    min_rejected_rise: float
    ood_shift: OodScoreShift | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "alarm": self.alarm,
            "alarm_reasons": list(self.reasons),
            "estimated_accuracy": self.estimated.to_dict(),
            "realised_accuracy": None if self.realised is None else self.realised.to_dict(),
            "rejected_rate": None if self.rejected is None else self.rejected.to_dict(),
            "ood_rate": None if self.ood is None else self.ood.to_dict(),
            "ood_score_shift": None if self.ood_shift is None else self.ood_shift.to_dict(),
            "alarm_thresholds": {
                "min_accuracy_drop": self.min_accuracy_drop,
                "min_rejected_rise": self.min_rejected_rise,
                "min_ood_shift": None if self.ood_shift is None else self.ood_shift.min_rise,
                "rejected_alpha": REJECTED_ALPHA,
                "min_labelled": MIN_LABELLED,
            },
        }

    def describe(self) -> str:
        est = self.estimated
        text = (
            f"estimated accuracy ({est.method}) {100 * est.value:.1f} % "
            f"[{100 * est.low:.1f}, {100 * est.high:.1f}] vs {100 * est.reference:.1f} % "
            "in the reference"
        )
        if self.realised is not None and self.realised.value is not None:
            text += (
                f"; realised {100 * self.realised.value:.1f} % on {self.realised.labelled} labelled"
            )
        if self.ood_shift is not None and self.ood_shift.skipped:
            text += f"; OOD-score check skipped: {self.ood_shift.skipped}"
        if self.alarm:
            return "ALARM: " + "; ".join(self.reasons) + f" ({text})"
        return f"no alarm: {text}"


def estimate_accuracy(
    confidence: np.ndarray,
    reference_confidence: np.ndarray,
    reference_accuracy: float | None,
    z: float = Z_95,
    threshold: float | None = None,
) -> AccuracyEstimate:
    """Estimated accuracy of a window from its top-1 probabilities ``confidence`` (N,).

    ATC (see the module docstring) with a Wilson interval when the reference's accuracy
    is known — ``threshold`` is the one the reference computed on its whole split, else
    it is computed from ``reference_confidence`` (a sample); otherwise CBPE,
    ``mean(c) ± z·sqrt(sum c(1-c))/N``. Raises :class:`ConfigError` for an empty window.
    """
    c = np.clip(np.asarray(confidence, dtype=np.float64), 0.0, 1.0)
    if c.size == 0:
        raise ConfigError("cannot estimate the accuracy of an empty window")
    cbpe = float(c.mean())
    ref_c = np.asarray(reference_confidence, dtype=np.float64)
    if reference_accuracy is not None and ref_c.size:
        t = threshold if threshold is not None else atc_threshold(ref_c, reference_accuracy)
        k = int((c > t).sum())
        low, high = wilson_interval(k, int(c.size), z)
        return AccuracyEstimate(
            k / c.size, low, high, int(c.size), float(reference_accuracy), "ATC", t, cbpe
        )
    half = z * math.sqrt(float((c * (1.0 - c)).sum())) / c.size
    ref = float(ref_c.mean()) if ref_c.size else cbpe
    return AccuracyEstimate(
        cbpe, max(0.0, cbpe - half), min(1.0, cbpe + half), int(c.size), ref, "CBPE", None, cbpe
    )


def atypicality(reference: ReferenceProfile, window: Window, k: int = OOD_NEIGHBOURS) -> np.ndarray:
    """Per window row: mean distance to its ``k`` nearest reference embeddings, as the
    share of reference embeddings that are closer to their own neighbours (0..1; 1 =
    farther than any reference image). NaN for rows without an embedding."""
    out = np.full(window.size, np.nan)
    ref = reference.embeddings.astype(np.float64)
    if len(window.embeddings) == 0 or ref.ndim != 2 or len(ref) <= k:
        return out
    if window.embeddings.shape[1] != ref.shape[1]:
        return out

    def knn_mean(a: np.ndarray, skip_self: bool) -> np.ndarray:
        d2 = (a * a).sum(1)[:, None] + (ref * ref).sum(1)[None, :] - 2.0 * a @ ref.T
        d = np.sqrt(np.maximum(d2, 0.0))
        d.sort(axis=1)
        start = 1 if skip_self else 0
        result: np.ndarray = d[:, start : start + k].mean(axis=1)
        return result

    baseline = np.sort(knn_mean(ref, skip_self=True))
    cur = knn_mean(window.embeddings.astype(np.float64), skip_self=False)
    out[window.embedding_rows] = np.searchsorted(baseline, cur, side="right") / len(baseline)
    return out


def _binomial_greater(k: int, n: int, p: float) -> float:
    from scipy import stats

    return float(stats.binomtest(k, n, min(max(p, 1e-9), 1.0), alternative="greater").pvalue)


def ood_rate(window: Window, reference: ReferenceProfile) -> RejectedRate | None:
    """Share of the window's embeddings with :func:`atypicality` ≥ ``OOD_ATYPICALITY``
    (1 - ``OOD_ATYPICALITY`` expected); None without comparable embeddings."""
    a = atypicality(reference, window)
    a = a[np.isfinite(a)]
    if a.size == 0:
        return None
    k = int((a >= OOD_ATYPICALITY).sum())
    expected = 1.0 - OOD_ATYPICALITY
    return RejectedRate(
        rate=k / a.size,
        reference=expected,
        n=int(a.size),
        p_value=_binomial_greater(k, int(a.size), expected),
        source="embedding",
    )


def ood_score_shift(
    window: Window,
    reference: ReferenceProfile,
    level: float = OOD_SHIFT_LEVEL,
    min_rise: float = MIN_OOD_SHIFT,
) -> OodScoreShift:
    """The ``ood_score_shift`` check (module docstring) of ``window`` against ``reference``.

    Rows count when they logged a finite ``ood_score`` and their predicted label is one of
    the reference's classes. The alarm: binomial p < ``REJECTED_ALPHA`` and ``rate -
    (1 - level)`` ≥ ``min_rise``. Returns a skipped check (never raises) when the reference
    has no per-class quantiles at ``level`` or no row has a score.
    """
    expected = 1.0 - level

    def skipped(why: str) -> OodScoreShift:
        return OodScoreShift(None, expected, 0, None, level, min_rise, False, why)

    profile = reference.ood_scores
    if profile is None:
        return skipped(
            "the reference profile has no per-class OOD scores (written before they were "
            "recorded, or the model has no OOD detector): export the model again"
        )
    bounds = profile.thresholds(level)
    if bounds is None:
        return skipped(f"the reference profile has no {level:g} quantile of the OOD scores")
    if window.ood_scores is None:
        return skipped("the prediction log has no ood_score column")
    index = {name: i for i, name in enumerate(reference.classes)}
    cls = np.asarray([index.get(label, -1) for label in window.labels], dtype=np.int64)
    scores = np.asarray(window.ood_scores, dtype=np.float64)
    keep = np.isfinite(scores) & (cls >= 0)
    n = int(keep.sum())
    if n == 0:
        return skipped("no prediction of the window logged an OOD score")
    k = int((scores[keep] > bounds[cls[keep]]).sum())
    p_value = _binomial_greater(k, n, expected)
    alarm = p_value < REJECTED_ALPHA and k / n - expected >= min_rise
    return OodScoreShift(k / n, expected, n, p_value, level, min_rise, alarm)


def wilson_interval(correct: int, n: int, z: float = Z_95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion ``correct / n``; (0, 1) for n = 0."""
    if n <= 0:
        return 0.0, 1.0
    p = correct / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def rejected_rate(
    window: Window, reference: ReferenceProfile, confidence_threshold: float
) -> RejectedRate | None:
    """The window's rejected share and the reference's; None when the log records neither
    a ``reason`` nor an ``accepted`` column.

    With ``reason`` the reference share is still that of low confidence (the reference
    knows no other reason), so a rise also counts out-of-distribution rejections.
    """
    if window.reasons is not None:
        rejected = np.asarray([r is not None for r in window.reasons])
        source = "reason"
    elif window.accepted is not None:
        rejected = ~window.accepted
        source = "accepted"
    else:
        return None
    n = int(rejected.size)
    if n == 0:
        return None
    ref = float(np.mean(reference.confidence < confidence_threshold))
    k = int(rejected.sum())
    # Half an image of slack: a reference share of exactly 0 would make any rejection
    # "impossible" (p = 0) however harmless.
    p_ref = min(max(ref, 0.5 / max(len(reference.confidence), 1)), 1.0)
    p_value = _binomial_greater(k, n, p_ref)
    return RejectedRate(rate=k / n, reference=ref, n=n, p_value=p_value, source=source)


def assess_performance(
    reference: ReferenceProfile,
    window: Window,
    *,
    confidence_threshold: float = 0.7,
    feedback: tuple[int, int] | None = None,
    min_accuracy_drop: float = MIN_ACCURACY_DROP,
    min_rejected_rise: float = MIN_REJECTED_RISE,
    min_ood_shift: float = MIN_OOD_SHIFT,
    z: float = Z_95,
) -> PerformanceReport:
    """Decide the alarm level for ``window`` (see the module docstring).

    ``feedback`` is ``(labelled, correct)`` over the window's predictions (None: no
    feedback table). ``confidence_threshold`` is the server's
    ``serve.confidence_threshold`` (what ``accepted`` was computed with).
    """
    if not 0 <= min_accuracy_drop < 1:
        raise ConfigError(f"min_accuracy_drop must be in [0, 1), got {min_accuracy_drop}")
    if not 0 <= min_rejected_rise < 1:
        raise ConfigError(f"min_rejected_rise must be in [0, 1), got {min_rejected_rise}")
    if not 0 <= min_ood_shift < 1:
        raise ConfigError(f"min_ood_shift must be in [0, 1), got {min_ood_shift}")
    reasons: list[str] = []
    est = estimate_accuracy(
        window.confidence, reference.confidence, reference.accuracy, z, reference.atc_threshold
    )
    if est.high < est.reference - min_accuracy_drop:
        reasons.append(
            f"estimated accuracy fell: {100 * est.value:.1f} % "
            f"[{100 * est.low:.1f}, {100 * est.high:.1f}] vs {100 * est.reference:.1f} % "
            f"in the reference (more than {100 * min_accuracy_drop:g} points below, "
            f"beyond the interval; {est.method})"
        )

    ood = ood_rate(window, reference)
    if (
        ood is not None
        and ood.p_value < REJECTED_ALPHA
        and ood.rate - ood.reference >= min_rejected_rise
    ):
        reasons.append(
            f"out-of-distribution inputs rose: {100 * ood.rate:.1f} % of {ood.n} lie farther "
            f"from the reference than {100 * OOD_ATYPICALITY:g} % of its own images "
            f"(binomial p = {ood.p_value:.2g} < {REJECTED_ALPHA:g}, "
            f"rise ≥ {100 * min_rejected_rise:g} points)"
        )

    shift = ood_score_shift(window, reference, OOD_SHIFT_LEVEL, min_ood_shift)
    if shift.alarm and shift.rate is not None:
        reasons.append(
            f"OOD scores rose within their predicted classes (ood_score_shift): "
            f"{100 * shift.rate:.1f} % of {shift.n} lie above their class's "
            f"{100 * shift.level:g}th percentile of the reference "
            f"({100 * shift.expected:g} % expected; binomial p = {shift.p_value:.2g} < "
            f"{REJECTED_ALPHA:g}, rise ≥ {100 * min_ood_shift:g} points)"
        )

    rejected = rejected_rate(window, reference, confidence_threshold)
    if (
        rejected is not None
        and rejected.p_value < REJECTED_ALPHA
        and rejected.rate - rejected.reference >= min_rejected_rise
    ):
        what = "rejected" if rejected.source == "reason" else "low-confidence"
        reasons.append(
            f"{what} inputs rose: {100 * rejected.rate:.1f} % of {rejected.n} vs "
            f"{100 * rejected.reference:.1f} % in the reference "
            f"(binomial p = {rejected.p_value:.2g} < {REJECTED_ALPHA:g}, "
            f"rise ≥ {100 * min_rejected_rise:g} points)"
        )

    realised = None
    if feedback is not None and feedback[0] > 0:
        labelled, correct = feedback
        low, high = wilson_interval(correct, labelled, z)
        realised = RealisedAccuracy(labelled, correct, low, high, reference.accuracy)
        floor = est.reference - min_accuracy_drop
        if labelled >= MIN_LABELLED and high < floor:
            reasons.append(
                f"realised accuracy fell: {100 * correct / labelled:.1f} % of {labelled} "
                f"labelled predictions [{100 * low:.1f}, {100 * high:.1f}] vs "
                f"{100 * (floor + min_accuracy_drop):.1f} % in the reference"
            )
    return PerformanceReport(
        estimated=est,
        rejected=rejected,
        ood=ood,
        realised=realised,
        alarm=bool(reasons),
        reasons=tuple(reasons),
        min_accuracy_drop=min_accuracy_drop,
        min_rejected_rise=min_rejected_rise,
        ood_shift=shift,
    )
