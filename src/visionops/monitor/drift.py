"""Drift detection: is the served traffic still what the model was validated on?

:func:`detect_drift` runs, on a :class:`~visionops.monitor.window.Window` against a
:class:`~visionops.monitor.reference.ReferenceProfile`:

- a two-sample Kolmogorov–Smirnov test per image statistic and on the confidence
  (input and output drift, one number at a time);
- a chi-square test of the predicted-class counts, window vs reference (a 2×K
  contingency table, so the reference's own sampling noise counts; a Monte Carlo
  p-value when an expected count is below 5) — label or prior shift;
- for photos, the same chi-square test of the uploads' file formats (PNG, JPEG, ...)
  against the reference's format counts, when both sides know them;
- a kernel two-sample test on the embeddings: the maximum mean discrepancy (MMD) with an
  RBF kernel whose bandwidth is the median heuristic, and a permutation p-value. The
  kernel matrix is computed once; every permutation is one column of a weight matrix,
  so all of them cost one matrix product.

Every test reports a p-value. They are combined with a **Bonferroni** correction by
default (each test at ``alpha / m`` for ``m`` tests): it holds the family-wise false
alarm rate at ``alpha`` whatever the dependence between the tests (and they are
dependent: ink fraction and mean intensity move together). Benjamini–Hochberg
(``correction="bh"``) controls the false discovery rate instead and alarms more easily.

**Significance is not enough.** A test counts as drift only when its p-value is below
its threshold *and* its effect size reaches the documented minimum of
:data:`MIN_EFFECT` (Evidently's move from p-values to distances as samples grow): with
5,000 predictions a KS test finds differences far too small to matter. Effect sizes:

- KS tests: the **normed Wasserstein distance** (earth mover's distance between the two
  samples divided by the reference's standard deviation; Evidently's ``wasserstein``
  stattest, whose default threshold is 0.1);
- predicted classes: the **Jensen–Shannon distance** (base 2, in [0, 1]) between the
  predicted-class shares (Evidently's ``jensenshannon`` stattest, default 0.1);
- embeddings: **MMD** (the square root of MMD², in the kernel's units: 0 for identical
  distributions, at most √2).

Data drift is a warning: it says the inputs differ, not that the model got worse.
:mod:`visionops.monitor.performance` decides whether the difference harms the model.

NumPy and SciPy only: the server imports this module.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from visionops.errors import ConfigError
from visionops.monitor.reference import ReferenceProfile
from visionops.monitor.stats import STAT_DESCRIPTIONS
from visionops.monitor.window import Window

Correction = Literal["bonferroni", "bh"]

#: Fewest logged values of a statistic for its test to run.
MIN_VALUES = 30
#: The family-wise false alarm rate the correction targets. 0.01, not 0.05: MNIST's test
#: writers differ slightly but really from its training writers (stroke thickness,
#: confidence), and at 0.05 that difference alarmed 12 % of in-distribution windows of 200
#: (benchmarks/results/drift.md); real drift scores stay far above the threshold.
DEFAULT_ALPHA = 0.01

#: The smallest effect size (see the module docstring) each statistic's test needs,
#: besides significance, to count as drift. KS statistics: normed Wasserstein distance
#: (0.1: a tenth of the reference's spread, Evidently's default); predicted_class:
#: Jensen–Shannon distance (0.1, Evidently's default); embedding: MMD (0.1 ≈ MMD² of
#: 0.01; windows of in-distribution MNIST test images stay below 0.07,
#: benchmarks/results/drift.md).
MIN_EFFECT: dict[str, float] = {
    "mean_intensity": 0.1,
    "ink_fraction": 0.1,
    "bbox_width": 0.1,
    "bbox_height": 0.1,
    "center_x": 0.1,
    "center_y": 0.1,
    "stroke_thickness": 0.1,
    "brightness": 0.1,
    "contrast": 0.1,
    "colourfulness": 0.1,
    "sharpness": 0.1,
    "original_width": 0.1,
    "original_height": 0.1,
    "original_aspect": 0.1,
    "confidence": 0.1,
    "predicted_class": 0.1,
    "original_format": 0.1,
    "embedding": 0.1,
}
#: Effect size name per test method.
EFFECT_NAMES = {"ks": "normed Wasserstein", "chi2": "Jensen-Shannon", "mmd": "MMD"}

#: Fewest embeddings on each side for the MMD test to run.
MIN_EMBEDDINGS = 10
#: Newest window embeddings the MMD test uses (load no more than this for drift).
MMD_WINDOW_SIZE = 500
#: Reference embeddings the MMD test uses.
MMD_REFERENCE_SIZE = 500
#: Monte Carlo draws for the chi-square p-value when expected counts are small.
CHI2_DRAWS = 2000
_P_FLOOR = 1e-300


@dataclass(frozen=True)
class DriftTest:
    """One test's outcome; ``drift`` is ``p_value <= threshold and effect >= min_effect``."""

    name: str  # the statistic tested: mean_intensity, confidence, predicted_class, embedding
    method: str  # ks | chi2 | mmd
    statistic: float
    p_value: float | None
    threshold: float
    drift: bool
    verdict: str
    details: dict[str, Any] = field(default_factory=dict)
    effect: float = 0.0  # effect size (EFFECT_NAMES[method])
    min_effect: float = 0.0

    @property
    def significant(self) -> bool:
        """The p-value alone is below the threshold (drift needs the effect size too)."""
        return self.p_value is not None and self.p_value <= self.threshold

    @property
    def score(self) -> float:
        """``log p / log threshold``: 1.0 at the threshold, above 1 when drifting."""
        if self.p_value is None or self.threshold <= 0 or self.threshold >= 1:
            return 0.0
        return math.log(max(self.p_value, _P_FLOOR)) / math.log(self.threshold)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "method": self.method,
            "statistic": _finite(self.statistic),
            "p_value": _finite(self.p_value),
            "threshold": self.threshold,
            "drift": self.drift,
            "significant": self.significant,
            "effect": _finite(self.effect),
            "effect_name": EFFECT_NAMES.get(self.method, self.method),
            "min_effect": self.min_effect,
            "score": round(self.score, 4),
            "verdict": self.verdict,
            "details": {
                k: _finite(v) if isinstance(v, float) else v for k, v in self.details.items()
            },
        }


def _finite(v: float | None) -> float | None:
    return None if v is None or not math.isfinite(v) else float(v)


@dataclass(frozen=True)
class DriftReport:
    """Every test on one window, and the overall decision."""

    drift_detected: bool
    tests: tuple[DriftTest, ...]
    window: dict[str, Any]
    reference: dict[str, Any]
    alpha: float
    correction: str
    notes: tuple[str, ...] = ()

    @property
    def drift_score(self) -> float:
        """The largest score of a test that drifted, else of any test (capped below 1).

        1.0 or more means drift (see :attr:`DriftTest.score`); a significant test whose
        effect is below its minimum does not push the score past 1.
        """
        drifted = [t.score for t in self.tests if t.drift]
        if drifted:
            return max(drifted)
        return min(max((t.score for t in self.tests), default=0.0), 0.999)

    @property
    def drifted(self) -> list[DriftTest]:
        return [t for t in self.tests if t.drift]

    def to_dict(self) -> dict[str, Any]:
        return {
            "drift_detected": self.drift_detected,
            "drift_score": round(self.drift_score, 4),
            "verdict": self.describe(),
            "window": self.window,
            "tests": [t.to_dict() for t in self.tests],
            "reference": self.reference,
            "alpha": self.alpha,
            "correction": self.correction,
            "notes": list(self.notes),
        }

    def summary(self) -> dict[str, float]:
        out = {
            "drift_detected": float(self.drift_detected),
            "drift_score": self.drift_score,
            "drifted_tests": float(len(self.drifted)),
            "window_size": float(self.window.get("size") or 0),
        }
        for t in self.tests:
            if t.p_value is not None:
                out[f"p_{t.name}"] = t.p_value
        return out

    def describe(self) -> str:
        n = self.window.get("size")
        if not self.drift_detected:
            return (
                f"no data drift in {n} predictions: no test is both significant and "
                f"large enough ({len(self.tests)} tests, {self.correction}, alpha {self.alpha:g})"
            )
        names = ", ".join(t.name for t in self.drifted)
        return (
            f"DATA DRIFT in {n} predictions: {len(self.drifted)} of {len(self.tests)} tests "
            f"significant with a large effect ({names}; {self.correction}, alpha {self.alpha:g})"
        )


# --------------------------------------------------------------------------- tests


def ks_test(reference: np.ndarray, current: np.ndarray) -> tuple[float, float]:
    """Two-sample Kolmogorov–Smirnov statistic and p-value."""
    from scipy import stats

    res = stats.ks_2samp(reference, current, alternative="two-sided", method="auto")
    return float(res.statistic), float(res.pvalue)


def _chi2_stat(obs: np.ndarray) -> np.ndarray:
    """Pearson chi-square of 2×K contingency tables ``obs`` (..., 2, K)."""
    rows = obs.sum(axis=-1, keepdims=True)
    cols = obs.sum(axis=-2, keepdims=True)
    total = rows.sum(axis=-2, keepdims=True)
    expected = rows * cols / np.where(total > 0, total, 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(expected > 0, (obs - expected) ** 2 / expected, 0.0)
    result: np.ndarray = terms.sum(axis=(-2, -1))
    return result


def class_shift_test(
    reference_counts: np.ndarray,
    current_counts: np.ndarray,
    rng: np.random.Generator,
    draws: int = CHI2_DRAWS,
) -> tuple[float, float, str]:
    """Chi-square test that two count vectors come from one categorical distribution.

    Returns (statistic, p-value, method). Categories empty on both sides are dropped.
    The asymptotic chi-square distribution is used when every expected count is at least
    5, otherwise a Monte Carlo p-value from multinomial draws under the pooled shares.
    """
    from scipy import stats

    ref = np.asarray(reference_counts, dtype=np.float64)
    cur = np.asarray(current_counts, dtype=np.float64)
    keep = (ref + cur) > 0
    table = np.stack([ref[keep], cur[keep]])
    k = table.shape[1]
    if k < 2:
        return 0.0, 1.0, "one class only"
    stat = float(_chi2_stat(table))
    rows = table.sum(axis=1)
    pooled = table.sum(axis=0) / table.sum()
    expected = rows[:, None] * pooled[None, :]
    if expected.min() >= 5:
        return stat, float(stats.chi2.sf(stat, df=k - 1)), "chi-square"
    sim = np.stack(
        [
            rng.multinomial(int(rows[0]), pooled, size=draws),
            rng.multinomial(int(rows[1]), pooled, size=draws),
        ],
        axis=1,
    ).astype(np.float64)
    exceed = int((_chi2_stat(sim) >= stat - 1e-9).sum())
    return stat, (1 + exceed) / (1 + draws), f"Monte Carlo ({draws} draws)"


def mmd_permutation_test(
    x: np.ndarray,
    y: np.ndarray,
    permutations: int,
    rng: np.random.Generator,
) -> tuple[float, float, float]:
    """MMD² of samples ``x`` (n, D) and ``y`` (m, D) with an RBF kernel, and its p-value.

    Bandwidth: the median heuristic, ``k(a, b) = exp(-|a - b|² / median |z_i - z_j|²)``
    over the pooled sample. The statistic is the biased (V-statistic) MMD² ``wᵀ K w`` with
    ``w = 1/n`` on ``x`` and ``-1/m`` on ``y``; permuting the pooled sample permutes
    ``w``, so every permutation is a column of ``W`` and ``K @ W`` scores all of them in
    one product. p-value: ``(1 + #{permuted ≥ observed}) / (1 + permutations)``.
    Returns (MMD², p-value, median squared distance).
    """
    z = np.concatenate([x, y]).astype(np.float64)
    n, m = len(x), len(y)
    total = n + m
    sq = (z * z).sum(axis=1)
    d2 = np.maximum(sq[:, None] + sq[None, :] - 2.0 * (z @ z.T), 0.0)
    upper = d2[np.triu_indices(total, k=1)]
    median = float(np.median(upper)) if upper.size else 0.0
    if not median > 0:
        median = float(upper.mean()) if upper.size and upper.mean() > 0 else 1.0
    kernel = np.exp(-d2 / median).astype(np.float32)

    w0 = np.concatenate([np.full(n, 1.0 / n), np.full(m, -1.0 / m)]).astype(np.float32)
    perms = rng.permuted(np.tile(np.arange(total), (permutations, 1)), axis=1)
    weights = np.concatenate([w0[:, None], w0[perms].T], axis=1)  # (total, 1 + P)
    values = np.einsum("ip,ip->p", weights, kernel @ weights, dtype=np.float64)
    observed = float(values[0])
    exceed = int((values[1:] >= observed - 1e-12).sum())
    return observed, (1 + exceed) / (1 + permutations), median


# --------------------------------------------------------------------------- decision


def thresholds(p_values: Sequence[float], alpha: float, correction: Correction) -> list[float]:
    """The per-test significance level each p-value is compared with.

    Bonferroni: ``alpha / m`` for all. Benjamini–Hochberg: with ``k`` the largest rank such
    that ``p_(k) <= k alpha / m``, every test is compared with ``k alpha / m`` (so exactly
    the BH rejections are flagged); ``alpha / m`` when there is no such ``k``.
    """
    m = len(p_values)
    if m == 0:
        return []
    if correction == "bonferroni":
        return [alpha / m] * m
    if correction != "bh":
        raise ConfigError(f"unknown correction {correction!r}; choose bonferroni or bh")
    ranked = sorted(p_values)
    k = max((i for i in range(1, m + 1) if ranked[i - 1] <= i * alpha / m), default=1)
    return [k * alpha / m] * m


def _fmt_p(p: float) -> str:
    return f"{p:.2g}" if p >= 1e-4 else f"{p:.1e}"


def _effect_text(method: str, effect: float, minimum: float) -> str:
    sign = "≥" if effect >= minimum else "<"
    return f"{EFFECT_NAMES.get(method, method)} {effect:.3g} {sign} {minimum:g}"


def _outcome(p: float, t: float, effect: float, minimum: float, method: str) -> str:
    """``DRIFT``, or why not: not significant, or significant but too small."""
    if p > t:
        return "no drift"
    if effect < minimum:
        small = _effect_text(method, effect, minimum)
        return f"no drift (significant, but the effect is small: {small})"
    return "DRIFT"


def _ks_verdict(
    name: str,
    ref: np.ndarray,
    cur: np.ndarray,
    d: float,
    p: float,
    t: float,
    effect: float,
    minimum: float,
) -> str:
    what = STAT_DESCRIPTIONS.get(name, name)
    medians = f"median {np.median(cur):.3g} now vs {np.median(ref):.3g} in the reference"
    outcome = _outcome(p, t, effect, minimum, "ks")
    cmp = "≤" if p <= t else ">"
    tail = f"KS D = {d:.2f}, p = {_fmt_p(p)} {cmp} {t:.2g}; {_effect_text('ks', effect, minimum)}"
    if outcome == "DRIFT":
        return f"{name}: DRIFT — the {what} is distributed differently ({medians}; {tail})"
    return f"{name}: {outcome} ({medians}; {tail})"


def _class_verdict(
    name: str,
    categories: Sequence[str],
    ref_share: np.ndarray,
    cur_share: np.ndarray,
    p: float,
    t: float,
    effect: float,
    minimum: float,
) -> str:
    diff = cur_share - ref_share
    i = int(np.argmax(np.abs(diff)))
    of, mix = (
        ("predictions", "predicted classes")
        if name == "predicted_class"
        else ("uploads", "file formats")
    )
    change = f"'{categories[i]}' is {100 * cur_share[i]:.0f}% of {of} vs {100 * ref_share[i]:.0f}%"
    outcome = _outcome(p, t, effect, minimum, "chi2")
    cmp = "≤" if p <= t else ">"
    tail = f"p = {_fmt_p(p)} {cmp} {t:.2g}; {_effect_text('chi2', effect, minimum)}"
    if outcome == "DRIFT":
        return f"{name}: DRIFT — the mix of {mix} changed ({change}; {tail})"
    return f"{name}: {outcome} (largest change: {change}; {tail})"


def _format_test(
    reference: dict[str, int] | None,
    formats: Sequence[str | None] | None,
    rng: np.random.Generator,
    notes: list[str],
) -> tuple[str, str, float, float, dict[str, Any], Any] | None:
    """The chi-square test of the uploads' file formats against the reference's counts
    (a raw test tuple of :func:`detect_drift`), or None with a note when a side lacks them."""
    if not reference or formats is None:
        return None
    logged = [f for f in formats if f is not None]
    if len(logged) < MIN_VALUES:
        notes.append(f"original_format: only {len(logged)} logged values; not compared")
        return None
    current = Counter(logged)
    names = sorted(set(reference) | set(current))
    ref_counts = np.asarray([reference.get(n, 0) for n in names], dtype=np.float64)
    cur_counts = np.asarray([current.get(n, 0) for n in names], dtype=np.float64)
    stat, p, method = class_shift_test(ref_counts, cur_counts, rng)
    ref_share = ref_counts / max(ref_counts.sum(), 1)
    cur_share = cur_counts / max(cur_counts.sum(), 1)
    details: dict[str, Any] = {
        "method": method,
        "reference_share": {n: round(float(v), 4) for n, v in zip(names, ref_share, strict=True)},
        "current_share": {n: round(float(v), 4) for n, v in zip(names, cur_share, strict=True)},
        "current_counts": {n: int(v) for n, v in zip(names, cur_counts, strict=True)},
    }
    return ("original_format", "chi2", stat, p, details, (ref_share, cur_share, names))


def normed_wasserstein(reference: np.ndarray, current: np.ndarray) -> float:
    """Wasserstein-1 distance of two samples divided by the reference's standard deviation.

    Evidently's ``wasserstein`` stattest: 0.1 means the distributions are a tenth of the
    reference's spread apart. A constant reference (std 0) gives 0 when the current
    sample equals it and infinity otherwise.
    """
    from scipy import stats

    distance = float(stats.wasserstein_distance(reference, current))
    std = float(np.std(reference))
    if std > 0:
        return distance / std
    return 0.0 if distance == 0 else math.inf


def jensen_shannon(p: np.ndarray, q: np.ndarray) -> float:
    """Jensen–Shannon distance (base 2, in [0, 1]) between two discrete distributions."""
    from scipy.spatial import distance

    if not np.sum(p) > 0 or not np.sum(q) > 0:
        return 0.0
    return float(distance.jensenshannon(p, q, base=2))


def detect_drift(
    reference: ReferenceProfile,
    window: Window,
    *,
    alpha: float = DEFAULT_ALPHA,
    correction: Correction = "bonferroni",
    permutations: int = 500,
    mmd_reference_size: int = MMD_REFERENCE_SIZE,
    mmd_window_size: int = MMD_WINDOW_SIZE,
    seed: int = 0,
    min_effect: dict[str, float] | None = None,
) -> DriftReport:
    """Test ``window`` against ``reference``; see the module docstring for the tests.

    ``min_effect`` overrides :data:`MIN_EFFECT` per test name (0 turns the effect-size
    requirement off for that test).

    ``alpha`` is the overall false alarm rate the correction targets. The MMD test uses
    seeded subsamples of at most ``mmd_reference_size`` reference and ``mmd_window_size``
    window embeddings (the newest rows) and at least ``permutations`` permutations — more
    when ``1 / (1 + permutations)``, the smallest possible p-value, would not be well below
    the corrected threshold ``alpha / m``.
    """
    if not 0 < alpha < 1:
        raise ConfigError(f"alpha must be in (0, 1), got {alpha}")
    if permutations < 1:
        raise ConfigError(f"permutations must be at least 1, got {permutations}")
    rng = np.random.default_rng(seed)
    min_effect = {**MIN_EFFECT, **(min_effect or {})}
    notes: list[str] = []
    # (name, method, statistic, p, details, verdict builder)
    raw: list[tuple[str, str, float, float, dict[str, Any], Any]] = []

    for name, ref_values in reference.stats.items():
        if name not in window.stats:
            notes.append(f"{name} is not in the prediction log; not compared")
            continue
        cur = window.stats[name][np.isfinite(window.stats[name])]
        if len(cur) < MIN_VALUES:
            notes.append(f"{name}: only {len(cur)} logged values; not compared")
            continue
        d, p = ks_test(ref_values, cur)
        details = {
            "reference_median": float(np.median(ref_values)),
            "current_median": float(np.median(cur)),
            "reference_mean": float(np.mean(ref_values)),
            "current_mean": float(np.mean(cur)),
        }
        raw.append((name, "ks", d, p, details, (ref_values, cur)))

    d, p = ks_test(reference.confidence, window.confidence)
    conf_details = {
        "reference_median": float(np.median(reference.confidence)),
        "current_median": float(np.median(window.confidence)),
        "reference_mean": float(np.mean(reference.confidence)),
        "current_mean": float(np.mean(window.confidence)),
    }
    raw.append(("confidence", "ks", d, p, conf_details, (reference.confidence, window.confidence)))

    index = {c: i for i, c in enumerate(reference.classes)}
    k = len(reference.classes)
    current_counts = np.zeros(k + 1)
    for label in window.labels:
        current_counts[index.get(label, k)] += 1
    reference_counts = np.append(reference.class_counts.astype(np.float64), 0.0)
    stat, p, method = class_shift_test(reference_counts, current_counts, rng)
    if current_counts[k]:
        notes.append(
            f"{int(current_counts[k])} prediction(s) name classes the reference does not know"
        )
    ref_share = reference_counts / max(reference_counts.sum(), 1)
    cur_share = current_counts / max(current_counts.sum(), 1)
    class_details: dict[str, Any] = {
        "method": method,
        "reference_share": {
            c: round(float(ref_share[i]), 4) for i, c in enumerate(reference.classes)
        },
        "current_share": {
            c: round(float(cur_share[i]), 4) for i, c in enumerate(reference.classes)
        },
        "current_counts": {c: int(current_counts[i]) for i, c in enumerate(reference.classes)},
    }
    raw.append(
        (
            "predicted_class",
            "chi2",
            stat,
            p,
            class_details,
            (ref_share, cur_share, [*reference.classes, "an unknown class"]),
        )
    )
    fmt_test = _format_test(reference.format_counts, window.formats, rng, notes)
    if fmt_test is not None:
        raw.append(fmt_test)

    ref_emb, cur_emb = reference.embeddings, window.embeddings
    if cur_emb.ndim != 2 or len(cur_emb) < MIN_EMBEDDINGS or len(ref_emb) < MIN_EMBEDDINGS:
        notes.append(f"embedding not compared: fewer than {MIN_EMBEDDINGS} embeddings on a side")
    elif cur_emb.shape[1] != ref_emb.shape[1]:
        notes.append(
            f"embedding not compared: the log's embeddings have {cur_emb.shape[1]} values, "
            f"the reference's {ref_emb.shape[1]} (another model answered?)"
        )
    else:
        xs = ref_emb
        if len(xs) > mmd_reference_size:
            xs = xs[np.sort(rng.choice(len(xs), mmd_reference_size, replace=False))]
        ys = cur_emb[-mmd_window_size:]
        # A permutation p-value is at least 1 / (1 + P): make sure it can reach the
        # corrected threshold alpha / m (with room to spare), whatever was asked for.
        perms = max(permutations, math.ceil(2 * (len(raw) + 1) / alpha) - 1)
        mmd2, p, median = mmd_permutation_test(xs, ys, perms, rng)
        mmd_details = {
            "reference_n": len(xs),
            "current_n": len(ys),
            "permutations": perms,
            "median_sq_distance": median,
        }
        raw.append(("embedding", "mmd", mmd2, p, mmd_details, None))

    if reference.model_version and window.model_versions:
        others = [v for v in window.model_versions if v != reference.model_version]
        if others:
            notes.append(
                f"the window holds predictions of model version(s) {others}; "
                f"the reference is version {reference.model_version}"
            )

    levels = thresholds([r[3] for r in raw], alpha, correction)
    tests = []
    for (name, method, stat, p, details, extra), t in zip(raw, levels, strict=True):
        minimum = min_effect.get(name, 0.0)
        if method == "ks":
            effect = normed_wasserstein(extra[0], extra[1])
        elif method == "chi2":
            effect = jensen_shannon(extra[0], extra[1])
        else:
            effect = math.sqrt(max(stat, 0.0))
        drift = p <= t and effect >= minimum
        if method == "ks":
            verdict = _ks_verdict(name, extra[0], extra[1], stat, p, t, effect, minimum)
        elif method == "chi2":
            verdict = _class_verdict(name, extra[2], extra[0], extra[1], p, t, effect, minimum)
        else:
            outcome = _outcome(p, t, effect, minimum, method)
            tail = (
                f"MMD² = {stat:.3g}, p = {_fmt_p(p)} {'≤' if p <= t else '>'} {t:.2g}, "
                f"{details['permutations']} permutations; {_effect_text(method, effect, minimum)}"
            )
            verdict = (
                "embedding: DRIFT — the model's internal representation of the inputs moved "
                f"away from the reference's ({tail})"
                if drift
                else f"embedding: {outcome} ({tail})"
            )
        tests.append(DriftTest(name, method, stat, p, t, drift, verdict, details, effect, minimum))

    return DriftReport(
        drift_detected=any(t.drift for t in tests),
        tests=tuple(tests),
        window=window.info(),
        reference=reference.info(),
        alpha=alpha,
        correction=correction,
        notes=tuple(notes),
    )
