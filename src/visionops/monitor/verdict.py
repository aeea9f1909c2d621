"""The monitoring verdict of one window: data drift (a warning) and the alarm.

:func:`assess_window` runs the drift tests (:mod:`visionops.monitor.drift`) and the
performance checks (:mod:`visionops.monitor.performance`) on one window of the
prediction log, with the window's feedback when an engine is given. The API
(``/v1/monitoring/drift``), ``visionops monitor check``, its webhook and the report all
use it, so they agree on both levels.

NumPy, SciPy and SQLAlchemy only: the server imports this module.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from sqlalchemy.engine import Engine

from visionops.monitor.drift import DEFAULT_ALPHA, Correction, DriftReport, detect_drift
from visionops.monitor.performance import (
    MIN_ACCURACY_DROP,
    MIN_OOD_SHIFT,
    MIN_REJECTED_RISE,
    PerformanceReport,
    assess_performance,
)
from visionops.monitor.reference import ReferenceProfile
from visionops.monitor.window import Window

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MonitoringVerdict:
    """Both levels for one window: ``drift_detected`` (warning) and ``alarm``."""

    drift: DriftReport
    performance: PerformanceReport

    @property
    def drift_detected(self) -> bool:
        return self.drift.drift_detected

    @property
    def alarm(self) -> bool:
        return self.performance.alarm

    @property
    def window(self) -> dict[str, Any]:
        return self.drift.window

    def describe(self) -> str:
        return f"{self.performance.describe()}; {self.drift.describe()}"

    def to_dict(self) -> dict[str, Any]:
        """The drift report's JSON plus ``alarm``, ``alarm_reasons`` and the accuracies."""
        out = self.drift.to_dict()
        out.update(self.performance.to_dict())
        out["verdict"] = self.describe()
        out["drift_verdict"] = self.drift.describe()
        return out

    def summary(self) -> dict[str, float]:
        out = self.drift.summary()
        out["alarm"] = float(self.alarm)
        out["estimated_accuracy"] = self.performance.estimated.value
        realised = self.performance.realised
        if realised is not None and realised.value is not None:
            out["realised_accuracy"] = realised.value
            out["labelled"] = float(realised.labelled)
        return out


def assess_window(
    reference: ReferenceProfile,
    window: Window,
    *,
    engine: Engine | None = None,
    confidence_threshold: float = 0.7,
    alpha: float = DEFAULT_ALPHA,
    correction: Correction = "bonferroni",
    permutations: int = 500,
    min_accuracy_drop: float = MIN_ACCURACY_DROP,
    min_rejected_rise: float = MIN_REJECTED_RISE,
    min_ood_shift: float = MIN_OOD_SHIFT,
    seed: int = 0,
) -> MonitoringVerdict:
    """Drift tests and performance checks of ``window`` against ``reference``.

    ``engine`` (the prediction log's database) supplies the feedback of the window's
    rows; without it there is no realised accuracy.
    """
    drift = detect_drift(
        reference, window, alpha=alpha, correction=correction, permutations=permutations, seed=seed
    )
    feedback = None
    if engine is not None:
        from visionops.monitor.feedback import feedback_counts

        feedback = feedback_counts(engine, window.ids)
    performance = assess_performance(
        reference,
        window,
        confidence_threshold=confidence_threshold,
        feedback=feedback,
        min_accuracy_drop=min_accuracy_drop,
        min_rejected_rise=min_rejected_rise,
        min_ood_shift=min_ood_shift,
    )
    return MonitoringVerdict(drift=drift, performance=performance)
