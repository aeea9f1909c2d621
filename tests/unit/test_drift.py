"""Drift detectors on synthetic data with known answers, and windows of a real prediction log."""

from __future__ import annotations

import math
import sqlite3
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest

from visionops.errors import ConfigError, DataError, VisionOpsError
from visionops.monitor.drift import (
    DEFAULT_ALPHA,
    class_shift_test,
    detect_drift,
    ks_test,
    mmd_permutation_test,
    thresholds,
)
from visionops.monitor.reference import ReferenceProfile
from visionops.monitor.window import (
    InsufficientDataError,
    Window,
    load_window,
    parse_time,
    window_from_arrays,
)
from visionops.serve.predlog import PredictionLog, PredictionRecord

CLASSES = tuple(str(i) for i in range(10))
STATS = ("mean_intensity", "ink_fraction", "center_x")


def make_reference(rng: np.random.Generator, n: int = 1000, dim: int = 8) -> ReferenceProfile:
    """A reference whose statistics are N(0.3, 0.05), N(0.2, 0.05), N(0.5, 0.02)."""
    return ReferenceProfile(
        classes=CLASSES,
        n_images=n,
        stats={
            "mean_intensity": rng.normal(0.3, 0.05, n),
            "ink_fraction": rng.normal(0.2, 0.05, n),
            "center_x": rng.normal(0.5, 0.02, n),
        },
        confidence=rng.beta(20, 1, n),
        class_counts=np.full(10, n // 10),
        embeddings=rng.normal(0.0, 1.0, (n, dim)).astype(np.float32),
        model_name="m",
        model_digest="abc",
    )


def make_window(
    rng: np.random.Generator,
    n: int = 200,
    dim: int = 8,
    *,
    intensity: float = 0.3,
    emb_shift: float = 0.0,
    classes: tuple[str, ...] = CLASSES,
) -> Window:
    return window_from_arrays(
        labels=[classes[i] for i in rng.integers(0, len(classes), n)],
        confidence=rng.beta(20, 1, n),
        stats={
            "mean_intensity": rng.normal(intensity, 0.05, n),
            "ink_fraction": rng.normal(0.2, 0.05, n),
            "center_x": rng.normal(0.5, 0.02, n),
        },
        embeddings=rng.normal(0.0, 1.0, (n, dim)) + emb_shift,
    )


# --------------------------------------------------------------------------- single tests


def test_ks_holds_its_false_alarm_rate_and_detects_a_shift() -> None:
    rng = np.random.default_rng(0)
    same = [ks_test(rng.normal(0, 1, 300), rng.normal(0, 1, 100))[1] for _ in range(300)]
    rate = np.mean(np.asarray(same) <= 0.05)
    assert 0.01 <= rate <= 0.10, rate  # about 5 % by construction
    d, p = ks_test(rng.normal(0, 1, 300), rng.normal(0.8, 1, 100))
    assert p < 1e-6 and d > 0.25


def test_class_shift_test_uniform_vs_shifted() -> None:
    rng = np.random.default_rng(1)
    ref = np.full(10, 600.0)
    same = [
        class_shift_test(ref, rng.multinomial(200, np.full(10, 0.1)), rng)[1] for _ in range(200)
    ]
    rate = np.mean(np.asarray(same) <= 0.05)
    assert 0.01 <= rate <= 0.10, rate
    shifted = np.zeros(10)
    shifted[[1, 7]] = [110, 90]  # label shift: only ones and sevens
    stat, p, method = class_shift_test(ref, shifted, rng)
    assert method == "chi-square" and p < 1e-30 and stat > 500


def test_class_shift_test_uses_monte_carlo_for_small_counts() -> None:
    rng = np.random.default_rng(2)
    ref = np.array([500.0, 500.0, 2.0])  # a rare class: expected counts below 5
    _, p, method = class_shift_test(ref, np.array([10.0, 10.0, 10.0]), rng, draws=500)
    assert method.startswith("Monte Carlo")
    assert p == pytest.approx(1 / 501)  # no draw comes near ten of the rare class
    _, p_same, _ = class_shift_test(ref, np.array([15.0, 15.0, 0.0]), rng, draws=500)
    assert p_same > 0.2


def test_mmd_permutation_is_calibrated_and_detects_shifted_embeddings() -> None:
    rng = np.random.default_rng(3)
    ps = [
        mmd_permutation_test(rng.normal(0, 1, (40, 4)), rng.normal(0, 1, (30, 4)), 99, rng)[1]
        for _ in range(60)
    ]
    assert np.mean(np.asarray(ps) <= 0.1) <= 0.25  # about 10 % expected
    assert min(ps) >= 1 / 100  # the permutation p-value can't go below 1/(1+P)
    mmd2, p, median = mmd_permutation_test(
        rng.normal(0, 1, (100, 4)), rng.normal(0.7, 1, (60, 4)), 199, rng
    )
    assert p == pytest.approx(1 / 200) and mmd2 > 0 and median > 0


def test_mmd_sees_a_change_of_shape_that_means_do_not() -> None:
    """Same mean and variance per coordinate, different joint distribution."""
    rng = np.random.default_rng(4)
    x = rng.normal(0, 1, (150, 2))
    z = rng.normal(0, 1, 150)
    y = np.stack([z, z], axis=1)  # perfectly correlated coordinates
    _, p, _ = mmd_permutation_test(x, y, 199, rng)
    assert p <= 0.01


def test_thresholds_bonferroni_and_bh() -> None:
    assert thresholds([0.5, 0.01, 0.2, 0.9], 0.05, "bonferroni") == [0.0125] * 4
    # BH: sorted 0.001, 0.02, 0.03, 0.6 vs 0.0125, 0.025, 0.0375, 0.05 -> k = 3
    levels = thresholds([0.02, 0.6, 0.001, 0.03], 0.05, "bh")
    assert levels == [pytest.approx(0.0375)] * 4
    assert thresholds([0.9, 0.8], 0.05, "bh") == [0.025, 0.025]
    with pytest.raises(ConfigError, match="unknown correction"):
        thresholds([0.1], 0.05, "holm")  # type: ignore[arg-type]


# --------------------------------------------------------------------------- detect_drift


def test_detect_drift_false_alarm_rate_over_repeated_windows() -> None:
    rng = np.random.default_rng(5)
    reference = make_reference(rng)
    alarms = sum(
        detect_drift(reference, make_window(rng, 100), permutations=99, seed=i).drift_detected
        for i in range(40)
    )
    # Bonferroni over 6 tests at alpha 0.05: at most ~2 expected in 40 windows.
    assert alarms <= 5, alarms


def test_detect_drift_flags_the_shifted_statistic_only() -> None:
    rng = np.random.default_rng(6)
    report = detect_drift(make_reference(rng), make_window(rng, 200, intensity=0.4))
    by_name = {t.name: t for t in report.tests}
    assert report.drift_detected
    assert by_name["mean_intensity"].drift
    assert by_name["mean_intensity"].details["current_median"] > 0.35
    assert "DRIFT" in by_name["mean_intensity"].verdict
    assert not by_name["ink_fraction"].drift and not by_name["embedding"].drift
    assert report.drift_score > 1.0
    assert all(
        t.threshold == pytest.approx(DEFAULT_ALPHA / len(report.tests)) for t in report.tests
    )


def test_detect_drift_label_shift_and_embedding_shift() -> None:
    rng = np.random.default_rng(7)
    reference = make_reference(rng)
    label = detect_drift(reference, make_window(rng, 200, classes=("1", "7")))
    assert [t.name for t in label.drifted] == ["predicted_class"]
    emb = detect_drift(reference, make_window(rng, 200, emb_shift=0.5))
    assert [t.name for t in emb.drifted] == ["embedding"]
    # The smallest p-value a permutation test can give: enough permutations for it to sit
    # well below the corrected threshold.
    permutations = max(500, math.ceil(2 * len(emb.tests) / DEFAULT_ALPHA) - 1)
    assert emb.tests[-1].method == "mmd"
    assert emb.tests[-1].p_value == pytest.approx(1 / (permutations + 1))


def test_detect_drift_report_shape_and_notes() -> None:
    rng = np.random.default_rng(8)
    reference = make_reference(rng)
    window = make_window(rng, 60, dim=5, classes=(*CLASSES, "cat"))
    window.stats.pop("center_x")
    report = detect_drift(reference, window, permutations=50)
    d = report.to_dict()
    assert set(d) >= {"drift_detected", "window", "tests", "reference", "drift_score"}
    assert d["window"]["size"] == 60 and d["reference"]["model_digest"] == "abc"
    assert {"name", "statistic", "p_value", "threshold", "drift"} <= set(d["tests"][0])
    names = [t["name"] for t in d["tests"]]
    assert "center_x" not in names and "embedding" not in names  # no column / other size
    assert any("center_x" in n for n in report.notes)
    assert any("5 values" in n for n in report.notes)
    assert any("reference does not know" in n for n in report.notes)  # label "cat"
    with pytest.raises(ConfigError):
        detect_drift(reference, window, alpha=1.5)


# --------------------------------------------------------------------------- windows


def log_rows(
    url: str, n: int, start: datetime, dim: int = 4, version: str = "3", extras: bool = True
) -> None:
    """``n`` predictions through the real prediction-log writer, one second apart."""
    rng = np.random.default_rng(9)
    writer = PredictionLog(url, monitor_extras=extras)
    writer.start()
    try:
        for i in range(n):
            pixels = np.zeros((28, 28, 1), np.uint8)
            pixels[6:22, 12 : 14 + i % 3] = 255
            writer.submit(
                [
                    PredictionRecord(
                        created_at=start + timedelta(seconds=i),
                        request_id=f"req-{i}",
                        input_index=0,
                        model_name="m",
                        model_version=version,
                        model_alias="champion",
                        label=str(i % 10),
                        class_index=i % 10,
                        confidence=0.9,
                        accepted=True,
                        probabilities={c: 0.1 for c in CLASSES},
                        embedding=rng.normal(size=dim).tolist(),
                        pixels=pixels,
                    )
                ]
            )
    finally:
        writer.close()


@pytest.fixture(scope="module")
def predlog(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, datetime]:
    url = f"sqlite:///{tmp_path_factory.mktemp('predlog') / 'predictions.db'}"
    start = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)
    log_rows(url, 80, start)
    return url, start


def test_load_window_last_n(predlog: tuple[str, datetime]) -> None:
    url, start = predlog
    w = load_window(url, 50)
    assert w.size == 50 and w.request_ids[0] == "req-30" and w.request_ids[-1] == "req-79"
    assert list(w.ids) == sorted(w.ids)
    assert w.start == start + timedelta(seconds=30) and w.end == start + timedelta(seconds=79)
    assert w.embeddings.shape == (50, 4) and list(w.embedding_rows) == list(range(50))
    assert w.stats["bbox_height"][0] == 16 and w.stats["bbox_width"][0] == 2 + 30 % 3
    assert "stroke_thickness" in w.stats  # the server logs it
    assert w.thumbnails is None and w.model_versions == ("3",)
    thumbs = load_window(url, 50, thumbnails=True).thumbnails
    assert thumbs is not None and str(thumbs[0]).startswith("iVBOR")  # base64 of a PNG


def test_load_window_time_range_and_embedding_limit(predlog: tuple[str, datetime]) -> None:
    url, start = predlog
    w = load_window(url, since=start + timedelta(seconds=10), until=start + timedelta(seconds=50))
    assert w.size == 40 and w.request_ids[0] == "req-10" and w.request_ids[-1] == "req-49"
    # ISO text with an offset means the same instant.
    same = load_window(url, since="2025-03-01T13:00:10+01:00", until="2025-03-01T12:00:50Z")
    assert same.request_ids == w.request_ids
    w2 = load_window(url, 60, max_embeddings=10)
    assert w2.embeddings.shape == (10, 4) and list(w2.embedding_rows) == list(range(50, 60))
    part = w2.slice(45, 60)
    assert part.size == 15 and len(part.embeddings) == 10 and part.embedding_rows[0] == 5


def test_load_window_too_few_rows_is_a_clear_project_error(
    predlog: tuple[str, datetime], tmp_path: Path
) -> None:
    url, start = predlog
    with pytest.raises(InsufficientDataError, match=r"only 20 prediction\(s\).*at least 30") as e:
        load_window(url, since=start + timedelta(seconds=60))
    assert isinstance(e.value, VisionOpsError) and e.value.rows == 20
    with pytest.raises(InsufficientDataError, match="only 0"):
        load_window(url, 100, model_version="99")
    with pytest.raises(DataError, match="no prediction log"):
        load_window(f"sqlite:///{tmp_path / 'missing.db'}", 100)
    with pytest.raises(ConfigError, match="window size"):
        load_window(url)
    with pytest.raises(ConfigError, match="ISO 8601"):
        parse_time("yesterday", "since")


def test_rows_without_stroke_thickness_are_left_out_of_that_test(tmp_path: Path) -> None:
    """Rows logged without the optional columns (an older server) hold NULL there."""
    url = f"sqlite:///{tmp_path / 'mixed.db'}"
    start = datetime(2025, 3, 2, tzinfo=UTC)
    log_rows(url, 40, start, extras=False)
    with sqlite3.connect(tmp_path / "mixed.db") as conn:  # nor the logged input to derive it
        conn.execute("UPDATE predictions SET input_pixels = NULL")
    log_rows(url, 35, start + timedelta(minutes=5))
    w = load_window(url, 75)
    assert np.isnan(w.stats["stroke_thickness"][:40]).all()
    assert np.isfinite(w.stats["stroke_thickness"][40:]).all()
    rng = np.random.default_rng(10)
    reference = make_reference(rng, dim=4)
    reference.stats["stroke_thickness"] = rng.normal(1.6, 0.2, 500)
    report = detect_drift(reference, w, permutations=50)
    assert "stroke_thickness" in [t.name for t in report.tests]
    old = load_window(url, since=start, until=start + timedelta(minutes=1))
    assert "stroke_thickness" not in old.stats
    assert any("stroke_thickness" in n for n in detect_drift(reference, old).notes)


def _photo_reference(rng: np.random.Generator, n: int = 600) -> ReferenceProfile:
    """Photos of about 400×300 pixels, three in four PNG, one in four JPEG."""
    from dataclasses import replace

    from visionops.monitor.stats import size_statistics

    sizes = np.stack([rng.normal(400, 20, n), rng.normal(300, 15, n)], 1).round()
    return replace(
        make_reference(rng, n),
        stats={**make_reference(rng, n).stats, **size_statistics(sizes)},
        format_counts={"JPEG": n // 4, "PNG": n - n // 4},
    )


def _photo_window(
    rng: np.random.Generator, formats: list[str | None], scale: float = 1.0
) -> Window:
    from visionops.monitor.stats import size_statistics

    base = make_window(rng, len(formats))
    sizes = np.stack([rng.normal(400, 20, len(formats)), rng.normal(300, 15, len(formats))], 1)
    stats = {**base.stats, **size_statistics((sizes * scale).round())}
    return window_from_arrays(base.labels, base.confidence, stats, base.embeddings, formats=formats)


def test_photo_windows_in_distribution_are_quiet_on_format_and_size() -> None:
    rng = np.random.default_rng(21)
    reference = _photo_reference(rng)
    formats = ["PNG" if rng.random() < 0.75 else "JPEG" for _ in range(200)]
    report = detect_drift(reference, _photo_window(rng, formats))
    by_name = {t.name: t for t in report.tests}
    assert {"original_format", "original_width", "original_aspect"} <= set(by_name)
    assert not report.drift_detected, [t.verdict for t in report.drifted]


def test_a_new_upload_format_is_format_drift() -> None:
    rng = np.random.default_rng(22)
    report = detect_drift(_photo_reference(rng), _photo_window(rng, ["WEBP"] * 200))
    fmt = {t.name: t for t in report.tests}["original_format"]
    assert fmt.drift and report.drift_detected
    assert fmt.method == "chi2" and fmt.effect > 0.5
    assert fmt.details["current_share"]["WEBP"] == 1.0
    assert fmt.details["reference_share"] == {"JPEG": 0.25, "PNG": 0.75, "WEBP": 0.0}
    assert "mix of file formats changed" in fmt.verdict and "'WEBP'" in fmt.verdict
    # Sizes and everything else are as in the reference: only the format drifted.
    assert [t.name for t in report.drifted] == ["original_format"]


def test_much_larger_pictures_drift_width_and_height_not_aspect() -> None:
    rng = np.random.default_rng(23)
    formats = ["PNG" if i % 4 else "JPEG" for i in range(200)]
    report = detect_drift(_photo_reference(rng), _photo_window(rng, formats, scale=3.0))
    drifted = {t.name for t in report.drifted}
    assert {"original_width", "original_height"} <= drifted
    assert "original_aspect" not in drifted and "original_format" not in drifted


def test_format_is_not_compared_without_logged_formats() -> None:
    rng = np.random.default_rng(24)
    report = detect_drift(_photo_reference(rng), _photo_window(rng, [None] * 200))
    assert "original_format" not in {t.name for t in report.tests}
    assert any("original_format: only 0 logged values" in n for n in report.notes)
