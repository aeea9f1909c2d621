"""Ingest stage: read the configured source, verify it, write ``data/interim/``.

Writes ``layout.dataset_npz`` (``x_train``, ``y_train``, ``x_test``, ``y_test``: uint8 NHWC
and int64; ``x_extra``, ``y_extra``: the images of ``data.extra_path``, for the training
split only — :mod:`visionops.data.extra`; for an image folder also ``size_train``,
``size_test``: int64 ``(N, 2)`` width, height of each picture before preprocessing, and
``format_train``, ``format_test``: each file's format, a unicode array) and
``layout.dataset_json`` (classes,
geometry, file names, unreadable files, checksums). Ingest keeps the whole source;
``data.limit`` and ``data.test_limit`` are applied by prepare.

Array files are written in the ``.npz`` format of :func:`numpy.savez` (uncompressed, no
pickles) by :func:`write_npz`, which fixes the zip timestamps so that the same data
always gives the same bytes (DVC then sees unchanged outputs as unchanged).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from visionops.config import Params
from visionops.data.sources import load_source
from visionops.errors import DataError
from visionops.layout import Layout
from visionops.stages import missing_input

log = logging.getLogger(__name__)

DATASET_KEYS = ("x_train", "y_train", "x_test", "y_test")
#: Image folders only: int64 (N, 2) width, height of each picture before preprocessing
#: and each file's format (unicode, Pillow's name: PNG, JPEG, ...).
ORIGINAL_KEYS = ("size_train", "size_test", "format_train", "format_test")
EXTRA_KEYS = ("x_extra", "y_extra")
_ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)


def write_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Write arrays as an ``np.savez``-compatible ``.npz``, byte-for-byte reproducible.

    Written to a temporary file and renamed, so readers never see half a file.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as raw, zipfile.ZipFile(raw, mode="w") as zf:
            for key, value in arrays.items():
                info = zipfile.ZipInfo(f"{key}.npy", date_time=_ZIP_EPOCH)
                info.compress_type = zipfile.ZIP_STORED
                info.external_attr = 0o644 << 16
                with zf.open(info, "w", force_zip64=True) as fid:
                    np.lib.format.write_array(fid, np.asanyarray(value), allow_pickle=False)
        os.replace(tmp_name, path)
    finally:
        Path(tmp_name).unlink(missing_ok=True)


def read_npz(path: Path, keys: tuple[str, ...]) -> dict[str, np.ndarray]:
    """Load the named arrays from an ``.npz`` (no pickles); DataError names the file."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            missing = [k for k in keys if k not in npz.files]
            if missing:
                raise DataError(f"{path} lacks array(s) {missing} (has {npz.files})")
            return {k: npz[k] for k in keys}
    except FileNotFoundError:
        raise DataError(missing_input(path)) from None
    except DataError:
        raise
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise DataError(f"{path} is not a readable .npz file ({exc})") from None


def write_json(path: Path, obj: Any) -> None:
    """Pretty, stable JSON written atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from ``path``; DataError names the file when missing or malformed."""
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(missing_input(path)) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{path} is not readable JSON ({exc})") from None
    if not isinstance(obj, dict):
        raise DataError(f"{path}: expected a JSON object")
    return obj


@dataclass(frozen=True)
class IngestResult:
    source: str
    classes: list[str]
    n_train: int
    n_test: int
    image_size: int
    channels: int
    n_unreadable: int
    dataset_npz: Path
    dataset_json: Path
    n_extra: int = 0

    def summary(self) -> dict[str, float]:
        return {
            "n_train": float(self.n_train),
            "n_test": float(self.n_test),
            "n_classes": float(len(self.classes)),
            "n_unreadable": float(self.n_unreadable),
            "image_size": float(self.image_size),
            "channels": float(self.channels),
            "n_extra": float(self.n_extra),
        }

    def describe(self) -> str:
        extra = f", {self.n_unreadable} unreadable file(s)" if self.n_unreadable else ""
        if self.n_extra:
            extra += f", {self.n_extra} extra training image(s)"
        return (
            f"{self.source}: {self.n_train} train + {self.n_test} test images, "
            f"{len(self.classes)} classes, {self.image_size}x{self.image_size}x{self.channels}"
            f"{extra}"
        )


def ingest_request(params: Params) -> dict[str, Any]:
    """The params ingest reads, as recorded in ``dataset.json`` (``request``): when they
    differ from the current params, the ingested data is stale."""
    return {
        "seed": params.seed,
        "source": params.data.source,
        "path": params.data.path,
        "image_size": params.data.image_size,
        "channels": params.data.channels,
        "natural_size": params.data.natural_size,
        "test_fraction": params.data.test_fraction,
        "preprocess": params.preprocess.model_dump(mode="json"),
        "max_pixels": params.serve.max_pixels,
    }


def stale_reason(params: Params, layout: Layout) -> str | None:
    """Why ``data/interim`` no longer matches the params or the image folder, or None
    (also when nothing was ingested yet).

    Compares the recorded :func:`ingest_request` and, for an image folder, its
    :func:`~visionops.data.sources.folder_fingerprint` (names, sizes, modification times).
    """
    from visionops.data.sources import folder_fingerprint, resolve_data_path

    if not layout.dataset_json.is_file() or not layout.dataset_npz.is_file():
        return None  # nothing ingested: the reader names the missing file
    meta = read_json(layout.dataset_json)
    recorded = meta.get("request")
    if recorded is not None and recorded != ingest_request(params):
        changed = sorted(
            k for k in ingest_request(params) if recorded.get(k) != ingest_request(params)[k]
        )
        return f"params changed since ingest ({', '.join(changed)})"
    if params.data.source == "imagefolder" and meta.get("fingerprint"):
        path = resolve_data_path(params, layout)
        if path.is_dir() and folder_fingerprint(path) != meta["fingerprint"]:
            return f"{path} changed since ingest (files added, removed or rewritten)"
    return None


def run_ingest(params: Params, layout: Layout) -> IngestResult:
    """Read ``data.source`` from ``data.path`` and write ``dataset.npz`` + ``dataset.json``."""
    from visionops.data.extra import ExtraImages, load_extra_images
    from visionops.data.sources import resolve_path
    from visionops.data.transforms import PreprocessSpec

    ds = load_source(params, layout)
    shape = (ds.image_size, ds.image_size, ds.channels)
    extra = (
        load_extra_images(
            resolve_path(params.data.extra_path, layout),
            ds.classes,
            PreprocessSpec.from_dict(ds.preprocess),
            params.serve.max_pixels,
        )
        if params.data.extra_path is not None
        else ExtraImages(np.zeros((0, *shape), np.uint8), np.zeros(0, np.int64))
    )
    write_npz(
        layout.dataset_npz,
        {
            "x_train": ds.x_train,
            "y_train": ds.y_train,
            "x_test": ds.x_test,
            "y_test": ds.y_test,
            "x_extra": extra.x,
            "y_extra": extra.y,
            **(
                {
                    "size_train": ds.train_sizes,
                    "size_test": ds.test_sizes,
                    "format_train": np.asarray(ds.train_formats or [], dtype=np.str_),
                    "format_test": np.asarray(ds.test_formats or [], dtype=np.str_),
                }
                if ds.train_sizes is not None and ds.test_sizes is not None
                else {}
            ),
        },
    )
    write_json(
        layout.dataset_json,
        {
            "source": ds.source,
            "path": params.data.path,
            "classes": ds.classes,
            "image_size": ds.image_size,
            "channels": ds.channels,
            "n_train": len(ds.y_train),
            "n_test": len(ds.y_test),
            "train_files": ds.train_files,
            "test_files": ds.test_files,
            "unreadable": ds.unreadable,
            "checksums": ds.checksums,
            "val_indices": ds.val_indices,
            # How image files became model inputs (decided from the data where params say
            # auto); prepare passes it on to the model.
            "preprocess": ds.preprocess,
            "profile": ds.profile,
            "fingerprint": ds.fingerprint,
            "request": ingest_request(params),
            "extra": {
                "path": params.data.extra_path,
                "n": len(extra.y),
                "files": extra.files,
                "unreadable": extra.unreadable,
            },
        },
    )
    result = IngestResult(
        source=ds.source,
        classes=ds.classes,
        n_train=len(ds.y_train),
        n_test=len(ds.y_test),
        image_size=ds.image_size,
        channels=ds.channels,
        n_unreadable=len(ds.unreadable),
        dataset_npz=layout.dataset_npz,
        dataset_json=layout.dataset_json,
        n_extra=len(extra.y),
    )
    log.info("ingested %s", result.describe())
    return result
