"""The two levels of a verdict: data drift needs an effect size, the alarm needs harm.

Synthetic references and windows with known answers; temperature scaling on logits drawn
from a known temperature; the feedback export on a real SQLite prediction log.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from visionops.calibration import ece, fit_temperature, softmax
from visionops.errors import DataError
from visionops.monitor.drift import detect_drift, jensen_shannon, normed_wasserstein
from visionops.monitor.feedback import export_feedback_images, record_feedback
from visionops.monitor.performance import (
    MIN_LABELLED,
    assess_performance,
    estimate_accuracy,
    wilson_interval,
)
from visionops.monitor.reference import ReferenceProfile, atc_threshold
from visionops.monitor.verdict import assess_window
from visionops.monitor.window import Window, window_from_arrays
from visionops.serve.predlog import (
    PredictionLog,
    PredictionRecord,
    create_predlog_engine,
    decode_pixels,
    now_utc,
)

CLASSES = tuple(str(i) for i in range(10))


def reference(rng: np.random.Generator, n: int = 2000, accuracy: float = 0.95) -> ReferenceProfile:
    return ReferenceProfile(
        classes=CLASSES,
        n_images=n,
        stats={"ink_fraction": rng.normal(0.2, 0.05, n)},
        confidence=rng.beta(20, 1, n),
        class_counts=np.full(10, n // 10),
        embeddings=rng.normal(0.0, 1.0, (1000, 8)).astype(np.float32),
        accuracy=accuracy,
    )


def window(
    rng: np.random.Generator,
    n: int = 300,
    *,
    ink: float = 0.2,
    confidence: np.ndarray | None = None,
    emb_shift: float = 0.0,
    accepted: np.ndarray | None = None,
) -> Window:
    return window_from_arrays(
        labels=[CLASSES[i] for i in rng.integers(0, 10, n)],
        confidence=rng.beta(20, 1, n) if confidence is None else confidence,
        stats={"ink_fraction": rng.normal(ink, 0.05, n)},
        embeddings=rng.normal(emb_shift, 1.0, (n, 8)),
        accepted=accepted,
    )


# --------------------------------------------------------------------------- data drift


def test_a_large_window_of_a_harmless_shift_is_significant_but_not_drift() -> None:
    rng = np.random.default_rng(0)
    ref = reference(rng, n=5000)
    # A shift of 8 % of the spread: KS finds it at 5,000 rows, it does not matter.
    w = window(rng, n=5000, ink=0.204)
    report = detect_drift(ref, w, permutations=200)
    ink = next(t for t in report.tests if t.name == "ink_fraction")
    assert ink.significant and not ink.drift
    assert 0.05 < ink.effect < 0.1 and ink.min_effect == 0.1
    assert "effect is small" in ink.verdict
    assert not report.drift_detected and report.drift_score < 1
    # Three times the minimum effect: drift.
    big = detect_drift(ref, window(rng, n=5000, ink=0.215), permutations=200)
    assert next(t for t in big.tests if t.name == "ink_fraction").drift
    assert big.drift_detected and big.drift_score >= 1


def test_effect_sizes_have_their_textbook_values() -> None:
    rng = np.random.default_rng(1)
    a = rng.normal(0.0, 2.0, 20000)
    # Shifting a sample by one standard deviation moves it one (normed) unit.
    assert normed_wasserstein(a, a + 2.0) == pytest.approx(1.0, rel=0.02)
    assert normed_wasserstein(np.zeros(5), np.zeros(5)) == 0.0
    assert jensen_shannon(np.array([1.0, 0.0]), np.array([0.0, 1.0])) == pytest.approx(1.0)
    assert jensen_shannon(np.array([0.5, 0.5]), np.array([0.5, 0.5])) == pytest.approx(0.0)


def test_label_shift_is_data_drift_with_the_class_counts() -> None:
    rng = np.random.default_rng(2)
    ref = reference(rng)
    w = window_from_arrays(
        labels=["1"] * 120 + ["7"] * 80,
        confidence=rng.beta(20, 1, 200),
        stats={"ink_fraction": rng.normal(0.2, 0.05, 200)},
        embeddings=rng.normal(0.0, 1.0, (200, 8)),
    )
    verdict = assess_window(ref, w, permutations=200)
    cls = next(t for t in verdict.drift.tests if t.name == "predicted_class")
    assert cls.drift and cls.details["current_counts"]["1"] == 120
    assert cls.details["current_counts"]["7"] == 80 and cls.details["current_counts"]["3"] == 0
    assert verdict.drift_detected and not verdict.alarm  # the model is as sure as ever


# --------------------------------------------------------------------------- the alarm


def test_atc_estimate_is_the_share_above_the_reference_threshold() -> None:
    ref_conf = np.linspace(0.5, 1.0, 1001)
    t = atc_threshold(ref_conf, 0.9)
    assert np.mean(ref_conf > t) == pytest.approx(0.9, abs=0.002)
    conf = np.array([0.99] * 70 + [0.51] * 30)
    est = estimate_accuracy(conf, ref_conf, 0.9)
    assert est.method == "ATC" and est.value == pytest.approx(0.7)
    assert (est.low, est.high) == pytest.approx(wilson_interval(70, 100))
    assert est.cbpe == pytest.approx(conf.mean()) and est.reference == 0.9
    # The reference's own threshold (from its whole split) wins over its sample's.
    assert estimate_accuracy(conf, ref_conf, 0.9, threshold=0.995).value == 0.0
    # Without the reference's accuracy: CBPE, the mean confidence.
    cbpe = estimate_accuracy(conf, ref_conf, None)
    assert cbpe.method == "CBPE" and cbpe.value == pytest.approx(conf.mean())
    assert cbpe.low < cbpe.value < cbpe.high


def test_wilson_interval_matches_a_hand_computation() -> None:
    low, high = wilson_interval(8, 10)  # p = 0.8, z = 1.96
    assert (low, high) == pytest.approx((0.4902, 0.9433), abs=1e-3)
    assert wilson_interval(0, 0) == (0.0, 1.0)


def test_data_drift_alone_raises_no_alarm_and_unsure_traffic_does() -> None:
    rng = np.random.default_rng(3)
    ref = reference(rng)
    drifted = assess_window(ref, window(rng, ink=0.35), permutations=200)
    assert drifted.drift_detected and not drifted.alarm
    assert drifted.to_dict()["alarm"] is False and drifted.to_dict()["alarm_reasons"] == []

    unsure = assess_window(ref, window(rng, confidence=rng.beta(2, 2, 300)), permutations=200)
    assert unsure.alarm and unsure.performance.estimated.value < 0.5
    assert unsure.performance.reasons[0].startswith("estimated accuracy fell")
    body = unsure.to_dict()
    assert body["estimated_accuracy"]["method"] == "ATC" and body["realised_accuracy"] is None


def test_confident_out_of_distribution_inputs_raise_the_alarm() -> None:
    rng = np.random.default_rng(4)
    ref = reference(rng)
    # As sure as the reference, but far from anything it holds (noise read as an "8").
    perf = assess_performance(ref, window(rng, emb_shift=4.0))
    assert perf.alarm and perf.ood is not None and perf.ood.rate > 0.9
    assert any(r.startswith("out-of-distribution inputs rose") for r in perf.reasons)
    assert perf.estimated.value > 0.9  # the estimate alone would have missed it
    calm = assess_performance(ref, window(rng))
    assert not calm.alarm and calm.ood is not None and calm.ood.rate < 0.05


def test_rejected_share_raises_the_alarm_only_when_it_rose_enough() -> None:
    rng = np.random.default_rng(5)
    ref = reference(rng)
    conf = rng.beta(20, 1, 300)
    rejected = np.ones(300, bool)
    rejected[:60] = False  # 20 % not accepted, against ~0 % in the reference
    perf = assess_performance(ref, window(rng, confidence=conf, accepted=rejected))
    assert perf.rejected is not None and perf.rejected.rate == pytest.approx(0.2)
    assert any(r.startswith("low-confidence inputs rose") for r in perf.reasons)
    few = np.ones(300, bool)
    few[:3] = False  # 1 %: significant perhaps, but below the minimum rise
    assert not assess_performance(ref, window(rng, confidence=conf, accepted=few)).alarm


def test_realised_accuracy_from_feedback_raises_the_alarm() -> None:
    rng = np.random.default_rng(6)
    ref = reference(rng, accuracy=0.95)
    w = window(rng)
    bad = assess_performance(ref, w, feedback=(MIN_LABELLED + 10, 20))
    assert bad.alarm and bad.realised is not None and bad.realised.value == pytest.approx(0.5)
    assert any(r.startswith("realised accuracy fell") for r in bad.reasons)
    # Too few labels to say anything, and a good realised accuracy: no alarm.
    assert not assess_performance(ref, w, feedback=(10, 0)).alarm
    assert not assess_performance(ref, w, feedback=(100, 96)).alarm


# --------------------------------------------------------------------------- calibration


def test_temperature_scaling_recovers_a_known_temperature() -> None:
    rng = np.random.default_rng(7)
    logits = rng.normal(0.0, 3.0, (6000, 10))
    true_t = 2.0
    probs = softmax(logits, true_t)
    y = np.array([rng.choice(10, p=p) for p in probs])
    fit = fit_temperature(logits, y)
    assert fit.temperature == pytest.approx(true_t, rel=0.1)
    assert fit.nll_after < fit.nll_before and fit.ece_after < fit.ece_before
    assert ece(softmax(logits, fit.temperature), y) < 0.02
    with pytest.raises(DataError, match="labels"):
        fit_temperature(logits[:5], y[:4])


# --------------------------------------------------------------------------- feedback export


def test_feedback_export_writes_labelled_inputs_byte_exact(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'log.db'}"
    rng = np.random.default_rng(8)
    pixels = rng.integers(0, 256, (3, 28, 28, 1), dtype=np.uint8)
    writer = PredictionLog(url)
    writer.start()
    writer.submit(
        PredictionRecord(
            created_at=now_utc(),
            request_id=f"r{i}",
            input_index=0,
            model_name="m",
            model_version="1",
            model_alias=None,
            label="3",
            class_index=3,
            confidence=0.9,
            accepted=True,
            probabilities={c: 0.1 for c in CLASSES},
            embedding=[0.0, 1.0],
            pixels=pixels[i],
        )
        for i in range(3)
    )
    writer.close()
    engine = create_predlog_engine(url)
    with pytest.raises(DataError, match="no feedback"):
        export_feedback_images(url, tmp_path / "out")
    record_feedback(engine, "r0", "7")
    record_feedback(engine, "r2", "3")
    engine.dispose()

    result = export_feedback_images(url, tmp_path / "out")
    assert result.written == 2 and result.per_class == {"3": 1, "7": 1}
    from PIL import Image

    (seven,) = (tmp_path / "out" / "7").glob("*.png")
    np.testing.assert_array_equal(np.asarray(Image.open(seven)), pixels[0][:, :, 0])
    with pytest.raises(DataError, match="version 9"):
        export_feedback_images(url, tmp_path / "out", model_version="9")
    with pytest.raises(DataError):  # a damaged row says so (the export skips it)
        decode_pixels(b"\x00" * 5, "2x2x1")
