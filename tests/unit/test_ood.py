"""Out-of-distribution signals: no ink, edge density, kNN embedding distance, calibration."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from visionops.data.transforms import PreprocessSpec, image_to_array
from visionops.errors import ModelError
from visionops.monitor.simulate import load_mnist_test
from visionops.ood import (
    BANK_FILE,
    PROJECTION_FILE,
    OodDetector,
    calibrate,
    edge_density,
    ink_pixel_counts,
    knn_distance,
    l2_normalise,
    no_ink,
    pca_projection,
    screen_pixels,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from nondigits import KINDS, non_digit_images

SPEC = PreprocessSpec(mean=(0.1307,), std=(0.3081,))
BLANK_KINDS = ("blank", "uniform_colour", "transparent")


@pytest.fixture(scope="module")
def mnist() -> np.ndarray:
    """2,000 images of the bundled MNIST test set, uint8 (N, 28, 28, 1)."""
    x, _ = load_mnist_test()
    return np.asarray(x[:2000], np.uint8).reshape(-1, 28, 28, 1)


@pytest.fixture(scope="module")
def non_digits() -> list[tuple[str, str, np.ndarray]]:
    return [(n.kind, n.name, image_to_array(n.image, SPEC)) for n in non_digit_images()]


def _ramp(width: int = 12, height: int = 20) -> np.ndarray:
    """A smooth left-to-right ramp filling a digit-sized box: a gradient, not strokes."""
    a = np.zeros((1, 28, 28, 1), np.uint8)
    a[0, 4 : 4 + height, 8 : 8 + width, 0] = np.linspace(10, 255, width).astype(np.uint8)
    return a


def _stroke(width: int) -> np.ndarray:
    """A vertical bar ``width`` pixels wide, 20 tall: the shape of a "1"."""
    a = np.zeros((1, 28, 28, 1), np.uint8)
    a[0, 4:24, 14 : 14 + width, 0] = 255
    return a


# --------------------------------------------------------------------------- generator


def test_the_generator_covers_every_kind_deterministically() -> None:
    first, again = non_digit_images(seed=3), non_digit_images(seed=3)
    assert {n.kind for n in first} == set(KINDS)
    assert [n.name for n in first] == [n.name for n in again]
    assert all(
        np.array_equal(np.asarray(a.image), np.asarray(b.image))
        for a, b in zip(first, again, strict=True)
    )
    assert len({n.name for n in first}) == len(first) >= 50


# --------------------------------------------------------------------------- no ink


def test_blank_uniform_and_transparent_images_have_no_ink(
    non_digits: list[tuple[str, str, np.ndarray]],
) -> None:
    blanks = [(name, a) for kind, name, a in non_digits if kind in BLANK_KINDS]
    assert len(blanks) >= 15
    pixels = np.stack([a for _, a in blanks])
    assert ink_pixel_counts(pixels).tolist() == [0] * len(blanks)
    missed = [n for (n, _), b in zip(blanks, no_ink(pixels), strict=True) if not b]
    assert not missed


def test_mnist_digits_all_have_ink_and_strokes(mnist: np.ndarray) -> None:
    counts = ink_pixel_counts(mnist)
    assert counts.min() >= 15  # far above the default minimum of 8
    screen = screen_pixels(mnist, min_ink_pixels=8, min_edge_density=0.44)
    assert not screen.no_ink.any()
    assert screen.no_strokes.mean() <= 0.005


def test_ink_counts_follow_the_half_ink_level() -> None:
    a = np.zeros((2, 28, 28, 1), np.uint8)
    a[0, :3, :3] = 128  # 9 pixels exactly at half ink
    a[1, :3, :3] = 127  # just below
    assert ink_pixel_counts(a).tolist() == [9, 0]
    assert no_ink(a, min_ink_pixels=9).tolist() == [False, True]
    assert no_ink(a, min_ink_pixels=0).tolist() == [False, False]  # 0 switches it off
    rgb = np.repeat(a, 3, axis=3)
    assert ink_pixel_counts(rgb).tolist() == [9, 0]
    with pytest.raises(ValueError, match="N, H, W, C"):
        ink_pixel_counts(np.zeros((28, 28)))


# --------------------------------------------------------------------------- edge density


def test_edge_density_separates_smooth_fields_from_strokes() -> None:
    assert edge_density(_ramp())[0] < 0.44
    for width in (1, 2, 3, 5):
        assert edge_density(_stroke(width))[0] > 0.44, width
    # Contrast does not matter: a faint stroke is as stroke-like as a full one.
    faint = (_stroke(2) // 5).astype(np.uint8)
    assert edge_density(faint)[0] == pytest.approx(edge_density(_stroke(2))[0], rel=1e-6)
    assert edge_density(np.zeros((1, 28, 28, 1), np.uint8))[0] == 0.0


def test_smooth_ink_is_screened_but_blank_is_only_no_ink() -> None:
    batch = np.concatenate([_ramp(), _stroke(3), np.zeros((1, 28, 28, 1), np.uint8)])
    screen = screen_pixels(batch, min_ink_pixels=8, min_edge_density=0.44)
    assert screen.no_ink.tolist() == [False, False, True]
    assert screen.no_strokes.tolist() == [True, False, False]
    off = screen_pixels(batch, min_ink_pixels=8, min_edge_density=0.0)
    assert not off.no_strokes.any()


# --------------------------------------------------------------------------- kNN distance


def test_knn_distance_is_the_kth_nearest_on_the_unit_sphere() -> None:
    bank = l2_normalise(np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]]))
    bank_t = np.ascontiguousarray(bank.T)
    q = np.array([[5.0, 0.0], [0.0, -2.0], [-1.0, 0.0]])  # scale must not matter
    np.testing.assert_allclose(knn_distance(q, bank_t, 1), [0.0, np.sqrt(2), 0.0], atol=1e-6)
    np.testing.assert_allclose(knn_distance(q, bank_t, 2), [np.sqrt(2)] * 3, atol=1e-6)
    np.testing.assert_allclose(knn_distance(q, bank_t, 3), [2.0, 2.0, 2.0], atol=1e-6)
    np.testing.assert_allclose(knn_distance(q, bank_t, 1, exclude_self=True)[0], np.sqrt(2))


def test_knn_distance_matches_a_brute_force_loop() -> None:
    rng = np.random.default_rng(1)
    bank = l2_normalise(rng.normal(size=(300, 16)))
    q = rng.normal(size=(40, 16))
    got = knn_distance(q, np.ascontiguousarray(bank.T), 5)
    qn = q / np.linalg.norm(q, axis=1, keepdims=True)
    want = [np.sort(np.linalg.norm(bank - row, axis=1))[4] for row in qn]
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_projected_distance_is_the_full_one_when_the_directions_span_the_bank() -> None:
    rng = np.random.default_rng(6)
    # Unit rows in a 6-dimensional subspace of 32 dimensions (plus their shift): six
    # principal directions hold every difference between rows.
    basis = np.linalg.qr(rng.normal(size=(32, 6)))[0]
    bank = l2_normalise(rng.normal(size=(400, 6)) @ basis.T + 0.0)
    projection, kept = pca_projection(bank, 7)
    assert projection.shape == (32, 7) and projection.dtype == np.float32
    assert kept == pytest.approx(1.0, abs=1e-6)
    q = rng.normal(size=(30, 6)) @ basis.T  # queries in the same subspace
    full = knn_distance(q, np.ascontiguousarray(bank.T), 3)
    pb = bank @ projection
    got = knn_distance(
        q,
        np.ascontiguousarray(pb.T),
        3,
        projection=projection,
        bank_sq=(pb**2).sum(axis=1).astype(np.float32),
    )
    np.testing.assert_allclose(got, full, atol=1e-4)
    # Fewer directions than the data has: distances shrink (a projection is a contraction).
    few, kept_few = pca_projection(bank, 2)
    pb2 = bank @ few
    short = knn_distance(
        q, np.ascontiguousarray(pb2.T), 3, projection=few, bank_sq=(pb2**2).sum(axis=1)
    )
    assert kept_few < 0.9 and (short <= full + 1e-5).all() and (short < full - 1e-3).any()
    with pytest.raises(ValueError, match="dims must lie in"):
        pca_projection(bank, 32)
    with pytest.raises(ValueError, match="bank_sq"):
        knn_distance(q, np.ascontiguousarray(pb.T), 1, projection=projection)


# --------------------------------------------------------------------------- calibration


def _clusters(rng: np.random.Generator, n: int, centre: float = 0.0) -> np.ndarray:
    """Points around 10 class directions, like a trained network's embeddings."""
    means = np.eye(10, 32) * 6.0 + centre
    return means[rng.integers(0, 10, n)] + rng.normal(size=(n, 32))


def test_calibrated_threshold_holds_its_false_rejection_rate() -> None:
    rng = np.random.default_rng(0)
    bank, val, fresh = _clusters(rng, 2000), _clusters(rng, 4000), _clusters(rng, 20000)
    detector = calibrate(bank, val, 0.01, k=3)
    val_rejected = detector.is_out(detector.score(val))
    assert int(val_rejected.sum()) == 40  # exactly 1 % of the calibration split
    assert detector.calibration["rejected_share"] == pytest.approx(0.01)
    # New images of the same distribution: 1 % within 3 standard deviations (0.5 %: the
    # quantile of 4,000 calibration images and the 20,000 fresh ones both vary).
    assert abs(detector.is_out(detector.score(fresh)).mean() - 0.01) < 0.005
    # Embeddings of another distribution are rejected.
    other = rng.normal(size=(500, 32)) * 3.0 - 4.0
    assert detector.is_out(detector.score(other)).mean() > 0.95


def test_pixel_tests_share_the_budget_with_the_embedding_test() -> None:
    rng = np.random.default_rng(2)
    n = 1000
    pixels = np.concatenate([_stroke(int(w)) for w in rng.integers(1, 6, n)])
    for i in range(20):  # 2 % smooth fields of different widths
        pixels[i] = _ramp(width=6 + i % 9, height=12 + i % 8)[0]
    pixels[20:25] = 0  # 0.5 % blank
    detector = calibrate(_clusters(rng, 500), _clusters(rng, n), 0.05, k=1, val_pixels=pixels)
    screen = screen_pixels(pixels, detector.min_ink_pixels, detector.min_edge_density)
    cal = detector.calibration
    assert int(screen.no_ink.sum()) == 5 and screen.no_ink[20:25].all()
    # The edge test takes at most its share (0.2 of 5 %) and only smooth fields.
    smooth = np.flatnonzero(screen.no_strokes)
    assert 0 < len(smooth) <= 10 and (smooth < 20).all()
    assert cal["no_ink_share"] == pytest.approx(0.005)
    assert cal["no_strokes_share"] == pytest.approx(len(smooth) / n)
    assert cal["rejected_share"] == pytest.approx(0.05)  # the union keeps the budget


def test_no_ink_test_is_switched_off_where_dark_images_are_normal() -> None:
    rng = np.random.default_rng(5)
    pixels = np.concatenate([_stroke(3)] * 90 + [np.zeros((10, 28, 28, 1), np.uint8)])
    detector = calibrate(_clusters(rng, 50), _clusters(rng, 100), 0.05, k=1, val_pixels=pixels)
    assert detector.min_ink_pixels == 0 and "no_ink_off" in detector.calibration
    assert not screen_pixels(pixels, detector.min_ink_pixels, 0.0).no_ink.any()
    kept = calibrate(_clusters(rng, 50), _clusters(rng, 100), 0.2, k=1, val_pixels=pixels)
    assert kept.min_ink_pixels == 8 and "no_ink_off" not in kept.calibration


def test_calibration_refuses_bad_input() -> None:
    e = np.ones((5, 4))
    with pytest.raises(ValueError, match="false_rejection_rate"):
        calibrate(e, e, 0.0, k=1)
    with pytest.raises(ValueError, match="needs bank and validation"):
        calibrate(e, e[:0], 0.01, k=1)
    with pytest.raises(ValueError, match="validation images for 5"):
        calibrate(e, e, 0.01, k=1, val_pixels=np.zeros((3, 28, 28, 1), np.uint8))


# --------------------------------------------------------------------------- metadata


def test_detector_round_trips_through_metadata(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    det = calibrate(_clusters(rng, 200), _clusters(rng, 400), 0.02, k=2)
    det.save_bank(tmp_path)
    meta = json.loads(json.dumps({"ood": det.to_metadata()}))  # as metadata.json holds it
    back = OodDetector.load(tmp_path, meta)
    assert (back.k, back.threshold, back.min_ink_pixels) == (2, det.threshold, 8)
    q = _clusters(rng, 50)
    np.testing.assert_allclose(back.score(q), det.score(q))
    with pytest.raises(ValueError, match=r"\(N, 32\)"):
        back.score(np.ones((2, 5)))


def test_projected_detector_calibrates_saves_and_loads(tmp_path: Path) -> None:
    rng = np.random.default_rng(7)
    bank, val = _clusters(rng, 1000), _clusters(rng, 2000)
    det = calibrate(bank, val, 0.01, k=1, dims=12)
    assert det.bank.shape == (1000, 12) and det.dim == 32
    assert 0.5 < det.calibration["explained_variance"] < 1.0
    assert int(det.is_out(det.score(val)).sum()) == 20  # the budget holds in 12 dimensions
    # Foreign embeddings: most of their difference lies outside the 12 directions of this
    # isotropic toy data, yet most are still rejected (all 32 dimensions: > 95 %).
    other = rng.normal(size=(500, 32)) * 3.0 - 4.0
    assert det.is_out(det.score(other)).mean() > 0.8
    det.save_bank(tmp_path)
    entry = json.loads(json.dumps(det.to_metadata()))
    assert (entry["dims"], entry["projection_file"], entry["embedding_dim"]) == (
        12,
        PROJECTION_FILE,
        32,
    )
    back = OodDetector.load(tmp_path, {"ood": entry})
    q = _clusters(rng, 50)
    np.testing.assert_allclose(back.score(q), det.score(q))
    # dims 0 (or >= D) keeps every dimension and writes no projection.
    plain = calibrate(bank, val, 0.01, k=1, dims=0)
    assert plain.projection is None and "projection_file" not in plain.to_metadata()
    assert plain.to_metadata()["dims"] == 0
    # A projection that does not fit the bank, or is missing, is refused by name.
    np.save(tmp_path / PROJECTION_FILE, np.ones((32, 5), np.float32))
    with pytest.raises(ModelError, match="projection gives 5"):
        OodDetector.load(tmp_path, {"ood": entry})
    (tmp_path / PROJECTION_FILE).unlink()
    with pytest.raises(ModelError, match=f"{PROJECTION_FILE} not found"):
        OodDetector.load(tmp_path, {"ood": entry})


@pytest.mark.parametrize(("dims", "k"), [(0, 1), (0, 3), (12, 1), (12, 4)])
def test_onnx_runtime_graph_scores_as_numpy_does(dims: int, k: int) -> None:
    import onnxruntime as ort

    rng = np.random.default_rng(11)
    det = calibrate(_clusters(rng, 600), _clusters(rng, 800), 0.01, k=k, dims=dims)
    session = ort.InferenceSession(det.knn_onnx(), providers=["CPUExecutionProvider"])
    # In-distribution rows, foreign rows and a zero row (normalised to zero, not NaN).
    q = np.vstack([_clusters(rng, 40), rng.normal(size=(20, 32)) * 3.0 - 4.0, np.zeros((1, 32))])
    want = det.score(q)
    got = det.score_from_graph(l2_normalise(q), session)
    assert got.shape == want.shape == (61,) and got.dtype == np.float64
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert (det.is_out(got) == det.is_out(want)).all() and det.is_out(got)[40:60].all()
    # k-th, not nearest: with k > 1 the scores are larger than the 1-NN distances.
    if k > 1:
        nearest = knn_distance(q, det._bank_t, 1, projection=det.projection, bank_sq=det._bank_sq)
        assert (got[:60] > nearest[:60]).all()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"method": "mahalanobis"}, "ood.method"),
        ({"k": 0}, "k >= 1"),
        ({"threshold": "x"}, "malformed ood entry"),
        ({"bank_file": "missing.npy"}, "missing.npy not found"),
    ],
)
def test_malformed_ood_metadata_is_a_model_error(
    tmp_path: Path, change: dict[str, object], message: str
) -> None:
    rng = np.random.default_rng(4)
    det = calibrate(_clusters(rng, 50), _clusters(rng, 100), 0.05, k=1)
    det.save_bank(tmp_path)
    entry = {**det.to_metadata(), **change}
    with pytest.raises(ModelError, match=message):
        OodDetector.load(tmp_path, {"ood": entry})
    (tmp_path / BANK_FILE).write_bytes(b"not numpy")
    with pytest.raises(ModelError, match="unreadable OOD bank"):
        OodDetector.load(tmp_path, {"ood": det.to_metadata()})
