"""Temperature scaling: calibrated top-1 probabilities for monitoring's accuracy estimate.

Guo et al., "On Calibration of Modern Neural Networks" (ICML 2017): one scalar ``T``
divides the logits before the softmax, ``softmax(z / T)``. ``T`` is fitted on held-out
data (the validation split) by minimising the negative log-likelihood; it never changes
the arg-max, so accuracy is untouched. Label smoothing, for example, makes a model
under-confident (``T < 1`` sharpens it back).

The export stage fits ``T`` with :func:`fit_temperature` and puts the division into the
ONNX graph, so serving (ONNX Runtime, no torch) applies it without knowing it exists;
``metadata.json`` records ``calibration`` (the temperature and the validation ECE and
NLL before and after). NumPy and SciPy only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from visionops.errors import DataError

#: Search range of the temperature (log-uniform bounds of the bounded 1-D search).
T_MIN, T_MAX = 0.05, 20.0


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Row-wise softmax of ``logits / temperature`` (N, K), float64, numerically stable."""
    z = np.asarray(logits, dtype=np.float64) / temperature
    z -= z.max(axis=1, keepdims=True)
    e = np.exp(z)
    out: np.ndarray = e / e.sum(axis=1, keepdims=True)
    return out


def nll(logits: np.ndarray, y: np.ndarray, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of labels ``y`` (N,) under ``softmax(logits / T)``."""
    z = np.asarray(logits, dtype=np.float64) / temperature
    m = z.max(axis=1, keepdims=True)
    log_norm = m[:, 0] + np.log(np.exp(z - m).sum(axis=1))
    return float(np.mean(log_norm - z[np.arange(len(y)), y]))


def ece(probabilities: np.ndarray, y: np.ndarray, n_bins: int = 15) -> float:
    """Expected calibration error of top-1 probabilities (the evaluate stage's bins)."""
    from visionops.evaluate import calibration_bins

    probs = np.asarray(probabilities, dtype=np.float64)
    value, _ = calibration_bins(probs.max(axis=1), probs.argmax(axis=1) == y, n_bins)
    return float(value)


@dataclass(frozen=True)
class TemperatureFit:
    """A fitted temperature and what it did on the data it was fitted on."""

    temperature: float
    n: int
    ece_before: float
    ece_after: float
    nll_before: float
    nll_after: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": "temperature scaling",
            "temperature": self.temperature,
            "fitted_on": "validation split",
            "n": self.n,
            "val_ece_before": self.ece_before,
            "val_ece_after": self.ece_after,
            "val_nll_before": self.nll_before,
            "val_nll_after": self.nll_after,
        }


def fit_temperature(logits: np.ndarray, y: np.ndarray, n_bins: int = 15) -> TemperatureFit:
    """The temperature minimising the NLL of ``y`` (N,) int under ``softmax(logits / T)``.

    ``logits`` is (N, K) float. A bounded scalar search over ``log T`` in
    [log 0.05, log 20] (the NLL is convex in ``1 / T``). Raises :class:`DataError` for
    empty or mismatched inputs or non-finite logits.
    """
    from scipy import optimize

    z = np.asarray(logits, dtype=np.float64)
    labels = np.asarray(y, dtype=np.int64).reshape(-1)
    if z.ndim != 2 or len(z) == 0 or len(z) != len(labels):
        raise DataError(f"logits {z.shape} and {len(labels)} labels do not match")
    if not np.isfinite(z).all():
        raise DataError("logits contain NaN or infinity: cannot fit a temperature")
    if labels.min() < 0 or labels.max() >= z.shape[1]:
        raise DataError(f"labels outside [0, {z.shape[1]}) for {z.shape[1]} logits")
    res = optimize.minimize_scalar(
        lambda log_t: nll(z, labels, math.exp(log_t)),
        bounds=(math.log(T_MIN), math.log(T_MAX)),
        method="bounded",
        options={"xatol": 1e-4},
    )
    t = float(math.exp(res.x))
    return TemperatureFit(
        temperature=t,
        n=len(labels),
        ece_before=ece(softmax(z), labels, n_bins),
        ece_after=ece(softmax(z, t), labels, n_bins),
        nll_before=nll(z, labels),
        nll_after=nll(z, labels, t),
    )
