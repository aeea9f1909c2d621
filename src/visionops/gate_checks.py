"""The promotion gate's statistical checks, one function each (no MLflow, no torch).

- :func:`mcnemar` — McNemar's test on paired per-image correctness of champion and
  challenger: is the champion significantly better?
- :func:`calibration_check` — the challenger's expected calibration error (ECE) on the
  test split within ``gate.max_ece``. Monitoring estimates accuracy without labels from
  the served confidences (CBPE, :mod:`visionops.monitor.performance`), which is only as
  good as their calibration; export fits temperature scaling on the validation split
  (:mod:`visionops.calibration`) so a well-trained model meets the budget.

:mod:`visionops.registry` runs them on the models and records the outcome.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

#: McNemar's exact binomial test below this many discordant pairs, chi-square above.
MCNEMAR_EXACT_BELOW = 25


@dataclass(frozen=True)
class GateCheck:
    name: str
    passed: bool
    value: float | None
    threshold: float | None
    detail: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "value": self.value,
            "threshold": self.threshold,
            "detail": self.detail,
        }


@dataclass(frozen=True)
class McNemarResult:
    """McNemar's test on paired predictions of two models on the same images."""

    champion_only: int  # b: champion right, challenger wrong
    challenger_only: int  # c: challenger right, champion wrong
    p_value: float
    method: str  # "exact" (binomial), "chi2" (continuity corrected) or "none"


def mcnemar_p_value(b: int, c: int, exact_below: int = MCNEMAR_EXACT_BELOW) -> tuple[float, str]:
    """Two-sided p-value of McNemar's test for discordant counts ``b`` and ``c``.

    Exact binomial (``2 * P(X <= min(b, c))``, ``X ~ Bin(b + c, 1/2)``) when
    ``b + c < exact_below``; otherwise chi-square with one degree of freedom on
    ``(|b - c| - 1)^2 / (b + c)`` (Edwards' continuity correction).
    """
    from scipy import stats

    if b < 0 or c < 0:
        raise ValueError(f"discordant counts must be >= 0 (got b={b}, c={c})")
    n = b + c
    if n == 0:
        return 1.0, "none"
    if n < exact_below:
        return min(1.0, float(2.0 * stats.binom.cdf(min(b, c), n, 0.5))), "exact"
    statistic = max(abs(b - c) - 1, 0) ** 2 / n
    return float(stats.chi2.sf(statistic, df=1)), "chi2"


def mcnemar(champion_correct: np.ndarray, challenger_correct: np.ndarray) -> McNemarResult:
    """McNemar's test from per-image correctness of the champion and the challenger."""
    a = np.asarray(champion_correct, dtype=bool)
    b_arr = np.asarray(challenger_correct, dtype=bool)
    if a.shape != b_arr.shape:
        raise ValueError(f"paired predictions needed: shapes {a.shape} and {b_arr.shape}")
    b = int(np.sum(a & ~b_arr))
    c = int(np.sum(~a & b_arr))
    p, method = mcnemar_p_value(b, c)
    return McNemarResult(champion_only=b, challenger_only=c, p_value=p, method=method)


# --------------------------------------------------------------------------- gate


def calibration_check(
    probabilities: np.ndarray, y_true: np.ndarray, max_ece: float, n_bins: int = 15
) -> GateCheck:
    """The ``calibration`` check: test ECE of ``probabilities`` (N, K) within ``max_ece``.

    ECE over ``n_bins`` equal-width bins of the top-1 probability
    (:func:`visionops.evaluate.calibration_bins`, the evaluate stage's definition).
    """
    from visionops.evaluate import calibration_bins

    probs = np.asarray(probabilities, dtype=np.float64)
    y = np.asarray(y_true, dtype=np.int64)
    if probs.ndim != 2 or len(probs) != len(y) or len(y) == 0:
        raise ValueError(f"probabilities {probs.shape} do not match {len(y)} labels")
    confidence = probs.max(axis=1)
    correct = probs.argmax(axis=1) == y
    ece, _ = calibration_bins(confidence, correct, n_bins)
    passed = bool(ece <= max_ece)
    detail = f"test ECE {ece:.4f} " + (
        f"<= gate.max_ece {max_ece:g}"
        if passed
        else f"exceeds gate.max_ece {max_ece:g}: confidences are not calibrated enough "
        "for monitoring's accuracy estimate (re-export to fit temperature scaling)"
    )
    return GateCheck("calibration", passed, float(ece), max_ece, detail)
