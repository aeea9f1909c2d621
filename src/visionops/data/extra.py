"""Extra training images: an image folder added to the training split (``data.extra_path``).

The monitoring loop's way back into training: ``visionops feedback export`` writes the
served inputs that received a true label as ``<folder>/<class>/*.png``, and the ingest
stage reads them here with the serving preprocessing (so a logged, model-sized input
comes back as the same pixels). They are stored apart (``x_extra``/``y_extra`` in
``dataset.npz``) and prepare appends them to the training split only: validation and
test stay the source's, so the gate compares models on the same untouched test split.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from visionops.data.transforms import (
    PreprocessSpec,
    UnreadableImageError,
    decode_image,
    image_to_array,
)
from visionops.errors import DataError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")


@dataclass(frozen=True)
class ExtraImages:
    """Images of an extra folder, decoded at the dataset's shape."""

    x: np.ndarray  # uint8 (N, H, W, C)
    y: np.ndarray  # int64 (N,), indices into the dataset's classes
    files: list[str] = field(default_factory=list)  # relative to the folder
    unreadable: list[dict[str, str]] = field(default_factory=list)


def load_extra_images(
    folder: Path, classes: list[str], spec: PreprocessSpec, max_pixels: int
) -> ExtraImages:
    """Read ``folder/<class>/*`` for class names in ``classes``.

    A folder that does not exist yet (nothing exported so far) or holds no class
    subfolders (e.g. only a README) gives no images; the former is logged. Raises
    :class:`DataError` when ``folder`` is a file, or holds a class folder the dataset
    does not have (its name is in the message). Files that cannot be decoded are skipped
    and listed in ``unreadable``.
    """
    folder = Path(folder)
    shape = (spec.image_size, spec.image_size, spec.channels)
    if not folder.exists():
        log.info("data.extra_path %s does not exist: no extra training images", folder)
        return ExtraImages(np.zeros((0, *shape), np.uint8), np.zeros(0, np.int64))
    if not folder.is_dir():
        raise DataError(
            f"data.extra_path {folder} is not a folder (give an image folder of "
            "<class>/*.png, e.g. written by `visionops feedback export`)"
        )
    subfolders = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    index = {c: i for i, c in enumerate(classes)}
    unknown = [p.name for p in subfolders if p.name not in index]
    if unknown:
        raise DataError(
            f"data.extra_path {folder}: class folder(s) {unknown} are not classes of the "
            f"dataset {classes[:20]}"
        )
    xs: list[np.ndarray] = []
    ys: list[int] = []
    files: list[str] = []
    unreadable: list[dict[str, str]] = []
    for sub in subfolders:
        for path in sorted(sub.rglob("*")):
            if not path.is_file() or path.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            rel = path.relative_to(folder).as_posix()
            try:
                arr = image_to_array(decode_image(path, max_pixels), spec)
            except (UnreadableImageError, DataError, OSError, ValueError) as exc:
                unreadable.append({"file": rel, "reason": str(exc)})
                continue
            xs.append(arr)
            ys.append(index[sub.name])
            files.append(rel)
    for bad in unreadable:
        log.warning("%s: unreadable image %s (%s)", folder, bad["file"], bad["reason"])
    x = np.stack(xs).astype(np.uint8) if xs else np.zeros((0, *shape), np.uint8)
    return ExtraImages(x=x, y=np.asarray(ys, dtype=np.int64), files=files, unreadable=unreadable)
