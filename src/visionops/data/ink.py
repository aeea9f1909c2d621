"""Find the ink of a handwritten digit in a photo or drawing and render it the MNIST way.

:func:`visionops.data.transforms.image_to_array` calls :func:`digit_to_mnist` for
single-channel, centred specs, at train time (``imagefolder``) and at serve time alike.
The steps, each with a reason:

1. **Ink map with alpha by meaning** (:func:`ink_map`). When a minority of the pixels is
   opaque, the opaque pixels *are* the ink, whatever their colour (white ink on a
   transparent PNG is as common as black); otherwise transparency is background and gets
   the colour of the opaque paper. Dark-on-light images are inverted
   (:func:`is_dark_on_light`: the sparse tail of the grey levels is the ink).
2. **Background and illumination removal** (:func:`_background`): a flat background
   (canvas, scan, a small crop) is one level; otherwise a white top-hat, a grey opening
   with a square four stroke widths wide, keeps what is broader than the strokes
   (shadows, uneven light, paper texture, the table around the sheet) and it is
   subtracted. The frame is point-reflected first, so a light gradient leaves no ink.
3. **Ink found by thresholding**: a noise floor (4 robust standard deviations above the
   residual's median) and half of Otsu's threshold over the pixels above it; ink keeps
   its grey levels (nothing is binarised), the mask only decides *where* the digit is.
   Ink that does not stand out by a tenth of the image's range is no ink.
4. **Ruled lines and margins** (straight runs over half the image that span the page
   or pass the digit at both ends) are removed and the strokes they crossed closed
   again; **connected components** are grouped across small gaps, and specks (< 5 % of
   the largest group) and frame edges (groups with most of their ink along the frame:
   paper edges, the table) are dropped.
5. The digit's box is re-read **from the full-resolution image** at ``4 * digit_box`` px
   (area averaging commutes with the background subtraction), so a tiny digit on a big
   canvas keeps its detail. **Contrast**: the strongest strokes (90th percentile of the
   ink) become full ink. **Outline digits** (closed contours around thin bands) are
   filled. **Stroke width** (:func:`stroke_width`, twice the area over the perimeter) is
   brought into the MNIST range by a distance-transform dilation or erosion.
6. The MNIST box fit and centre of mass of LeCun et al. (:func:`center_digit`).

Small clean images (the size of the model input, ink bright on a black border: MNIST
itself, a canvas already scaled down by the client) take a fast path: steps 2–5 are
skipped, so MNIST digits pass through unchanged. Larger noise-free drawings (a 280 px
canvas; half the ink map exactly 0) skip step 2 (their background is 0) and run steps
3–4 on a copy of at most :data:`CLEAN_WORK_SIDE` px; step 5 reads the full image as for
any other.

Image library: :mod:`scipy.ndimage`. SciPy is already a dependency of the serving install
(scikit-learn needs it), so no new binary wheel enters the image; it has every operation
needed here in C (grey morphology, Euclidean distance transform, connected-component
labelling with per-label sums and boxes, min/max filters) and runs on float arrays
without conversions. scikit-image would add its own dependency tree on top of SciPy and
OpenCV a 60 MB wheel for the same operations; Otsu's threshold, their one extra used
here, is a ten-line histogram computation (:func:`otsu_threshold`).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

#: Stroke width of MNIST digits at 28 px (:func:`stroke_width` of the 60,000 training
#: digits): 5th percentile, median, 95th percentile. Widths inside the range are left
#: alone; thinner strokes are thickened and thicker ones thinned to the median.
MNIST_STROKE_WIDTH = (1.34, 1.96, 3.0)
#: Longest side the whole image is analysed at (stage A); larger images are area-averaged.
WORK_SIDE = 512
#: Noise-free images (at least ``CLEAN_ZERO_SHARE`` of the pixels exactly 0 in the ink
#: map: drawings, ink read from alpha) are analysed at this longest side instead, shrunk
#: by at most ``CLEAN_MAX_REDUCTION``: a 280 px canvas at 128 px finds the same box and
#: strokes at a fifth of the cost (the box is re-read from the full image either way).
CLEAN_WORK_SIDE = 128
CLEAN_MAX_REDUCTION = 2.5
CLEAN_ZERO_SHARE = 0.5
#: Longest side of the low-resolution copy the background is estimated on.
BACKGROUND_SIDE = 64
#: The digit is re-rendered at this multiple of ``digit_box`` before the final fit.
OVERSAMPLE = 4
#: Images up to this side (px) get a flat background: too small for shadows to matter.
SMALL_SIDE = 64
#: Groups of ink smaller than this share of the largest one are specks.
SPECK_SHARE = 0.05
#: Holes narrower than this share of the digit's longer side inside a closed contour are
#: the inside of an outlined stroke and get filled.
OUTLINE_HOLE_SHARE = 0.2

# Ink contrast (0..255 scale) below which an image counts as blank.
_MIN_CONTRAST = 8.0
# Clean-border test of the fast path: border pixels at or below this level count as black.
_CLEAN_LEVEL = 24.0


@dataclass(frozen=True)
class InkImage:
    """An image as ink-bright grey levels: float32 ``(H, W)``, 0 = no ink, 255 = full ink.

    ``from_alpha`` is true when the ink was read from the alpha channel.
    """

    gray: np.ndarray
    from_alpha: bool


# --------------------------------------------------------------------------- ink map


def _luminance(rgb: np.ndarray) -> np.ndarray:
    """ITU-R 601 luma (Pillow's ``convert("L")``) of float ``(H, W, 3)``."""
    return rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114


def has_alpha(img: Image.Image) -> bool:
    """Whether ``img`` carries transparency (alpha band or palette/grey transparency)."""
    return img.mode in ("RGBA", "LA", "PA", "La", "RGBa") or (
        img.mode in ("P", "L", "RGB") and "transparency" in img.info
    )


def ink_map(img: Image.Image, invert: str = "auto") -> InkImage:
    """Ink-bright float32 ``(H, W)`` grey levels of a decoded image of any Pillow mode.

    ``invert``: ``auto`` reads ink from alpha when only a minority of the pixels is opaque
    and inverts dark-on-light images (mean below median); ``always`` / ``never`` composite
    alpha on white and invert or not. 16-bit and float modes are expected to be converted
    to ``L`` by the caller.
    """
    if has_alpha(img):
        rgba_img = img if img.mode == "RGBA" else img.convert("RGBA")
        # Alpha alone first: a drawing (ink in alpha) needs no colour at all.
        alpha = np.asarray(rgba_img.getchannel("A"), dtype=np.float32) / 255.0
        opaque = alpha >= 0.5
        share = float(np.count_nonzero(opaque)) / max(opaque.size, 1)
        if invert == "auto" and 0.0 < share < 0.5:
            # The opaque minority is the ink (either colour); alpha is its coverage.
            return InkImage(gray=alpha * 255.0, from_alpha=True)
        lum = _luminance(np.asarray(rgba_img, dtype=np.float32)[..., :3])
        # Transparency is background: give it the paper's colour (white when nothing is
        # opaque), so compositing adds no edge.
        paper = float(np.median(lum[opaque])) if share > 0.0 and invert == "auto" else 255.0
        gray = lum * alpha + paper * (1.0 - alpha)
    else:
        gray = np.asarray(img.convert("L") if img.mode != "L" else img, dtype=np.float32)
    if invert == "always" or (invert == "auto" and is_dark_on_light(gray)):
        gray = 255.0 - gray
    return InkImage(gray=np.ascontiguousarray(gray, dtype=np.float32), from_alpha=False)


def _border(a: np.ndarray) -> np.ndarray:
    """Pixels of the outer frame (about 5 % of the shorter side, at least one pixel)."""
    h, w = a.shape[:2]
    t = max(1, round(0.05 * min(h, w)))
    if 2 * t >= h or 2 * t >= w:
        return a.reshape(-1)
    return np.concatenate(
        [a[:t].ravel(), a[-t:].ravel(), a[t:-t, :t].ravel(), a[t:-t, -t:].ravel()]
    )


def is_dark_on_light(gray: np.ndarray) -> bool:
    """Whether the ink is dark: the sparse tail of the grey levels is the dark one.

    A clean black or white frame decides at once. Otherwise the image (at ≤ 32 px) minus
    its median-filtered copy leaves the ink and the noise; the ink is the side with more
    mass beyond three robust standard deviations, whatever the illumination does. A flat
    image falls back to its border: a light border means paper.
    """
    from scipy import ndimage as ndi

    g = np.asarray(gray, dtype=np.float32)
    border = _border(g)
    # Counts, not percentiles: this runs on every upload and must stay cheap.
    if np.count_nonzero(border > _CLEAN_LEVEL) <= 0.1 * border.size:
        return False
    if np.count_nonzero(border < 255.0 - _CLEAN_LEVEL) <= 0.1 * border.size:
        return True
    h, w = g.shape
    k = max(1, math.ceil(max(h, w) / 32))
    small = _resize(g, (max(1, math.ceil(w / k)), max(1, math.ceil(h / k))))
    residual = small - ndi.median_filter(small, size=max(3, (max(small.shape) // 4) | 1))
    sigma = 1.4826 * float(np.median(np.abs(residual - np.median(residual))))
    dark = float(np.clip(-residual - 3.0 * sigma, 0.0, None).sum())
    bright = float(np.clip(residual - 3.0 * sigma, 0.0, None).sum())
    if dark == bright:
        return float(np.median(border)) > 127.5
    return dark > bright


# --------------------------------------------------------------------------- helpers


def _resize(
    a: np.ndarray, size: tuple[int, int], box: tuple[float, float, float, float] | None = None
) -> np.ndarray:
    """Resize float32 ``a`` (or its ``box`` region, in source pixels) to ``size = (w, h)``.

    Area averaging (``BOX``) when shrinking, which keeps the ink's mass, bilinear when
    enlarging.
    """
    src_w = (box[2] - box[0]) if box else a.shape[1]
    src_h = (box[3] - box[1]) if box else a.shape[0]
    if box is None and (a.shape[1], a.shape[0]) == size:
        return a.astype(np.float32, copy=True)
    shrink = size[0] <= src_w and size[1] <= src_h
    resample = Image.Resampling.BOX if shrink else Image.Resampling.BILINEAR
    img = Image.fromarray(np.ascontiguousarray(a, dtype=np.float32), mode="F")
    return np.asarray(img.resize(size, resample, box=box), dtype=np.float32)


def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold (Otsu 1979, IEEE Trans. SMC 9(1)) of a 1-D sample of grey levels.

    Maximises the between-class variance over a ``bins``-bin histogram; returns the upper
    edge of the last bin of the dark class. A constant sample returns its value.
    """
    v = np.asarray(values, dtype=np.float64).ravel()
    lo, hi = float(v.min()), float(v.max())
    if hi <= lo:
        return lo
    hist, edges = np.histogram(v, bins=bins, range=(lo, hi))
    centres = (edges[:-1] + edges[1:]) / 2.0
    w0 = np.cumsum(hist)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * centres)
    mean0 = m0 / np.maximum(w0, 1)
    mean1 = (m0[-1] - m0) / np.maximum(w1, 1)
    between = w0 * w1 * (mean0 - mean1) ** 2
    return float(edges[int(np.argmax(between[:-1])) + 1])


def stroke_width(ink: np.ndarray) -> float:
    """Mean stroke width in pixels of an ink-bright image: twice the area over the perimeter.

    Area is the ink mass (sum of ``ink / max``), perimeter its total variation along rows
    and columns; for a stroke of width ``w`` and length ``L ≫ w`` that is ``2wL / 2L = w``,
    and blurring the edges changes neither. MNIST digits measure 1.34–3.0 px (5th–95th
    percentile, median 1.96, :data:`MNIST_STROKE_WIDTH`). Returns 0.0 for a blank image.
    """
    a = np.asarray(ink, dtype=np.float64)
    peak = float(a.max()) if a.size else 0.0
    if peak <= 0.0:
        return 0.0
    a = a / peak
    tv = float(np.abs(np.diff(a, axis=0)).sum() + np.abs(np.diff(a, axis=1)).sum())
    # The frame counts as an edge for ink touching it.
    tv += float(a[0].sum() + a[-1].sum() + a[:, 0].sum() + a[:, -1].sum())
    return 2.0 * float(a.sum()) / tv if tv > 0 else 0.0


def _shift(a: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """Move ``a`` by whole pixels, filling with zeros (no wrap-around)."""
    out = np.zeros_like(a)
    h, w = a.shape
    src_y, dst_y = (
        (slice(0, h - dy), slice(dy, h)) if dy >= 0 else (slice(-dy, h), slice(0, h + dy))
    )
    src_x, dst_x = (
        (slice(0, w - dx), slice(dx, w)) if dx >= 0 else (slice(-dx, w), slice(0, w + dx))
    )
    out[dst_y, dst_x] = a[src_y, src_x]
    return out


# --------------------------------------------------------------------------- MNIST box


@functools.cache
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Row and column indices of a ``(size, size)`` canvas (``np.indices``), read-only."""
    ys, xs = np.indices((size, size))
    ys.flags.writeable = xs.flags.writeable = False
    return ys, xs


def center_digit(
    ink: np.ndarray,
    image_size: int,
    digit_box: int,
    resample: Image.Resampling = Image.Resampling.LANCZOS,
    background: float | None = None,
) -> np.ndarray:
    """MNIST box fit and centring of an ink-bright crop; ``(S, S)`` float32 in 0..255.

    LeCun et al.: the ink's bounding box is scaled (keeping the aspect ratio) to fit a
    ``digit_box`` square, pasted into the ``image_size`` canvas and moved by whole pixels
    so that the intensity-weighted centre of mass sits at the centre (14.0 of 0..27 for
    MNIST, where the original put it); the shift is clamped so no ink leaves the canvas.
    The background (``background``, else the median of the border) is subtracted and the
    peak stretched to 255 first, which is the identity on clean MNIST-like images.
    """
    canvas = np.zeros((image_size, image_size), dtype=np.float32)
    if background is None:
        border = _border(ink)
        # A black frame (MNIST, canvases) has median 0 without sorting it.
        background = float(np.median(border)) if border.any() else 0.0
    peak = float(ink.max()) if ink.size else 0.0
    if peak - background < _MIN_CONTRAST:
        return canvas  # blank image: nothing to centre
    scaled = np.clip((ink - background) * (255.0 / (peak - background)), 0.0, 255.0)
    strong = scaled > 0.1 * 255
    rows = np.flatnonzero(strong.any(axis=1))
    cols = np.flatnonzero(strong.any(axis=0))
    crop = scaled[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]

    box = min(digit_box, image_size)
    h, w = crop.shape
    scale = box / max(h, w)
    new_w, new_h = max(1, round(w * scale)), max(1, round(h * scale))
    if (new_w, new_h) == (w, h):
        fitted = crop
    else:
        img = Image.fromarray(np.ascontiguousarray(crop, dtype=np.float32), mode="F")
        fitted = np.asarray(img.resize((new_w, new_h), resample), dtype=np.float32)
    fitted = np.clip(fitted, 0.0, 255.0)
    top_ink = float(fitted.max())
    if 0.0 < top_ink < 255.0:
        fitted *= 255.0 / top_ink  # the strongest stroke is full ink at the final size too
    top, left = (image_size - new_h) // 2, (image_size - new_w) // 2
    canvas[top : top + new_h, left : left + new_w] = fitted

    total = float(canvas.sum())
    if total <= 0.0:
        return canvas
    ys, xs = _grid(image_size)
    cy, cx = float((ys * canvas).sum()) / total, float((xs * canvas).sum()) / total
    centre = image_size / 2.0
    dy, dx = round(centre - cy), round(centre - cx)
    r = np.flatnonzero(canvas.any(axis=1))
    c = np.flatnonzero(canvas.any(axis=0))
    dy = min(max(dy, -int(r[0])), image_size - 1 - int(r[-1]))
    dx = min(max(dx, -int(c[0])), image_size - 1 - int(c[-1]))
    return _shift(canvas, dy, dx)


# --------------------------------------------------------------------------- stage A


@dataclass(frozen=True)
class _Found:
    """Where the digit is, in stage-A pixels, and how to re-read it."""

    box: tuple[int, int, int, int]  # top, left, bottom, right (exclusive)
    keep: np.ndarray  # float32 stage-A mask of the kept ink (1 = keep)
    background: np.ndarray  # float32 stage-A background of the ink-bright image
    floor: float  # noise floor of the ink (0..255)


def _coarse_background(gray: np.ndarray) -> np.ndarray:
    """A first background of an ink-bright image at ≤ ``BACKGROUND_SIDE`` px: a grey
    opening (bright structures narrower than a quarter of the image vanish), smoothed."""
    from scipy import ndimage as ndi

    h, w = gray.shape
    k = max(1, math.ceil(max(h, w) / BACKGROUND_SIDE))
    small = _resize(gray, (max(1, math.ceil(w / k)), max(1, math.ceil(h / k))))
    size = max(3, (max(small.shape) // 4) | 1)
    return ndi.uniform_filter(ndi.grey_opening(small, size=(size, size)), size=size)


def _ink_threshold(ink: np.ndarray) -> tuple[float, float]:
    """(noise floor, mask threshold) of a background-free ink image (0..255).

    The floor is 4 robust standard deviations above the residual's median (at least 4
    grey levels); the threshold half of Otsu's threshold over the pixels above it.
    """
    # Robust statistics on every other pixel: the same numbers at a quarter of the cost.
    sample = ink[::2, ::2] if ink.size > 4096 else ink
    median = float(np.median(sample))
    sigma = 1.4826 * float(np.median(np.abs(sample - median)))
    floor = median + max(4.0 * sigma, 4.0)
    candidates = ink[ink > floor]
    if candidates.size == 0:
        return floor, floor
    return floor, max(floor, 0.5 * otsu_threshold(candidates))


def _background(gray: np.ndarray) -> np.ndarray:
    """Background of an ink-bright image at its own resolution, float32 ``(H, W)``.

    A small image (≤ :data:`SMALL_SIDE` px) or a flat background (canvas, scan: the coarse
    estimate varies by less than a tenth of the ink's contrast) is one level, so strokes
    stay whole. Otherwise a white
    top-hat: the grey opening with a square four stroke widths wide (the width measured
    on a first, coarse estimate) removes the strokes and keeps everything broader —
    paper texture, shadows, light gradients, the table around the sheet.
    """
    from scipy import ndimage as ndi

    h, w = gray.shape
    if max(h, w) <= SMALL_SIDE:
        # A crop this small has no room for an illumination gradient, and a bold shape
        # fills much of it: the paper's level (the pixels below Otsu's threshold) it is.
        return np.full_like(gray, float(np.median(gray[gray <= otsu_threshold(gray)])))
    coarse = _coarse_background(gray)
    first = gray - _resize(coarse, (w, h))
    peak = float(np.percentile(first, 99.9)) if first.size > 1000 else float(first.max())
    spread = float(np.percentile(coarse, 95) - np.percentile(coarse, 5))
    if spread < 0.1 * max(peak, 1.0):
        return np.full_like(gray, float(np.median(coarse)))
    _, threshold = _ink_threshold(first)
    mask = first > threshold
    # Measure the strokes, not the noise: only components of some size count.
    labels, n = ndi.label(mask)
    if n > 1:
        areas = np.bincount(labels.ravel())[1:]
        mask = np.isin(labels, 1 + np.flatnonzero(areas >= SPECK_SHARE * areas.max()))
    width = stroke_width(mask.astype(np.float32))
    size = int(np.clip(round(4.0 * width) | 1, 5, max(5, max(h, w) | 1)))
    # Point reflection at the frame continues light gradients straight on, so a ramp
    # reaching the frame is no ridge for the opening to cut (and no ink).
    pad = size // 2 + 1
    padded = np.pad(gray, pad, mode="reflect", reflect_type="odd")
    opened = ndi.grey_opening(padded, size=(size, size))
    return opened[pad:-pad, pad:-pad].astype(np.float32)


def _remove_ruled_lines(
    mask: np.ndarray, ink: np.ndarray, threshold: float, floor: float
) -> tuple[np.ndarray, np.ndarray]:
    """Drop ruled lines and margins from the ink ``mask``; ``ink`` is edited in place.

    A line is a straight run over half the image (an opening with a one-pixel-wide line)
    of the ink above ``floor`` (half the mask ``threshold``: faint printed lines often
    dip below the threshold in places), with gaps of up to four pixels bridged first.
    It is removed when it spans the page (≥ 90 % of the side, at most 5 % as thick as
    long) or when it goes on past the rest of the ink at both ends (by a fifth of the
    rest's extent; a stroke of the digit ends at the digit). Removed lines are zeroed
    (ink much stronger than the line's own stays) and the strokes that crossed them are
    closed again across the gap. Returns the new
    mask (``ink > threshold`` where the lines were) and the pixels cut away (the lines
    less the stroke crossings), which the full-resolution re-read must leave out too.
    """
    from scipy import ndimage as ndi

    faint = (ink > floor).view(np.uint8)
    cut = np.zeros_like(mask)
    for axis in (1, 0):  # horizontal lines run along axis 1, vertical ones along axis 0
        side = mask.shape[axis]
        length = side // 2
        if length < 8:
            continue
        # Bridge small gaps along the axis, then open with a 1 x length line (van Herk
        # min/max filters, linear time).
        bridged = ndi.minimum_filter1d(ndi.maximum_filter1d(faint, 5, axis=axis), 5, axis=axis)
        line = ndi.maximum_filter1d(
            ndi.minimum_filter1d(bridged, length, axis=axis), length, axis=axis
        ).astype(bool) & (faint > 0)
        if not line.any():
            continue
        labels, _ = ndi.label(line)
        boxes = ndi.find_objects(labels)
        spans = np.array([sl[axis].stop - sl[axis].start for sl in boxes])
        thick = np.array([sl[1 - axis].stop - sl[1 - axis].start for sl in boxes])
        ruled = (spans >= 0.9 * side) & (thick <= 0.05 * spans)
        remove = np.isin(labels, 1 + np.flatnonzero(ruled))
        if not ruled.all():
            rest = mask & ~ndi.binary_dilation(line, iterations=1)
            along = 1 - axis  # any() over the other axis gives the extent along the line
            extent = np.flatnonzero(rest.any(axis=along))
            if extent.size:
                lo, hi = int(extent[0]), int(extent[-1]) + 1
                margin = 0.2 * (hi - lo)
                for i in np.flatnonzero(~ruled):
                    sl = boxes[i][axis]
                    # A line passes the digit by and goes on at both ends; a stroke of
                    # the digit (the stem of a 4, 7 or 9) ends at the digit.
                    if sl.start <= lo - margin and sl.stop >= hi + margin:
                        remove |= labels == i + 1
        if not remove.any():
            continue
        band = ndi.binary_dilation(remove, iterations=2)  # with the JPEG halo
        gap = int(thick.max()) + 7  # the band (line + 2 px each side) and one more
        # Ink clearly stronger than the line's own (a pen stroke along or across it)
        # stays; the rest of the band goes.
        line_level = float(np.percentile(ink[remove], 95))
        ink[band & (ink <= 1.5 * line_level)] = 0.0
        # Strokes cut by the line: a closing across the line bridges them again.
        closed = ndi.grey_closing(ink, size=(gap, 1) if axis == 1 else (1, gap))
        ink[band] = closed[band]
        mask = (mask & ~band) | (band & (ink > threshold))
        cut |= band & ~(ink > threshold)
        faint = (ink > floor).view(np.uint8)
    return mask, cut


def _find_digit(gray: np.ndarray, noise_free: bool = False) -> _Found | None:
    """Stage A on the ink-bright image (≤ ``WORK_SIDE`` px): background, ink, components.

    ``noise_free`` (:func:`_noise_free`): the background is zero, nothing to estimate.
    """
    from scipy import ndimage as ndi

    h, w = gray.shape
    bg = np.zeros_like(gray) if noise_free else _background(gray)
    ink = np.clip(gray - bg, 0.0, None)
    floor, threshold = _ink_threshold(ink)
    # Ink stands out: by a tenth of the image's own range at least (the residue a light
    # gradient leaves at its extremes does not).
    lo, hi = np.percentile(gray[:: max(1, h // 128), :: max(1, w // 128)], [1, 99])
    if float(ink.max()) - floor < max(_MIN_CONTRAST, 0.1 * float(hi - lo)):
        return None
    mask = ink > threshold
    if not mask.any():
        return None
    mask, cut = _remove_ruled_lines(mask, ink, threshold, max(floor, 0.5 * threshold))
    if not mask.any():
        return None

    # Group strokes across small gaps (a broken pen line is one digit), then measure
    # each group by its own ink.
    gap = max(1, round(0.015 * max(h, w)))
    near = ndi.maximum_filter(mask.view(np.uint8), size=2 * gap + 1).astype(bool)
    grouped, n = ndi.label(near, np.ones((3, 3), bool))
    if n == 0:
        return None
    idx = np.arange(1, n + 1)
    areas = np.bincount(grouped.ravel(), weights=mask.ravel(), minlength=n + 1)[1:]
    # Paper edges, the table around the sheet, shadow lines along the frame: groups that
    # touch the frame and have most of their ink in a band along it.
    t = max(2, round(0.08 * min(h, w)))
    band = np.zeros_like(mask)
    band[:t], band[-t:], band[:, :t], band[:, -t:] = True, True, True, True
    in_band = np.bincount(grouped.ravel(), weights=(mask & band).ravel(), minlength=n + 1)[1:]
    boxes = ndi.find_objects(grouped)
    on_border = np.array(
        [sl[0].start == 0 or sl[1].start == 0 or sl[0].stop == h or sl[1].stop == w
         for sl in boxes]
    )  # fmt: skip
    edge = on_border & (in_band >= 0.6 * np.maximum(areas, 1.0))
    if edge.all():
        return None  # nothing but the frame's edges: no digit
    areas = np.where(edge, 0.0, areas)
    keep_labels = [int(i) for i in idx[areas >= max(SPECK_SHARE * areas.max(), 1.0)]]
    keep = np.isin(grouped, keep_labels) & ~cut
    rows = np.flatnonzero((keep & mask).any(axis=1))
    cols = np.flatnonzero((keep & mask).any(axis=0))
    if rows.size == 0:
        return None
    return _Found(
        box=(int(rows[0]), int(cols[0]), int(rows[-1]) + 1, int(cols[-1]) + 1),
        keep=keep.astype(np.float32),
        background=bg,
        floor=floor,
    )


# --------------------------------------------------------------------------- stage B


def _fill_outline(ink: np.ndarray, side: int) -> np.ndarray:
    """Fill the holes of an outlined digit: closed thin contours around a stroke's body.

    A hole is the inside of an outlined stroke when it is a band: narrow (inscribed
    diameter under :data:`OUTLINE_HOLE_SHARE` of the digit's longer side ``side``), at
    least four contour widths wide, and elongated (area over squared width ≥ 2.5). The
    round loops of 0, 6, 8 and 9 fail the last test and stay open.
    """
    from scipy import ndimage as ndi

    # A thin contour shrunk by area averaging is faint and may break: take its weaker
    # part too and close one-pixel gaps.
    mask = ndi.binary_closing(ink >= 0.25, iterations=1, border_value=0)
    holes = ndi.binary_fill_holes(mask) & ~mask
    if not holes.any():
        return ink
    labels, n = ndi.label(holes)
    depth = ndi.distance_transform_edt(holes)
    idx = np.arange(1, n + 1)
    widest = np.asarray(ndi.maximum(depth, labels, idx), dtype=np.float64) * 2.0
    areas = np.asarray(ndi.sum(holes, labels, idx), dtype=np.float64)
    line = stroke_width(ink)
    fill = (
        (widest < OUTLINE_HOLE_SHARE * side) & (widest >= 4.0 * line) & (areas >= 2.5 * widest**2)
    )
    if not fill.any():
        return ink
    return np.maximum(ink, np.isin(labels, idx[fill]).astype(np.float32))


def _normalise_width(ink: np.ndarray, px_per_28: float) -> np.ndarray:
    """Thicken or thin the strokes of ``ink`` (0..1) into the MNIST width range.

    ``px_per_28``: pixels of ``ink`` per pixel of the 28 px model input. Strokes are
    grown by a disc (soft-edged, from the distance transform of the background) or shrunk
    by one (from the distance transform of the ink). :func:`stroke_width` reads slanted
    and curved strokes a little thinner than straight ones, as it did on MNIST, so the
    disc radius is refined by two secant steps until the measured width hits the MNIST
    median; shrinking never takes more than a third of the width, so no stroke vanishes.
    """
    from scipy import ndimage as ndi

    low, target, high = MNIST_STROKE_WIDTH
    width = stroke_width(ink)
    width_28 = width / px_per_28
    if low <= width_28 <= high or width <= 0.0:
        return ink
    if width_28 < low:
        # A thin line shrunk by area averaging is faint: count its weaker half too.
        outside = ndi.distance_transform_edt(~(ink >= 0.3))

        def change(radius: float) -> np.ndarray:
            return np.maximum(ink, np.clip(radius + 0.5 - outside, 0.0, 1.0))

        limit = max(ink.shape) / 8.0
    else:
        inside = ndi.distance_transform_edt(ink >= 0.5)

        def change(radius: float) -> np.ndarray:
            return ink * np.clip(inside - radius, 0.0, 1.0)

        limit = width / 3.0
    goal = target * px_per_28
    radius = min(abs(goal - width) / 2.0, limit)
    out = change(radius)
    prev_r, prev_w = 0.0, width
    for _ in range(2):
        w = stroke_width(out)
        if abs(w - goal) < 0.05 * goal or w == prev_w:
            break
        # Secant step on width(radius), kept inside [0, limit].
        radius, prev_r, prev_w = (
            float(np.clip(radius + (goal - w) * (radius - prev_r) / (w - prev_w), 0.0, limit)),
            radius,
            w,
        )
        out = change(radius)
    return out


def digit_to_mnist(img: Image.Image, image_size: int, digit_box: int, invert: str) -> np.ndarray:
    """A photo or drawing of one digit as an MNIST-like ``(S, S)`` float32 image in 0..255.

    See the module docstring for the steps. A blank image (no ink above the noise floor)
    gives an all-zero canvas. Deterministic; no torch.
    """
    source = ink_map(img, invert)
    gray = source.gray
    h, w = gray.shape
    if max(h, w) <= 2 * image_size and _clean(gray):
        return center_digit(gray, image_size, digit_box)  # fast path: MNIST-like already

    scale = min(1.0, WORK_SIDE / max(h, w))
    noise_free = _noise_free(gray)
    if noise_free:
        # Nothing to tell ink from but zero: a smaller copy finds the same digit.
        scale = min(scale, max(CLEAN_WORK_SIDE / max(h, w), 1.0 / CLEAN_MAX_REDUCTION))
    work_size = (max(1, round(w * scale)), max(1, round(h * scale)))
    work = gray if scale == 1.0 else _resize(gray, work_size)
    found = _find_digit(work, noise_free)
    if found is None:
        return np.zeros((image_size, image_size), dtype=np.float32)
    wh, ww = work.shape
    top, left, bottom, right = found.box
    # Re-read the box from the full-resolution image at OVERSAMPLE * digit_box.
    fy, fx = h / wh, w / ww
    box_full = (left * fx, top * fy, right * fx, bottom * fy)
    bw, bh = box_full[2] - box_full[0], box_full[3] - box_full[1]
    side = OVERSAMPLE * digit_box
    f = side / max(bw, bh)
    size = (max(1, round(bw * f)), max(1, round(bh * f)))
    crop = _resize(gray, size, box_full)
    bg = _resize(found.background, size, (float(left), float(top), float(right), float(bottom)))
    keep = _resize(found.keep, size, (float(left), float(top), float(right), float(bottom)))
    ink = np.clip(crop - bg - found.floor, 0.0, None) * (keep >= 0.5)
    peak = float(ink.max())
    if peak <= 0.0:
        return np.zeros((image_size, image_size), dtype=np.float32)
    strong = float(np.percentile(ink[ink > 0.25 * peak], 90))
    ink = np.clip(ink / max(strong, 1e-6), 0.0, 1.0)
    # JPEG ringing and paper grain around the strokes: faint, but they add perimeter and
    # would make the strokes read thinner than they are.
    ink[ink < 0.15] = 0.0
    # Room for strokes that grow past the box when thickened.
    pad = side // 8
    ink = np.pad(ink, pad)
    ink = _fill_outline(ink, side)
    ink = _normalise_width(ink, px_per_28=side / digit_box)
    return center_digit(ink * 255.0, image_size, digit_box, Image.Resampling.BOX, 0.0)


def _noise_free(gray: np.ndarray) -> bool:
    """Most of the image is exactly zero: a drawing (a canvas, ink read from alpha, a
    digital picture on a flat colour), with no paper, grain or light to remove."""
    return bool(np.count_nonzero(gray) <= (1.0 - CLEAN_ZERO_SHARE) * gray.size)


def _clean(gray: np.ndarray) -> bool:
    """Ink bright on an (almost) black border: nothing to remove, nothing to find."""
    border = _border(gray)
    clean = np.count_nonzero(border > _CLEAN_LEVEL) <= 0.1 * border.size
    return bool(clean and gray.max() >= 128.0)
