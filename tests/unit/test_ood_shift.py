"""The class-conditional OOD-score alarm (``ood_score_shift``) on windows with known answers.

Synthetic per-class OOD scores whose classes sit at different distances from the training
bank (as MNIST's do: '1' close, '2' and '8' far), so a change of the class mix alone would
move a pooled score distribution.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from visionops.errors import ConfigError
from visionops.monitor.performance import (
    MIN_OOD_SHIFT,
    OOD_SHIFT_LEVEL,
    assess_performance,
    ood_score_shift,
)
from visionops.monitor.reference import OodScoreProfile, ReferenceProfile
from visionops.monitor.verdict import assess_window
from visionops.monitor.window import Window, window_from_arrays

CLASSES = tuple(str(i) for i in range(10))
#: Where each class's scores centre (class 1 closest to the bank, 2 and 8 farthest).
CENTRES = np.asarray([0.23, 0.13, 0.30, 0.25, 0.26, 0.25, 0.22, 0.25, 0.30, 0.25])
SPREAD = 0.05


def scores_of(classes: np.ndarray, rng: np.random.Generator, shift: float = 0.0) -> np.ndarray:
    return CENTRES[classes] + SPREAD * rng.standard_normal(len(classes)) + shift


def reference(rng: np.random.Generator, *, with_ood: bool = True) -> ReferenceProfile:
    n = 6000
    predicted = rng.integers(0, 10, n)
    profile = (
        OodScoreProfile.from_scores(scores_of(predicted, rng), predicted, 10, k=1)
        if with_ood
        else None
    )
    return ReferenceProfile(
        classes=CLASSES,
        n_images=n,
        stats={"ink_fraction": rng.normal(0.2, 0.05, 2000)},
        confidence=rng.beta(200, 1, 2000),
        class_counts=np.bincount(predicted, minlength=10),
        embeddings=rng.normal(0.0, 1.0, (500, 8)).astype(np.float32),
        accuracy=0.995,
        ood_scores=profile,
    )


def window(
    rng: np.random.Generator,
    n: int = 200,
    *,
    shift: float = 0.0,
    classes: tuple[int, ...] = tuple(range(10)),
    logged: bool = True,
) -> Window:
    predicted = rng.choice(np.asarray(classes), n)
    return window_from_arrays(
        labels=[CLASSES[c] for c in predicted],
        confidence=rng.beta(200, 1, n),
        stats={"ink_fraction": rng.normal(0.2, 0.05, n)},
        embeddings=rng.normal(0.0, 1.0, (n, 8)),
        ood_scores=scores_of(predicted, rng, shift) if logged else None,
    )


def test_scores_shifted_within_their_classes_raise_the_alarm() -> None:
    rng = np.random.default_rng(0)
    ref = reference(rng)
    # One spread up: about 39 % of the rows above their class's 90th percentile.
    perf = assess_performance(ref, window(rng, shift=SPREAD))
    shift = perf.ood_shift
    assert shift is not None and shift.skipped is None and shift.n == 200
    assert shift.rate is not None and shift.rate - shift.expected >= MIN_OOD_SHIFT
    assert shift.p_value is not None and shift.p_value < 1e-6
    assert perf.alarm and any("(ood_score_shift)" in r for r in perf.reasons), perf.reasons
    # The confidences are as high as the reference's: no other check fired.
    assert len(perf.reasons) == 1
    out = perf.to_dict()["ood_score_shift"]
    assert out["status"] == "alarm" and out["level"] == OOD_SHIFT_LEVEL


def test_unshifted_and_label_shifted_windows_stay_quiet() -> None:
    rng = np.random.default_rng(1)
    ref = reference(rng)
    for _ in range(20):
        calm = ood_score_shift(window(rng), ref)
        assert not calm.alarm and calm.rate is not None and calm.rate < 0.2
    # Only the far classes 2 and 8: pooled over all classes, their scores would sit far
    # above the reference's 90th percentile; within their classes they are as usual.
    shifted_mix = window(rng, n=500, classes=(2, 8))
    assert shifted_mix.ood_scores is not None
    everyone = rng.integers(0, 10, 6000)
    pooled_bound = np.quantile(scores_of(everyone, rng), OOD_SHIFT_LEVEL)
    pooled = float(np.mean(shifted_mix.ood_scores > pooled_bound))
    assert pooled - (1 - OOD_SHIFT_LEVEL) >= MIN_OOD_SHIFT  # a pooled check would alarm
    verdict = assess_window(ref, shifted_mix, permutations=50)
    shift = verdict.performance.ood_shift
    assert shift is not None and shift.rate is not None and shift.rate < 0.16
    assert not verdict.alarm, verdict.performance.reasons
    assert verdict.to_dict()["ood_score_shift"]["status"] == "ok"


def test_a_small_rise_in_a_large_window_is_significant_but_not_an_alarm() -> None:
    rng = np.random.default_rng(2)
    ref = reference(rng)
    shift = ood_score_shift(window(rng, n=5000, shift=0.15 * SPREAD), ref)
    assert shift.rate is not None and 0.11 < shift.rate < 0.1 + MIN_OOD_SHIFT
    assert shift.p_value is not None and shift.p_value < 0.01
    assert not shift.alarm
    # The same rise demanded of a looser minimum effect does alarm.
    assert ood_score_shift(window(rng, n=5000, shift=0.15 * SPREAD), ref, min_rise=0.01).alarm
    with pytest.raises(ConfigError, match="min_ood_shift"):
        assess_performance(ref, window(rng), min_ood_shift=1.5)


def test_an_old_reference_or_a_log_without_scores_skips_the_check() -> None:
    rng = np.random.default_rng(3)
    old = reference(rng, with_ood=False)
    verdict = assess_window(old, window(rng, shift=3 * SPREAD), permutations=50)
    shift = verdict.performance.ood_shift
    assert shift is not None and shift.skipped is not None and not shift.alarm
    assert "no per-class OOD scores" in shift.skipped
    out = verdict.to_dict()
    assert out["ood_score_shift"]["status"] == "skipped" and out["ood_score_shift"]["rate"] is None
    assert "OOD-score check skipped" in out["verdict"]
    assert not any("ood_score_shift" in r for r in verdict.performance.reasons)

    unlogged = ood_score_shift(window(rng, logged=False), reference(rng))
    assert unlogged.skipped == "the prediction log has no ood_score column"
    nan_rows = window(rng)
    assert nan_rows.ood_scores is not None
    nan_rows.ood_scores[:] = np.nan
    assert ood_score_shift(nan_rows, reference(rng)).skipped == (
        "no prediction of the window logged an OOD score"
    )


def _log(url: str, rng: np.random.Generator, n: int, shift: float) -> None:
    from datetime import UTC, datetime, timedelta

    from visionops.serve.predlog import PredictionLog, PredictionRecord

    writer = PredictionLog(url)
    writer.start()
    predicted = rng.integers(0, 10, n)
    scores = scores_of(predicted, rng, shift)
    start = datetime(2025, 1, 1, tzinfo=UTC)
    writer.submit(
        PredictionRecord(
            created_at=start + timedelta(seconds=i),
            request_id=f"r{i}",
            input_index=0,
            model_name="m",
            model_version=None,
            model_alias=None,
            label=CLASSES[c],
            class_index=int(c),
            confidence=0.999,
            accepted=True,
            probabilities={name: 0.0 for name in CLASSES},
            embedding=rng.normal(0.0, 1.0, 8).tolist(),
            pixels=np.zeros((28, 28, 1), np.uint8),
            ood_score=float(s),
        )
        for i, (c, s) in enumerate(zip(predicted, scores, strict=True))
    )
    writer.close()


def test_logged_scores_reach_the_check_and_the_report(tmp_path: Path) -> None:
    from visionops.monitor.check import run_check
    from visionops.monitor.report import build_monitoring_html

    rng = np.random.default_rng(4)
    ref = reference(rng)
    calm_url, storm_url = (f"sqlite:///{tmp_path / name}.db" for name in ("calm", "storm"))
    _log(calm_url, rng, 200, 0.0)
    _log(storm_url, rng, 200, 1.5 * SPREAD)

    storm = run_check(200, storm_url, ref)
    assert storm.exit_code == 1
    assert any("(ood_score_shift)" in r for r in storm.verdict.performance.reasons)
    calm = run_check(200, calm_url, ref)
    assert calm.exit_code == 0, calm.verdict.performance.reasons
    shift = calm.verdict.performance.ood_shift
    assert shift is not None and shift.n == 200 and shift.rate is not None and shift.rate < 0.2

    page, verdict, _ = build_monitoring_html(ref, storm_url, 200, history_windows=1)
    assert verdict.alarm
    row = page[page.index('id="ood-score-shift"') :].split("</tr>")[0]
    assert "ood_score_shift" in row and "10.0 % expected" in row
    stormy = verdict.performance.ood_shift
    assert stormy is not None and stormy.rate is not None and f"{100 * stormy.rate:.1f} %" in row
