"""Natural pictures (photos) to model inputs: keep the colours, keep the aspect ratio.

torchvision's evaluation convention, ``Resize(size)`` then ``CenterCrop(size)``: the
picture is resized (Lanczos) so that its *shorter* side is ``size`` pixels, then the
middle ``size × size`` square is cut out. Nothing is stretched and nothing is padded;
the ends of the longer side are lost (for a 4:3 photo, 1/8 of the width on each side).
"""

from __future__ import annotations

import numpy as np
from PIL import Image


def resize_shorter_side(img: Image.Image, size: int) -> Image.Image:
    """``img`` resized (Lanczos) so that ``min(width, height) == size``, aspect ratio kept."""
    w, h = img.size
    scale = size / min(w, h)
    new = (max(size, round(w * scale)), max(size, round(h * scale)))
    return img if new == (w, h) else img.resize(new, Image.Resampling.LANCZOS)


def center_crop(img: Image.Image, size: int) -> Image.Image:
    """The central ``size × size`` square of ``img`` (at least ``size`` on both sides)."""
    w, h = img.size
    left, top = (w - size) // 2, (h - size) // 2
    return img.crop((left, top, left + size, top + size))


def natural_to_array(img: Image.Image, size: int, invert: bool = False) -> np.ndarray:
    """uint8 ``(size, size, C)`` of an ``L`` or ``RGB`` image: shorter side resized to
    ``size``, centre-cropped; colours inverted only when ``invert``."""
    out = center_crop(resize_shorter_side(img, size), size)
    a = np.asarray(out, dtype=np.uint8)
    if a.ndim == 2:
        a = a[:, :, None]
    if invert:
        a = 255 - a
    return np.ascontiguousarray(a)
