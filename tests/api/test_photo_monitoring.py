"""Monitoring a model of photos: photo statistics in the reference, the log and the drift
tests, and the photo scenarios of the simulator, on a tiny real colour model served by
the real app."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from scipy import ndimage
from serve_fixtures import build_tiny_model

from visionops.data.shapes import CLASSES, draw_shape
from visionops.data.transforms import PreprocessSpec, image_to_array
from visionops.monitor.drift import detect_drift
from visionops.monitor.reference import ReferenceProfile, build_reference_profile
from visionops.monitor.simulate import (
    PHOTO_DRIFT_SCENARIOS,
    photo_scenario,
    scenario_images,
    simulate,
)
from visionops.monitor.stats import PHOTO_STATS, SIZE_STATS, photo_statistics, size_statistics
from visionops.monitor.window import load_window
from visionops.serve.app import create_app
from visionops.serve.service import ServeSettings

PHOTO_SPEC = PreprocessSpec(
    image_size=32,
    channels=3,
    mean=(0.5, 0.5, 0.5),
    std=(0.25, 0.25, 0.25),
    invert="never",
    center=False,
    kind="natural",
)
WINDOW = 150


# --------------------------------------------------------------------------- statistics


def test_photo_statistics_mean_what_they_say() -> None:
    rng = np.random.default_rng(0)
    pictures = np.stack([np.asarray(draw_shape("circle", 32, rng)) for _ in range(8)])
    base = photo_statistics(pictures)
    assert set(base) == set(PHOTO_STATS)
    assert all(v.shape == (8,) and v.dtype == np.float64 for v in base.values())

    darker = photo_statistics((pictures * 0.5).astype(np.uint8))
    np.testing.assert_allclose(darker["brightness"], base["brightness"] * 0.5, atol=0.01)
    np.testing.assert_allclose(darker["contrast"], base["contrast"] * 0.5, atol=0.01)

    blurred = ndimage.gaussian_filter(pictures.astype(np.float32), (0, 1.5, 1.5, 0))
    soft = photo_statistics(np.rint(blurred).astype(np.uint8))
    assert (soft["sharpness"] < 0.5 * base["sharpness"]).all()

    # Hasler-Süsstrunk: 0 for grey, 0.3 * sqrt(1 + 0.25) for pure red (rg = 1, yb = 0.5).
    grey = np.repeat(pictures.mean(axis=3, keepdims=True).astype(np.uint8), 3, axis=3)
    assert photo_statistics(grey)["colourfulness"] == pytest.approx(np.zeros(8), abs=1e-6)
    red = np.zeros((1, 8, 8, 3), np.uint8)
    red[..., 0] = 255
    assert photo_statistics(red)["colourfulness"][0] == pytest.approx(0.3 * np.sqrt(1.25))
    flat = photo_statistics(red)
    assert flat["contrast"][0] == pytest.approx(0.0) and flat["sharpness"][0] == pytest.approx(0)

    # One image at a time gives the same values as the batch (no mixing across images).
    one = [photo_statistics(p[None]) for p in pictures]
    for name in PHOTO_STATS:
        np.testing.assert_allclose([o[name][0] for o in one], base[name], rtol=1e-5)


def test_size_statistics_and_their_errors() -> None:
    sizes = size_statistics(np.array([[64, 32], [30, 60]]))
    assert set(sizes) == set(SIZE_STATS)
    assert list(sizes["original_aspect"]) == [2.0, 0.5]
    with pytest.raises(ValueError, match="at least 1 pixel"):
        size_statistics(np.array([[0, 10]]))


def test_photo_scenarios_change_what_they_name() -> None:
    data = {s: scenario_images(s, 40, seed=3) for s in ("photos", *PHOTO_DRIFT_SCENARIOS)}
    base = data["photos"]
    assert base.force_png and base.class_names == CLASSES
    assert np.asarray(base.images).shape == (40, 64, 64, 3)
    stats = {s: photo_statistics(np.asarray(d.images)) for s, d in data.items()}
    med = {s: {k: float(np.median(v)) for k, v in st.items()} for s, st in stats.items()}
    assert med["photos-dark"]["brightness"] < 0.6 * med["photos"]["brightness"]
    assert med["photos-blur"]["sharpness"] < 0.3 * med["photos"]["sharpness"]
    cast = np.asarray(data["photos-colour-cast"].images, np.float64)
    plain = np.asarray(base.images, np.float64)
    assert cast[..., 0].mean() > plain[..., 0].mean() and cast[..., 2].mean() < 0.7 * (
        plain[..., 2].mean()
    )
    # The same seed, the same pictures: only the change differs.
    assert (data["photos-dark"].labels == base.labels).all()
    with pytest.raises(Exception, match="unknown photo scenario"):
        photo_scenario("photos-upside-down", [plain[0].astype(np.uint8)], np.random.default_rng())


def test_photo_scenarios_read_an_image_folder(tmp_path: Path) -> None:
    for cls, size in (("cats", (40, 30)), ("dogs", (50, 50))):
        (tmp_path / cls).mkdir()
        for i in range(3):
            Image.new("RGB", size, (200, 100, 50)).save(tmp_path / cls / f"{i}.png")
    data = scenario_images("photos-dark", 12, seed=0, photos_dir=tmp_path)
    assert isinstance(data.images, list)  # two sizes: kept as they are
    assert {img.shape for img in data.images} <= {(30, 40, 3), (50, 50, 3)}
    assert data.class_names == ("cats", "dogs")
    assert max(int(img.max()) for img in data.images) <= 0.55 * 200 + 1


# --------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def photo_service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """The real app serving the tiny colour model, its reference from 400 validation
    shapes (another seed than the traffic), and a prediction log."""
    work = tmp_path_factory.mktemp("photo-monitoring")
    # A small random-weight colour CNN (32×32 RGB, kind natural, the three shape classes).
    folder = build_tiny_model(
        work / "exported",
        name="tiny-shapes",
        classes=list(CLASSES),
        spec=PHOTO_SPEC,
        width=8,
        sharpen=4.0,
        accuracy=0.34,
    )
    rng = np.random.default_rng(100)
    labels = rng.integers(0, len(CLASSES), 400)
    pictures = [draw_shape(CLASSES[k], 64, rng) for k in labels]
    x_val = np.stack([image_to_array(p, PHOTO_SPEC) for p in pictures])
    reference = build_reference_profile(
        folder, x_val, PHOTO_SPEC, labels, original_sizes=np.full((400, 2), 64)
    )
    url = f"sqlite:///{work / 'predictions.db'}"
    app = create_app(ServeSettings(model_uri=str(folder), predlog_url=url, threads=1))
    with TestClient(app) as client:
        for _ in range(200):
            if client.get("/readyz").status_code == 200:
                break
            import time

            time.sleep(0.05)
        yield {"client": client, "reference": reference, "url": url, "app": app}


def send(service: dict[str, Any], scenario: str, seed: int) -> None:
    result = simulate(
        "http://testserver",
        scenario,
        WINDOW,
        batch=25,
        seed=seed,
        client=service["client"],
        allow_remote=True,
    )
    assert result.ok == WINDOW and result.image_format == "png", result.describe()
    assert service["app"].state.service.predlog.flush(timeout=30)


def test_reference_of_a_photo_model_holds_the_photo_statistics(
    photo_service: dict[str, Any],
) -> None:
    reference: ReferenceProfile = photo_service["reference"]
    assert reference.kind == "natural"
    assert set(reference.stats) == {*PHOTO_STATS, *SIZE_STATS}
    assert "ink_fraction" not in reference.stats and "stroke_thickness" not in reference.stats
    assert (reference.stats["original_width"] == 64).all()
    assert (reference.stats["colourfulness"] > 0.05).mean() > 0.9  # random colours


def test_photo_drift_quiet_in_distribution_and_detected_when_dark_or_blurred(
    photo_service: dict[str, Any],
) -> None:
    reference: ReferenceProfile = photo_service["reference"]
    url = photo_service["url"]

    send(photo_service, "photos", seed=1)
    window = load_window(url, WINDOW, photos=True)
    # What the log kept: the upload's size and the photo statistics of the model input.
    assert (window.stats["original_width"] == 64).all()
    assert (window.stats["original_aspect"] == 1.0).all()
    assert window.formats == ["PNG"] * WINDOW  # the upload's file format, per prediction
    assert set(PHOTO_STATS) <= set(window.stats)
    assert "stroke_thickness" not in window.stats
    quiet = detect_drift(reference, window)
    tested = {t.name for t in quiet.tests}
    assert {*PHOTO_STATS, *SIZE_STATS, "embedding", "confidence"} <= tested
    assert not quiet.drift_detected, quiet.describe()

    send(photo_service, "photos-dark", seed=2)
    dark = detect_drift(reference, load_window(url, WINDOW, photos=True))
    assert dark.drift_detected
    drifted = {t.name for t in dark.drifted}
    assert {"brightness", "contrast"} <= drifted
    assert not {"original_width", "original_height", "original_aspect"} & drifted

    send(photo_service, "photos-blur", seed=3)
    blurred = detect_drift(reference, load_window(url, WINDOW, photos=True))
    assert "sharpness" in {t.name for t in blurred.drifted}

    # The monitoring API measures the served photo model by the same statistics.
    r = photo_service["client"].get(f"/v1/monitoring/drift?window={WINDOW}")
    assert r.status_code == 200, r.text
    tests = {t["name"]: t for t in r.json()["tests"]}
    assert tests["sharpness"]["drift"] is True
    assert "ink_fraction" not in tests
