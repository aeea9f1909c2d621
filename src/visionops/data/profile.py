"""Decide how pictures become model inputs from the pictures themselves.

For ``data.source: imagefolder`` the geometry and the digit conventions follow the
data unless params fix them:

- ``channels``: 3 when any sampled picture has colour (a pixel whose R, G and B differ by
  more than :data:`COLOUR_TOLERANCE`), else 1.
- ``kind``: ``digit`` (MNIST conventions: automatic inversion, centring, digit
  statistics in monitoring) when the pictures are grey *and* at least
  :data:`DIGIT_SHARE` of them sit on a plain background (the border's median is within
  :data:`PLAIN_MARGIN` of black or white and the border varies little); otherwise
  ``natural`` (photos: colours kept, no inversion, no centring).
- ``image_size``: 28 for digits; ``data.natural_size`` for natural pictures (each is
  resized so its *shorter* side fits, then centre-cropped to a square: the aspect ratio
  is kept and the borders of the longer side are cut, torchvision's
  ``Resize(size) + CenterCrop(size)``).

``mnist`` is ``digit`` and ``cifar10`` ``natural``, at their native geometry. What was
decided is written to ``dataset.json`` (``preprocess``), printed by ``validate``, copied
to ``reports/validation.json`` and into every model's metadata.

Only up to :data:`SAMPLE_SIZE` files (spread evenly over the sorted list) are decoded, so
profiling a large folder costs a fraction of a second per hundred files.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from visionops.data.transforms import PreprocessSpec, decode_image
from visionops.errors import DataError

if TYPE_CHECKING:
    from visionops.config import Params

#: Files decoded to profile a folder.
SAMPLE_SIZE = 64
#: Largest R/G/B difference (0..255) still counted as grey (JPEG chroma noise).
COLOUR_TOLERANCE = 12
#: A plain background: border median within this of 0 or 255 ...
PLAIN_MARGIN = 40.0
#: ... and a border standard deviation below this.
PLAIN_BORDER_STD = 40.0
#: Share of sampled grey pictures on a plain background that makes a folder of digits.
DIGIT_SHARE = 0.8
DIGIT_SIZE = 28


@dataclass(frozen=True)
class DataProfile:
    """What a sample of pictures looks like (the inputs of the decisions above)."""

    sampled: int
    colour: bool
    plain_background_share: float
    median_width: int
    median_height: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _border(a: np.ndarray) -> np.ndarray:
    h, w = a.shape[:2]
    t = max(1, round(0.05 * min(h, w)))
    if 2 * t >= h or 2 * t >= w:
        return a.reshape(-1)
    return np.concatenate([a[:t].ravel(), a[-t:].ravel(), a[:, :t].ravel(), a[:, -t:].ravel()])


def profile_images(files: Sequence[Path], max_pixels: int) -> DataProfile:
    """Profile up to :data:`SAMPLE_SIZE` of ``files`` (unreadable ones are skipped)."""
    if not files:
        raise DataError("no image files to profile")
    step = max(1, len(files) // SAMPLE_SIZE)
    colour, plain, sizes = False, 0, []
    for path in list(files)[::step][:SAMPLE_SIZE]:
        try:
            img = decode_image(path, max_pixels)
        except DataError:
            continue  # reported as unreadable by the ingest proper
        sizes.append(img.size)
        rgb = np.asarray(img.convert("RGB"), dtype=np.int16)
        spread = rgb.max(axis=2) - rgb.min(axis=2)
        if float(np.percentile(spread, 99)) > COLOUR_TOLERANCE:
            colour = True
        border = _border(rgb.mean(axis=2))
        median = float(np.median(border))
        if min(median, 255.0 - median) <= PLAIN_MARGIN and float(border.std()) < PLAIN_BORDER_STD:
            plain += 1
    if not sizes:
        raise DataError("none of the sampled image files could be decoded")
    widths, heights = zip(*sizes, strict=True)
    return DataProfile(
        sampled=len(sizes),
        colour=colour,
        plain_background_share=plain / len(sizes),
        median_width=int(np.median(widths)),
        median_height=int(np.median(heights)),
    )


def decide_kind(profile: DataProfile) -> str:
    """``digit`` for grey pictures mostly on a plain background, else ``natural``."""
    if not profile.colour and profile.plain_background_share >= DIGIT_SHARE:
        return "digit"
    return "natural"


def resolve_spec(
    params: Params, profile: DataProfile | None = None, source: str | None = None
) -> PreprocessSpec:
    """The preprocessing of ``params`` with every ``auto``/``null`` decided.

    ``profile`` is required for an image folder whose kind, size or channels are left to
    the data; mnist and cifar10 need none. Mean/std are left at 0/1 (prepare computes
    them).
    """
    source = source or params.data.source
    pp = params.preprocess
    kind: str = pp.kind
    if kind == "auto":
        if source == "mnist":
            kind = "digit"
        elif source == "cifar10":
            kind = "natural"
        else:
            if profile is None:
                raise DataError("an image folder needs a profile to decide preprocess.kind")
            kind = decide_kind(profile)
    if source == "imagefolder":
        size = params.data.image_size or (
            DIGIT_SIZE if kind == "digit" else params.data.natural_size
        )
        channels: int | None = params.data.channels
        if channels is None:
            if profile is None:
                raise DataError("an image folder needs a profile to decide data.channels")
            channels = 3 if profile.colour else 1
    else:
        size, channels = params.data.shape()
    assert channels is not None  # decided above for every source
    center = (kind == "digit") if pp.center == "auto" else bool(pp.center)
    invert = pp.invert
    if invert == "auto" and kind == "natural":
        invert = "never"
    return PreprocessSpec(
        image_size=size,
        channels=channels,
        invert=invert,
        center=center,
        digit_box=pp.digit_box,
        kind=kind,
    )
