"""Traffic simulator: send real requests to a running service, in-distribution or drifted.

``visionops simulate --scenario rotation -n 500`` POSTs images to ``/v1/predict`` so the
prediction log fills with traffic whose drift is known. Scenarios (all 28×28, ink high):

- ``mnist`` — real MNIST test images, a seeded random sample (in distribution). The
  test file is ordered by writer population (its second half has ~10% thicker strokes),
  so a *consecutive* slice would itself be a shift; a random sample is not.
- ``foreign-digits`` — scikit-learn's bundled 8×8 digits (other writers, 16 grey levels)
  scaled to a 20-pixel box and centred like MNIST.
- ``noise`` — uniform random pixels.
- ``rotation`` — MNIST rotated by 30–60° either way.
- ``inverted`` — MNIST with dark ink on a light background. Always sent as JSON
  ``instances``: the service takes those at face value, whereas an uploaded file would be
  inverted back by the preprocessing (``invert="auto"``) and look like plain MNIST.
- ``blur`` — MNIST under a Gaussian blur (sigma 1–2 pixels).
- ``label-shift`` — MNIST test images of only one or two classes (default 1 and 7).
- ``printed`` — digits 0–9 rendered from the TrueType fonts bundled with matplotlib
  (DejaVu Sans/Serif/Mono, STIX, Computer Modern; regular, bold, italic), slightly
  rotated, scaled to a 20-pixel box and centred like MNIST: typed, not handwritten.

For models of photos (colour, metadata ``preprocess.kind`` natural), always sent as PNG
uploads of the pictures at their own size:

- ``photos`` — pictures of an image folder (``photos_dir``, ImageFolder layout, a seeded
  sample), or by default the generated shapes of :mod:`visionops.data.shapes`
  (64×64; in distribution for a model trained on such a folder).
- ``photos-dark`` — the same pictures at 35–55 % of their brightness (an underexposed
  camera, dusk).
- ``photos-blur`` — the same pictures under a Gaussian blur (sigma 2–3.5 pixels of the
  picture: out of focus, camera shake).
- ``photos-colour-cast`` — the same pictures with a warm cast (red ×1.3, blue ×0.6: a
  wrong white balance, tungsten light).

Images go as JSON ``instances`` (the service sees exactly these pixels) or as PNG files
(``image_format="png"``: the service decodes, centres and possibly inverts them first).
Only loopback hosts are accepted unless ``allow_remote=True``; count and duration are
bounded.
"""

from __future__ import annotations

import io
import ipaddress
import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit, urlunsplit

import numpy as np

from visionops.errors import ConfigError, DataError

log = logging.getLogger(__name__)

SCENARIOS: tuple[str, ...] = (
    "mnist",
    "foreign-digits",
    "noise",
    "rotation",
    "inverted",
    "blur",
    "label-shift",
    "printed",
)
#: Scenarios for models of photos: colour pictures, always sent as PNG uploads.
PHOTO_SCENARIOS: tuple[str, ...] = ("photos", "photos-dark", "photos-blur", "photos-colour-cast")
ALL_SCENARIOS: tuple[str, ...] = (*SCENARIOS, *PHOTO_SCENARIOS)
#: Drifted digit traffic (the drift benchmark runs these against MNIST).
DRIFT_SCENARIOS: tuple[str, ...] = tuple(s for s in SCENARIOS if s != "mnist")
PHOTO_DRIFT_SCENARIOS: tuple[str, ...] = PHOTO_SCENARIOS[1:]
#: How many generated shapes pictures the photo scenarios draw from by default.
DEFAULT_PHOTOS = 300
ImageFormat = Literal["json", "png"]

DEFAULT_MNIST_DIR = Path("data/raw/mnist")
MNIST_TEST_IMAGES = "t10k-images-idx3-ubyte"
MNIST_TEST_LABELS = "t10k-labels-idx1-ubyte"
MAX_IMAGES = 100_000
MAX_BATCH = 256
#: Give up after this many failed requests in a row (a service that is down).
MAX_CONSECUTIVE_FAILURES = 10


# --------------------------------------------------------------------------- images


@dataclass(frozen=True)
class ScenarioImages:
    """The images of a scenario and how they must be sent."""

    scenario: str
    #: (n, 28, 28) uint8, ink high; for photo scenarios (n, H, W, 3) RGB uint8, or a list
    #: of (H, W, 3) arrays when the pictures differ in size.
    images: np.ndarray | list[np.ndarray]
    labels: np.ndarray | None  # true classes where known
    force_json: bool = False  # inverted: a file would be re-inverted by the service
    force_png: bool = False  # colour pictures: JSON instances are grey
    #: Class names of ``labels`` when they are not digits (photo scenarios).
    class_names: tuple[str, ...] | None = None

    def true_label(self, i: int) -> str | None:
        """The true class name of image ``i``, None when unknown."""
        if self.labels is None:
            return None
        k = int(self.labels[i])
        return self.class_names[k] if self.class_names is not None else str(k)


def _find(folder: Path, stem: str) -> Path:
    for name in (f"{stem}.gz", stem):
        if (folder / name).is_file():
            return folder / name
    raise DataError(f"{folder}: no {stem}[.gz] (MNIST test set) found")


def load_mnist_test(folder: Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """MNIST test images (N, 28, 28) uint8 and labels from ``folder`` (t10k-* files)."""
    from visionops.data.sources import load_mnist_idx

    root = Path(folder) if folder is not None else DEFAULT_MNIST_DIR
    x = load_mnist_idx(_find(root, MNIST_TEST_IMAGES))
    y = load_mnist_idx(_find(root, MNIST_TEST_LABELS)).astype(np.int64)
    if x.ndim == 4:
        x = x[..., 0]
    return np.ascontiguousarray(x, dtype=np.uint8), y


def _sample(n_total: int, n: int, rng: np.random.Generator) -> np.ndarray:
    return rng.choice(n_total, size=n, replace=n > n_total)


def _to_canvas(img: np.ndarray, box: int = 20, size: int = 28) -> np.ndarray:
    """Scale ``img`` (float, ink high) into a ``box`` square and centre its mass on a
    ``size`` canvas, as MNIST was made."""
    from PIL import Image
    from scipy import ndimage

    pil = Image.fromarray(img.astype(np.float32), mode="F")
    fitted = np.asarray(pil.resize((box, box), Image.Resampling.BILINEAR), dtype=np.float32)
    canvas = np.zeros((size, size), np.float32)
    off = (size - box) // 2
    canvas[off : off + box, off : off + box] = fitted
    if canvas.sum() > 0:
        cy, cx = ndimage.center_of_mass(canvas)
        canvas = ndimage.shift(canvas, (size / 2 - cy, size / 2 - cx), order=1, mode="constant")
    return np.clip(np.rint(canvas), 0, 255).astype(np.uint8)


#: matplotlib's bundled fonts the ``printed`` scenario draws from (mpl-data/fonts/ttf).
PRINTED_FONTS: tuple[str, ...] = (
    "DejaVuSans.ttf",
    "DejaVuSans-Bold.ttf",
    "DejaVuSans-Oblique.ttf",
    "DejaVuSansMono.ttf",
    "DejaVuSansMono-Bold.ttf",
    "DejaVuSerif.ttf",
    "DejaVuSerif-Bold.ttf",
    "DejaVuSerif-Italic.ttf",
    "STIXGeneral.ttf",
    "STIXGeneralBol.ttf",
    "cmr10.ttf",
    "cmss10.ttf",
    "cmtt10.ttf",
)


def printed_digits(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``n`` font-rendered digits (n, 28, 28) uint8, ink high, and their labels (n,)."""
    import matplotlib
    from PIL import Image, ImageDraw, ImageFont

    folder = Path(matplotlib.get_data_path()) / "fonts" / "ttf"
    fonts = [ImageFont.truetype(str(folder / name), 64) for name in PRINTED_FONTS]
    labels = rng.integers(0, 10, n)
    which = rng.integers(0, len(fonts), n)
    angles = rng.uniform(-8.0, 8.0, n)
    out = np.zeros((n, 28, 28), np.uint8)
    for i in range(n):
        canvas = Image.new("L", (96, 96), 0)
        ImageDraw.Draw(canvas).text(
            (48, 48), str(int(labels[i])), fill=255, font=fonts[which[i]], anchor="mm"
        )
        canvas = canvas.rotate(float(angles[i]), resample=Image.Resampling.BILINEAR)
        a = np.asarray(canvas, dtype=np.float32)
        rows, cols = np.flatnonzero(a.max(axis=1) > 0), np.flatnonzero(a.max(axis=0) > 0)
        crop = a[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
        side = max(crop.shape)  # keep the aspect ratio: pad to a square, as MNIST did
        square = np.zeros((side, side), np.float32)
        top, left = (side - crop.shape[0]) // 2, (side - crop.shape[1]) // 2
        square[top : top + crop.shape[0], left : left + crop.shape[1]] = crop
        out[i] = _to_canvas(square)
    return out, labels.astype(np.int64)


def load_photos(
    n: int, rng: np.random.Generator, photos_dir: Path | None = None
) -> tuple[list[np.ndarray], np.ndarray, tuple[str, ...]]:
    """``n`` RGB pictures ``(H, W, 3)`` uint8 with their labels and class names.

    From ``photos_dir`` (an ImageFolder: :func:`visionops.data.sources.list_imagefolder`,
    a seeded sample with replacement when it has fewer than ``n``), else ``n`` freshly
    drawn shapes of :mod:`visionops.data.shapes` (64×64). Raises :class:`DataError`
    for a folder that is missing, empty or unreadable.
    """
    from PIL import Image

    if photos_dir is None:
        from visionops.data.shapes import CLASSES, draw_shape

        labels = rng.integers(0, len(CLASSES), n)
        pictures = [np.asarray(draw_shape(CLASSES[k], 64, rng), np.uint8) for k in labels]
        return pictures, labels.astype(np.int64), CLASSES
    from visionops.data.sources import list_imagefolder

    listing = list_imagefolder(Path(photos_dir))
    if not listing.entries:
        raise DataError(f"{photos_dir}: no pictures")
    idx = _sample(len(listing.entries), n, rng)
    pictures, found = [], []
    for i in idx:
        path, label, _ = listing.entries[int(i)]
        try:
            with Image.open(path) as img:
                pictures.append(np.asarray(img.convert("RGB"), np.uint8))
        except (OSError, ValueError) as exc:
            raise DataError(f"{path}: cannot read the picture ({exc})") from None
        found.append(label)
    return pictures, np.asarray(found, np.int64), tuple(listing.classes)


def photo_scenario(
    scenario: str, pictures: list[np.ndarray], rng: np.random.Generator
) -> list[np.ndarray]:
    """``pictures`` (RGB uint8 ``(H, W, 3)``) changed as ``scenario`` says (module
    docstring); ``photos`` returns them unchanged."""
    from scipy import ndimage

    if scenario == "photos":
        return pictures
    out = []
    for img in pictures:
        f = img.astype(np.float32)
        if scenario == "photos-dark":
            f = f * rng.uniform(0.35, 0.55)
        elif scenario == "photos-blur":
            sigma = float(rng.uniform(2.0, 3.5))
            f = ndimage.gaussian_filter(f, (sigma, sigma, 0.0))
        elif scenario == "photos-colour-cast":
            f = f * np.array([1.3, 1.0, 0.6], np.float32)
        else:
            raise ConfigError(f"unknown photo scenario {scenario!r}")
        out.append(np.clip(np.rint(f), 0, 255).astype(np.uint8))
    return out


def scenario_images(
    scenario: str,
    n: int,
    *,
    seed: int = 0,
    mnist: tuple[np.ndarray, np.ndarray] | None = None,
    mnist_dir: Path | None = None,
    classes: tuple[int, ...] = (1, 7),
    photos_dir: Path | None = None,
) -> ScenarioImages:
    """``n`` images of ``scenario`` (see the module docstring), deterministic in ``seed``.

    ``mnist`` passes already loaded MNIST test images and labels (else they are read
    from ``mnist_dir``, default ``data/raw/mnist``); ``photos_dir`` is the image folder
    of the photo scenarios (default: generated shapes).
    """
    if scenario not in ALL_SCENARIOS:
        raise ConfigError(f"unknown scenario {scenario!r}; choose from {', '.join(ALL_SCENARIOS)}")
    if n < 1:
        raise ConfigError(f"the number of images must be positive (got {n})")
    rng = np.random.default_rng(seed)

    if scenario in PHOTO_SCENARIOS:
        # The same seed gives the same pictures in every photo scenario: only the change
        # differs between them.
        pictures, labels, names = load_photos(n, rng, photos_dir)
        changed = photo_scenario(scenario, pictures, np.random.default_rng(seed + 1))
        same = len({p.shape for p in changed}) == 1
        images: np.ndarray | list[np.ndarray] = np.stack(changed) if same else changed
        return ScenarioImages(scenario, images, labels, force_png=True, class_names=names)

    if scenario == "noise":
        return ScenarioImages(scenario, rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), None)
    if scenario == "printed":
        imgs, labels = printed_digits(n, rng)
        return ScenarioImages(scenario, imgs, labels)
    if scenario == "foreign-digits":
        from sklearn.datasets import load_digits

        digits = load_digits()
        idx = _sample(len(digits.images), n, rng)
        imgs = np.stack([_to_canvas(digits.images[i] * (255.0 / 16.0)) for i in idx])
        return ScenarioImages(scenario, imgs, np.asarray(digits.target[idx], np.int64))

    x, y = mnist if mnist is not None else load_mnist_test(mnist_dir)
    if scenario == "label-shift":
        if not classes or len(classes) > 2:
            raise ConfigError(f"label-shift keeps one or two classes, got {list(classes)}")
        pool = np.flatnonzero(np.isin(y, classes))
        if pool.size == 0:
            raise ConfigError(f"no MNIST test image of classes {list(classes)}")
        idx = pool[_sample(pool.size, n, rng)]
        return ScenarioImages(scenario, x[idx], y[idx])

    idx = _sample(len(x), n, rng)
    imgs, labels = x[idx], y[idx]
    if scenario == "mnist":
        return ScenarioImages(scenario, imgs, labels)
    if scenario == "inverted":
        return ScenarioImages(scenario, 255 - imgs, labels, force_json=True)
    if scenario == "rotation":
        from PIL import Image

        angles = rng.uniform(30.0, 60.0, n) * rng.choice([-1.0, 1.0], n)
        rotated = [
            np.asarray(
                Image.fromarray(img).rotate(float(a), resample=Image.Resampling.BILINEAR),
                dtype=np.uint8,
            )
            for img, a in zip(imgs, angles, strict=True)
        ]
        return ScenarioImages(scenario, np.stack(rotated), labels)
    # blur
    from scipy import ndimage

    sigmas = rng.uniform(1.0, 2.0, n)
    blurred = [
        ndimage.gaussian_filter(img.astype(np.float32), float(s))
        for img, s in zip(imgs, sigmas, strict=True)
    ]
    return ScenarioImages(scenario, np.clip(np.rint(blurred), 0, 255).astype(np.uint8), labels)


# --------------------------------------------------------------------------- sending


def check_target(url: str, allow_remote: bool = False) -> str:
    """The ``/v1/predict`` URL for a service base URL; refuses non-loopback hosts."""
    parts = urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"service URL must look like http://127.0.0.1:8000, got {url!r}")
    host = parts.hostname
    if not allow_remote:
        try:
            loopback = ipaddress.ip_address(host).is_loopback
        except ValueError:
            loopback = host.lower() in ("localhost", "localhost.localdomain")
        if not loopback:
            raise ConfigError(
                f"refusing to send simulated traffic to {host}: only loopback hosts "
                "(localhost, 127.0.0.1, ::1) unless allow_remote (--allow-remote) is given"
            )
    path = parts.path.rstrip("/")
    if not path.endswith("/v1/predict"):
        path += "/v1/predict"
    return urlunsplit((parts.scheme, parts.netloc, path, "", ""))


def _png(img: np.ndarray) -> bytes:
    """A grey ``(H, W)`` or RGB ``(H, W, 3)`` uint8 image as PNG bytes."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(img)).save(buf, format="PNG")
    return buf.getvalue()


@dataclass(frozen=True)
class SimulationResult:
    scenario: str
    url: str
    image_format: str
    requested: int
    sent: int  # images sent
    ok: int  # images answered with a prediction
    errors: int  # images in failed requests
    requests: int
    duration_s: float
    label_counts: dict[str, int] = field(default_factory=dict)  # predicted labels
    status_counts: dict[str, int] = field(default_factory=dict)  # HTTP status (or error)
    correct: int | None = None  # predictions equal to the true label, where known
    stopped: str | None = None  # why sending stopped early
    error_samples: tuple[str, ...] = ()

    @property
    def accuracy(self) -> float | None:
        return None if self.correct is None or not self.ok else self.correct / self.ok

    def summary(self) -> dict[str, float]:
        out = {
            "sent": float(self.sent),
            "ok": float(self.ok),
            "errors": float(self.errors),
            "duration_s": self.duration_s,
        }
        if self.accuracy is not None:
            out["accuracy"] = self.accuracy
        return out

    def describe(self) -> str:
        top = ", ".join(
            f"{k}: {v}" for k, v in sorted(self.label_counts.items(), key=lambda kv: -kv[1])[:5]
        )
        acc = f", accuracy {self.accuracy:.3f}" if self.accuracy is not None else ""
        stop = f"; stopped early: {self.stopped}" if self.stopped else ""
        return (
            f"{self.scenario}: {self.ok}/{self.sent} images answered ({self.errors} in failed "
            f"requests) in {self.requests} requests, {self.duration_s:.1f}s as {self.image_format}"
            f"{acc}; predicted {top or 'nothing'}{stop}"
        )


def simulate(
    url: str,
    scenario: str,
    n: int,
    rate: float | None = None,
    batch: int = 1,
    timeout: float = 10.0,
    *,
    image_format: ImageFormat | str = "json",
    allow_remote: bool = False,
    seed: int = 0,
    mnist_dir: Path | None = None,
    classes: tuple[int, ...] = (1, 7),
    max_seconds: float = 300.0,
    client: Any = None,
    photos_dir: Path | None = None,
) -> SimulationResult:
    """Send ``n`` images of ``scenario`` to ``url``'s ``POST /v1/predict``.

    ``batch`` images per request, at most ``rate`` requests per second (None: as fast as
    the service answers), each request waiting at most ``timeout`` seconds; sending stops
    after ``max_seconds`` or after repeated failures. ``client`` may be an
    ``httpx.Client`` (tests); one is created otherwise. ``photos_dir``: the image
    folder of the photo scenarios (default: generated shapes).
    """
    import httpx

    if not 1 <= n <= MAX_IMAGES:
        raise ConfigError(f"n must be between 1 and {MAX_IMAGES} (got {n})")
    if not 1 <= batch <= MAX_BATCH:
        raise ConfigError(f"batch must be between 1 and {MAX_BATCH} (got {batch})")
    if rate is not None and not rate > 0:
        raise ConfigError(f"rate must be positive requests per second (got {rate})")
    if image_format not in ("json", "png"):
        raise ConfigError(f"image_format must be json or png (got {image_format!r})")
    target = check_target(url, allow_remote)
    data = scenario_images(
        scenario, n, seed=seed, mnist_dir=mnist_dir, classes=classes, photos_dir=photos_dir
    )
    fmt: str = "json" if data.force_json else "png" if data.force_png else image_format
    if data.force_json and image_format != "json":
        log.info("%s is sent as JSON instances: an uploaded file would be re-inverted", scenario)

    own_client = client is None
    http = client if client is not None else httpx.Client(timeout=timeout)
    labels: Counter[str] = Counter()
    statuses: Counter[str] = Counter()
    samples: list[str] = []
    sent = ok = errors = requests = correct = 0
    failures_in_row = 0
    stopped: str | None = None
    started = time.perf_counter()
    try:
        for i, start in enumerate(range(0, n, batch)):
            elapsed = time.perf_counter() - started
            if elapsed > max_seconds:
                stopped = f"time limit of {max_seconds:g}s reached"
                break
            if rate is not None:
                wait = i / rate - elapsed
                if wait > 0:
                    time.sleep(min(wait, max(0.0, max_seconds - elapsed)))
            chunk = data.images[start : start + batch]
            try:
                if fmt == "json":
                    grey = np.asarray(chunk, dtype=np.float32)
                    body = {"instances": (grey / 255.0).round(4).tolist()}
                    response = http.post(target, json=body, timeout=timeout)
                else:
                    files = [
                        ("files", (f"{scenario}-{start + j}.png", _png(img), "image/png"))
                        for j, img in enumerate(chunk)
                    ]
                    response = http.post(target, files=files, timeout=timeout)
            except httpx.HTTPError as exc:
                requests += 1
                sent += len(chunk)
                errors += len(chunk)
                statuses[type(exc).__name__] += len(chunk)
                if len(samples) < 3:
                    samples.append(f"{type(exc).__name__}: {exc}")
                failures_in_row += 1
                if failures_in_row >= MAX_CONSECUTIVE_FAILURES:
                    stopped = f"{failures_in_row} requests in a row failed ({type(exc).__name__})"
                    break
                continue
            requests += 1
            sent += len(chunk)
            statuses[str(response.status_code)] += len(chunk)
            predictions = None
            if response.status_code == 200:
                try:
                    predictions = response.json()["predictions"]
                except (ValueError, KeyError, TypeError):
                    predictions = None
            if predictions is None or len(predictions) != len(chunk):
                errors += len(chunk)
                if len(samples) < 3:
                    samples.append(f"HTTP {response.status_code}: {response.text[:200]}")
                failures_in_row += 1
                if failures_in_row >= MAX_CONSECUTIVE_FAILURES:
                    stopped = (
                        f"{failures_in_row} requests in a row failed (HTTP {response.status_code})"
                    )
                    break
                continue
            failures_in_row = 0
            ok += len(chunk)
            for j, pred in enumerate(predictions):
                label = str(pred.get("label"))
                labels[label] += 1
                if label == data.true_label(start + j):
                    correct += 1
    finally:
        if own_client:
            http.close()
    result = SimulationResult(
        scenario=scenario,
        url=target,
        image_format=fmt,
        requested=n,
        sent=sent,
        ok=ok,
        errors=errors,
        requests=requests,
        duration_s=time.perf_counter() - started,
        label_counts=dict(labels),
        status_counts=dict(statuses),
        correct=correct if data.labels is not None else None,
        stopped=stopped,
        error_samples=tuple(samples),
    )
    log.info("simulated %s", result.describe())
    return result
