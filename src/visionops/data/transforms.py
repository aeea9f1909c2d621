"""The one preprocessing shared by training and serving (NumPy and Pillow only, no torch).

An image *file* becomes a model input in three steps, the same at train time (the
``imagefolder`` source) and at serve time (uploads):

1. :func:`decode_image` — bytes or a path to a :class:`PIL.Image.Image`. The pixel count
   from the header is checked *before* any pixel is decoded (decompression bombs), and the
   EXIF orientation is applied so a phone photo is upright.
2. :func:`image_to_array` — a uint8 ``(H, W, C)`` array in the MNIST convention (ink
   bright on a dark background): mode conversion (palette, alpha composited on white,
   16-bit, CMYK …), inversion of dark-on-light images, and MNIST-style centring.
3. :func:`normalize` — uint8 NHWC to the float32 NCHW tensor the model sees,
   ``(x / 255 - mean) / std``.

Digit conventions (automatic inversion and centring) only make sense for single-channel
images: for a 3-channel spec ``invert="auto"`` leaves the colours alone and ``center`` is
ignored, the image is simply resized. ``invert="always"`` inverts either kind.

MNIST-style centring follows LeCun et al.: the ink's bounding box is scaled (keeping the
aspect ratio, Lanczos) to fit a ``digit_box`` square, pasted into the ``image_size``
canvas, and moved by a whole number of pixels so that the intensity-weighted centre of
mass sits at the centre of the canvas. The shift is clamped so that no ink leaves the
canvas. Before that, the background level (median of the border) is subtracted and the
ink stretched to reach 255, which is the identity on clean MNIST-like images.
"""

from __future__ import annotations

import io
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from visionops.data.ink import digit_to_mnist, has_alpha, is_dark_on_light
from visionops.errors import DataError

log = logging.getLogger(__name__)

#: Formats :func:`decode_image` will open; everything else is refused unread.
ALLOWED_FORMATS: tuple[str, ...] = ("PNG", "JPEG", "BMP", "GIF", "WEBP")
INVERT_MODES = ("auto", "always", "never")
#: ``digit``: MNIST conventions; ``natural``: photos (see :mod:`visionops.data.natural`).
KINDS = ("digit", "natural")


class UnreadableImageError(DataError):
    """An image file cannot be decoded; ``file`` and ``reason`` are kept separately."""

    def __init__(self, file: str, reason: str) -> None:
        super().__init__(f"{file}: {reason}")
        self.file = file
        self.reason = reason


@dataclass(frozen=True)
class PreprocessSpec:
    """Everything needed to turn an image into a model input; travels with the model."""

    image_size: int = 28
    channels: int = 1
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    invert: str = "auto"
    center: bool = True
    digit_box: int = 20
    kind: str = "digit"

    def __post_init__(self) -> None:
        # Normalise list inputs (from JSON) to tuples of floats so the spec stays hashable.
        object.__setattr__(self, "mean", tuple(float(m) for m in self.mean))
        object.__setattr__(self, "std", tuple(float(s) for s in self.std))
        problems = []
        if self.channels not in (1, 3):
            problems.append(f"channels must be 1 or 3 (got {self.channels!r})")
        if int(self.image_size) < 1:
            problems.append(f"image_size must be positive (got {self.image_size!r})")
        if int(self.digit_box) < 1:
            problems.append(f"digit_box must be positive (got {self.digit_box!r})")
        if self.kind not in KINDS:
            problems.append(f"kind must be one of {KINDS} (got {self.kind!r})")
        if self.invert not in INVERT_MODES:
            problems.append(f"invert must be one of {INVERT_MODES} (got {self.invert!r})")
        for name, values in (("mean", self.mean), ("std", self.std)):
            if len(values) not in (1, self.channels):
                problems.append(
                    f"{name} needs 1 or {self.channels} values (got {len(values)}: {values})"
                )
        if any(not s > 0 for s in self.std):
            problems.append(f"std must be positive (got {self.std})")
        if problems:
            raise DataError("invalid preprocess spec: " + "; ".join(problems))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (``metadata.json``, ``config.json``)."""
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PreprocessSpec:
        """Inverse of :meth:`to_dict`; unknown keys are ignored, missing ones are errors
        (``kind`` may be missing: models from before it existed are ``digit``)."""
        names = ("image_size", "channels", "mean", "std", "invert", "center", "digit_box")
        missing = [n for n in names if n not in d]
        if missing:
            raise DataError(f"preprocess spec is missing {missing} (got keys {sorted(d)})")
        return cls(
            image_size=int(d["image_size"]),
            channels=int(d["channels"]),
            mean=tuple(d["mean"]),
            std=tuple(d["std"]),
            invert=str(d["invert"]),
            center=bool(d["center"]),
            digit_box=int(d["digit_box"]),
            kind=str(d.get("kind", "digit")),
        )

    @classmethod
    def from_meta(cls, meta: dict[str, Any]) -> PreprocessSpec:
        """Build the spec from ``data/prepared/meta.json`` (geometry + stats + preprocess)."""
        try:
            flat = {
                "image_size": meta["image_size"],
                "channels": meta["channels"],
                "mean": meta["mean"],
                "std": meta["std"],
                **meta["preprocess"],
            }
        except KeyError as exc:
            raise DataError(f"prepared meta has no '{exc.args[0]}' key") from None
        return cls.from_dict(flat)


# --------------------------------------------------------------------------- decode


def decode_image(data: bytes | Path, max_pixels: int) -> Image.Image:
    """Decode image bytes (or a file) into an upright, fully loaded Pillow image.

    The pixel count in the header is compared with ``max_pixels`` before the pixel data
    is decoded. Raises :class:`UnreadableImageError` (a ``DataError``) naming the file and
    the reason for anything that is not a readable PNG/JPEG/BMP/GIF/WebP image.
    """
    label = str(data) if isinstance(data, Path) else "image"
    if isinstance(data, Path):
        try:
            raw = data.read_bytes()
        except OSError as exc:
            raise UnreadableImageError(label, f"cannot read file ({exc.strerror or exc})") from None
    else:
        raw = bytes(data)
    if not raw:
        raise UnreadableImageError(label, "empty file")
    try:
        # Lazy: only the header is parsed here, no pixel data is decoded yet.
        img = Image.open(io.BytesIO(raw), formats=ALLOWED_FORMATS)
    except UnidentifiedImageError:
        raise UnreadableImageError(
            label, f"cannot identify image file (accepted: {', '.join(ALLOWED_FORMATS)})"
        ) from None
    except Image.DecompressionBombError as exc:
        raise UnreadableImageError(label, f"refused as a decompression bomb ({exc})") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise UnreadableImageError(label, f"malformed image header ({exc})") from None

    width, height = img.size
    if width < 1 or height < 1:
        raise UnreadableImageError(label, f"image has no pixels ({width}x{height})")
    if width * height > max_pixels:
        raise UnreadableImageError(
            label, f"{width}x{height} = {width * height} pixels exceeds the limit of {max_pixels}"
        )
    try:
        img.load()
    except Image.DecompressionBombError as exc:
        raise UnreadableImageError(label, f"refused as a decompression bomb ({exc})") from None
    except (OSError, SyntaxError, ValueError, EOFError, IndexError) as exc:
        raise UnreadableImageError(label, f"corrupt image data ({exc})") from None

    try:
        upright = ImageOps.exif_transpose(img)
    except Exception as exc:  # malformed EXIF must not make a readable image unreadable
        log.warning("%s: ignoring unreadable EXIF orientation (%s)", label, exc)
        upright = None
    if upright is None:
        return img
    upright.format = img.format  # the file's format (PNG, JPEG, ...) survives the rotation
    return upright


# --------------------------------------------------------------------------- to array


def _to_l_or_rgb(img: Image.Image, channels: int) -> Image.Image:
    """Convert any Pillow mode to 'L' (channels=1) or 'RGB' (channels=3)."""
    mode = img.mode
    if mode in ("P", "PA", "LA", "La", "RGBa") or (mode == "RGBA"):
        # Palette images may carry transparency; every alpha mode goes through RGBA and
        # is composited on white, like a drawing on paper.
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(white, rgba).convert("RGB")
    elif mode.startswith("I") or mode == "F":
        a = np.asarray(img).astype(np.float64)
        if mode.startswith("I;16"):
            a = a / 257.0
        elif mode == "F" and a.size and np.nanmax(a) <= 1.0:
            a = a * 255.0
        elif a.size and np.nanmax(a) > 255.0:
            a = a * (255.0 / np.nanmax(a))
        a = np.nan_to_num(a, nan=0.0)
        img = Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), mode="L")
    elif mode not in ("L", "RGB"):
        img = img.convert("RGB" if mode not in ("1",) else "L")  # 1, CMYK, YCbCr, LAB, HSV
    target = "L" if channels == 1 else "RGB"
    return img if img.mode == target else img.convert(target)


def _resize(a: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Lanczos resize of a float32 2-D array to ``size`` = (width, height)."""
    if a.shape[1] == size[0] and a.shape[0] == size[1]:
        return a.astype(np.float32, copy=True)
    img = Image.fromarray(a.astype(np.float32), mode="F")
    return np.asarray(img.resize(size, Image.Resampling.LANCZOS), dtype=np.float32)


def image_to_array(img: Image.Image, spec: PreprocessSpec) -> np.ndarray:
    """A decoded image as uint8 ``(image_size, image_size, channels)``, ink bright.

    ``spec.kind == "natural"``: :func:`visionops.data.natural.natural_to_array` (resize
    the shorter side, centre-crop; colours kept). Otherwise, single channel: inverted
    when ``spec.invert`` says so (``auto``: when the border is
    light), then MNIST-centred (``spec.center``) or plainly resized. Three channels:
    inverted only for ``invert="always"``, then resized. Deterministic.
    """
    size = int(spec.image_size)
    if spec.kind == "natural":
        from visionops.data.natural import natural_to_array

        converted = _to_l_or_rgb(img, spec.channels)
        return natural_to_array(converted, size, invert=spec.invert == "always")
    if spec.channels == 1 and spec.center:
        # Alpha is read by meaning (ink may live in it), so it is kept for this path.
        source = img if has_alpha(img) else _to_l_or_rgb(img, 1)
        out = digit_to_mnist(source, size, int(spec.digit_box), spec.invert)
        return np.ascontiguousarray(np.rint(out).astype(np.uint8)[:, :, None])
    converted = _to_l_or_rgb(img, spec.channels)
    a = np.asarray(converted, dtype=np.uint8)
    if spec.channels == 1:
        invert = spec.invert == "always" or (spec.invert == "auto" and is_dark_on_light(a))
        gray = (255.0 - a.astype(np.float32)) if invert else a.astype(np.float32)
        out = np.clip(_resize(gray, (size, size)), 0.0, 255.0)
        return np.ascontiguousarray(np.rint(out).astype(np.uint8)[:, :, None])

    if spec.invert == "always":
        a = 255 - a
    if a.shape[0] != size or a.shape[1] != size:
        resized = Image.fromarray(a, mode="RGB").resize((size, size), Image.Resampling.LANCZOS)
        a = np.asarray(resized, dtype=np.uint8)
    return np.ascontiguousarray(a)


def array_from_unit_floats(a: np.ndarray) -> np.ndarray:
    """uint8 ``(H, W, C)`` from floats in ``[0, 1]`` with 1 = ink (the API's JSON input).

    Accepts ``(H, W)`` (one channel added) or ``(H, W, C)`` with C in {1, 3}.
    """
    try:
        arr = np.asarray(a, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise DataError(f"instance is not a numeric array ({exc})") from None
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3 or arr.shape[2] not in (1, 3) or arr.shape[0] < 1 or arr.shape[1] < 1:
        raise DataError(f"instance must be an H×W (or H×W×C) array, got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise DataError("instance contains NaN or infinite values")
    lo, hi = float(arr.min()), float(arr.max())
    if lo < 0.0 or hi > 1.0:
        raise DataError(f"instance values must lie in [0, 1], got [{lo:g}, {hi:g}]")
    return np.ascontiguousarray(np.rint(arr * 255.0).astype(np.uint8))


def normalize(x_uint8_nhwc: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    """float32 ``(N, C, H, W)`` = ``(x / 255 - mean) / std``: the exact model input.

    A single ``(H, W, C)`` image is accepted and returned with ``N = 1``.
    """
    x = np.asarray(x_uint8_nhwc)
    if x.ndim == 3:
        x = x[None]
    if x.dtype != np.uint8:
        raise DataError(f"normalize expects uint8 pixels, got {x.dtype}")
    expected = (spec.image_size, spec.image_size, spec.channels)
    if x.ndim != 4 or tuple(x.shape[1:]) != expected:
        raise DataError(f"normalize expects (N, {', '.join(map(str, expected))}), got {x.shape}")
    mean = np.asarray(spec.mean, dtype=np.float32).reshape(1, -1, 1, 1)
    std = np.asarray(spec.std, dtype=np.float32).reshape(1, -1, 1, 1)
    out = x.transpose(0, 3, 1, 2).astype(np.float32) / np.float32(255.0)
    out -= mean
    out /= std
    return np.ascontiguousarray(out)
