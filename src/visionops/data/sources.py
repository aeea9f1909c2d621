"""Data sources: MNIST IDX files, the binary CIFAR-10 archive, and a folder of images.

Every source returns a :class:`RawDataset` (uint8 NHWC images, int64 labels, class names,
file names where the source has files, unreadable files, verified checksums), selected by
``data.source`` and ``data.path`` in :func:`load_source`.

Integrity. A folder with a ``SHA256SUMS`` file (``sha256sum`` format) is verified before
anything is parsed: a listed file that is missing or whose digest differs is an error
naming the file. MNIST requires the file; ``MD5SUMS.uncompressed``, when present, is
checked against the decompressed IDX bytes as well. Nothing here touches the network:
:func:`download_mnist` and :func:`download_cifar10` exist for a person (or a script) to call
explicitly with a mirror URL; they download to a temporary file, verify the checksum and
only then move the file into place.

Safety. The CIFAR-10 archive is read in memory member by member (never extracted, so
member names cannot write outside the data folder; links are ignored) and never
unpickled: only the binary version (``cifar-10-binary.tar.gz``) is accepted.
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import logging
import os
import tarfile
import tempfile
import urllib.error
import urllib.parse
import urllib.request
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from visionops.config import NATIVE_SHAPE
from visionops.data.transforms import (
    PreprocessSpec,
    UnreadableImageError,
    decode_image,
    image_to_array,
)
from visionops.errors import DataError

if TYPE_CHECKING:
    from visionops.config import Params
    from visionops.layout import Layout

log = logging.getLogger(__name__)

CHECKSUM_FILE = "SHA256SUMS"
UNCOMPRESSED_MD5_FILE = "MD5SUMS.uncompressed"

MNIST_FILES: dict[str, str] = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}
MNIST_CLASSES = [str(d) for d in range(10)]

CIFAR10_ARCHIVE = "cifar-10-binary.tar.gz"
CIFAR10_TRAIN_BATCHES = tuple(f"data_batch_{i}.bin" for i in range(1, 6))
CIFAR10_TEST_BATCH = "test_batch.bin"
CIFAR10_META = "batches.meta.txt"
CIFAR10_RECORD = 1 + 3 * 32 * 32  # label byte + CHW pixels
#: The MD5 the CIFAR-10 page publishes for the binary archive; used by
#: :func:`download_cifar10` when no SHA-256 is known.
CIFAR10_BINARY_MD5 = "c32a1d4ab5d03f1284b67883e8d87530"

#: torchvision's ImageFolder extensions that :func:`decode_image` reads, plus GIF;
#: matched case-insensitively (``.JPG`` counts).
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif")
#: Optional split folders of an image folder (torchvision's layout).
SPLIT_FOLDERS = ("train", "val", "test")

# Upper bounds on what a parser will read into memory (a hostile header or gzip bomb
# must fail with a message, not exhaust the machine).
MAX_IDX_BYTES = 1 << 30
MAX_CIFAR_MEMBER_BYTES = 64 << 20
MAX_DOWNLOAD_BYTES = 1 << 30

# IDX type codes -> big-endian numpy dtypes.
_IDX_DTYPES: dict[int, str] = {
    0x08: ">u1",
    0x09: ">i1",
    0x0B: ">i2",
    0x0C: ">i4",
    0x0D: ">f4",
    0x0E: ">f8",
}


@dataclass
class RawDataset:
    """What a source yields: the input of ``dataset.npz`` and ``dataset.json``."""

    source: str
    classes: list[str]
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    train_files: list[str] | None = None
    test_files: list[str] | None = None
    unreadable: list[dict[str, str]] = field(default_factory=list)
    checksums: dict[str, str] = field(default_factory=dict)
    #: Indices into ``x_train`` that came from an image folder's ``val/`` (prepare's
    #: validation split); None = prepare draws the validation split itself.
    val_indices: list[int] | None = None
    #: The decided preprocessing (``PreprocessSpec.to_dict()``) and what it was decided from.
    preprocess: dict[str, object] = field(default_factory=dict)
    profile: dict[str, object] | None = None
    #: :func:`folder_fingerprint` of an image folder when it was read.
    fingerprint: str | None = None
    #: Image folders only: each picture's own ``(width, height)`` in pixels after EXIF
    #: orientation (int64 ``(N, 2)``, rows of ``x_train`` / ``x_test``), as the server
    #: logs an upload's, and each file's format (Pillow's name: PNG, JPEG, ...). None for
    #: MNIST and CIFAR-10, whose arrays have no original size or file format.
    train_sizes: np.ndarray | None = None
    test_sizes: np.ndarray | None = None
    train_formats: list[str] | None = None
    test_formats: list[str] | None = None

    @property
    def image_size(self) -> int:
        return int(self.x_train.shape[1])

    @property
    def channels(self) -> int:
        return int(self.x_train.shape[3])


# --------------------------------------------------------------------------- checksums


def file_digest(path: Path, algorithm: str = "sha256") -> str:
    """Hex digest of a file, read in chunks."""
    h = hashlib.new(algorithm)
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def read_checksum_file(path: Path) -> dict[str, str]:
    """Parse ``sha256sum``/``md5sum`` output (``<hex>  <name>`` or ``<hex> *<name>``)."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"checksum file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read checksum file {path}: {exc}") from None
    sums: dict[str, str] = {}
    for lineno, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split(maxsplit=1)
        digest = parts[0].lower()
        if len(parts) != 2 or any(c not in "0123456789abcdef" for c in digest):
            raise DataError(f"{path}:{lineno}: expected '<hex digest>  <file name>', got {line!r}")
        name = parts[1].strip().lstrip("*")
        rel = PurePosixPath(name)
        if rel.is_absolute() or ".." in rel.parts:
            raise DataError(f"{path}:{lineno}: file name {name!r} must stay inside the folder")
        sums[name] = digest
    return sums


def verify_checksums(
    folder: Path, required: tuple[str, ...] = (), *, sums_file: str = CHECKSUM_FILE
) -> dict[str, str]:
    """Check every file listed in ``folder/SHA256SUMS``; return ``{name: sha256}``.

    Raises :class:`DataError` naming each missing or altered file (all of them, in one
    message), a missing checksum file, or a ``required`` file it does not list.
    """
    sums_path = folder / sums_file
    sums = read_checksum_file(sums_path)
    problems = [f"{name} is not listed in {sums_path}" for name in required if name not in sums]
    verified: dict[str, str] = {}
    for name, expected in sums.items():
        path = folder / name
        if not path.is_file():
            problems.append(f"{path} is missing (listed in {sums_file})")
            continue
        actual = file_digest(path, "sha256")
        if actual != expected:
            problems.append(
                f"{path} has been altered: sha256 {actual} does not match {expected} in {sums_file}"
            )
        verified[name] = actual
    if problems:
        hint = ""
        if any("missing" in p or "altered" in p for p in problems):
            hint = (
                " (restore the files with `dvc checkout`/`git checkout`, or fetch them "
                "explicitly with visionops.data.sources.download_mnist / download_cifar10)"
            )
        raise DataError("checksum verification failed: " + "; ".join(problems) + hint)
    return verified


# --------------------------------------------------------------------------- MNIST (IDX)


def _read_maybe_gzip(path: Path) -> bytes:
    """Bytes of a file, gunzipped when it starts with the gzip magic; size-capped."""
    try:
        with path.open("rb") as f:
            magic = f.read(2)
        if magic == b"\x1f\x8b":
            with gzip.open(path, "rb") as g:
                raw = g.read(MAX_IDX_BYTES + 1)
        else:
            with path.open("rb") as f:
                raw = f.read(MAX_IDX_BYTES + 1)
    except FileNotFoundError:
        raise DataError(f"file not found: {path}") from None
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(f"{path}: cannot decompress ({exc})") from None
    if len(raw) > MAX_IDX_BYTES:
        raise DataError(f"{path}: more than {MAX_IDX_BYTES} bytes once decompressed; refused")
    return raw


def parse_idx(raw: bytes, name: str = "IDX data") -> np.ndarray:
    """Parse IDX bytes (``00 00 <type> <ndim>``, big-endian uint32 dims, data)."""
    if len(raw) < 4:
        raise DataError(f"{name}: too short for an IDX header ({len(raw)} bytes)")
    if raw[0] != 0 or raw[1] != 0:
        raise DataError(
            f"{name}: not an IDX file (magic bytes {raw[:4].hex()}, expected 0000<type><ndim>)"
        )
    type_code, ndim = raw[2], raw[3]
    if type_code not in _IDX_DTYPES:
        raise DataError(f"{name}: unknown IDX data type 0x{type_code:02x}")
    if ndim < 1:
        raise DataError(f"{name}: IDX header declares {ndim} dimensions")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{name}: truncated IDX header ({len(raw)} bytes, need {header})")
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    dtype = np.dtype(_IDX_DTYPES[type_code])
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    actual = len(raw) - header
    if actual != expected:
        raise DataError(
            f"{name}: IDX header declares shape {dims} ({expected} data bytes) "
            f"but the file holds {actual} bytes"
        )
    data = np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims)
    return data.astype(dtype.newbyteorder("="), copy=True)


def load_mnist_idx(path: Path) -> np.ndarray:
    """Read one IDX file (gzip or raw) into a native-endian array; DataError if malformed."""
    return parse_idx(_read_maybe_gzip(Path(path)), str(path))


def load_mnist(folder: Path) -> RawDataset:
    """MNIST from the four IDX ``.gz`` files in ``folder``, verified against SHA256SUMS."""
    folder = Path(folder)
    if folder.is_file():
        raise DataError(
            f"{folder} is a file; data.path for mnist is the folder holding the four IDX "
            f".gz files and {CHECKSUM_FILE}"
        )
    if not folder.is_dir():
        raise DataError(f"MNIST folder not found: {folder}")
    checksums = verify_checksums(folder, required=tuple(MNIST_FILES.values()))
    md5_path = folder / UNCOMPRESSED_MD5_FILE
    md5s = read_checksum_file(md5_path) if md5_path.is_file() else {}

    arrays: dict[str, np.ndarray] = {}
    for key, fname in MNIST_FILES.items():
        path = folder / fname
        raw = _read_maybe_gzip(path)
        expected_md5 = md5s.get(fname.removesuffix(".gz"))
        if expected_md5 is not None and hashlib.md5(raw).hexdigest() != expected_md5:
            raise DataError(
                f"{path}: decompressed content does not match {md5_path} "
                f"(md5 {hashlib.md5(raw).hexdigest()} != {expected_md5})"
            )
        arrays[key] = parse_idx(raw, str(path))

    for split in ("train", "test"):
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        img_file = folder / MNIST_FILES[f"{split}_images"]
        lbl_file = folder / MNIST_FILES[f"{split}_labels"]
        if images.ndim != 3 or images.dtype != np.uint8:
            raise DataError(
                f"{img_file}: expected uint8 images of shape (N, H, W), "
                f"got {images.dtype} {images.shape}"
            )
        if labels.ndim != 1:
            raise DataError(f"{lbl_file}: expected a 1-D label vector, got shape {labels.shape}")
        if len(images) != len(labels):
            raise DataError(
                f"{img_file} holds {len(images)} images but {lbl_file} holds {len(labels)} labels"
            )
    return RawDataset(
        source="mnist",
        classes=list(MNIST_CLASSES),
        x_train=np.ascontiguousarray(arrays["train_images"][..., None]),
        y_train=arrays["train_labels"].astype(np.int64),
        x_test=np.ascontiguousarray(arrays["test_images"][..., None]),
        y_test=arrays["test_labels"].astype(np.int64),
        checksums=checksums,
    )


# --------------------------------------------------------------------------- CIFAR-10


def _cifar_archive(path: Path) -> Path:
    if path.is_dir():
        archive = path / CIFAR10_ARCHIVE
        if not archive.is_file():
            raise DataError(
                f"{archive} not found (data.path for cifar10 is the binary archive "
                f"'{CIFAR10_ARCHIVE}' or the folder holding it)"
            )
        return archive
    if not path.exists():
        raise DataError(f"CIFAR-10 archive not found: {path}")
    if "python" in path.name:
        raise DataError(
            f"{path}: this looks like the pickled Python version of CIFAR-10; visionops "
            f"never unpickles data and reads only the binary version '{CIFAR10_ARCHIVE}'"
        )
    return path


def _parse_cifar_batch(data: bytes, name: str) -> tuple[np.ndarray, np.ndarray]:
    if len(data) == 0 or len(data) % CIFAR10_RECORD:
        raise DataError(
            f"{name}: {len(data)} bytes is not a whole number of {CIFAR10_RECORD}-byte records"
        )
    records = np.frombuffer(data, dtype=np.uint8).reshape(-1, CIFAR10_RECORD)
    labels = records[:, 0].astype(np.int64)
    images = records[:, 1:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images), labels


def load_cifar10_binary(path: Path) -> RawDataset:
    """CIFAR-10 from the binary archive (``data_batch_1..5.bin``, ``test_batch.bin``).

    ``path`` is the archive or the folder holding it. Members are read in memory; only
    regular files whose names end in the expected file names are used.
    """
    archive = _cifar_archive(Path(path))
    checksums: dict[str, str] = {}
    sums_path = archive.parent / CHECKSUM_FILE
    if sums_path.is_file() and archive.name in read_checksum_file(sums_path):
        checksums = verify_checksums(archive.parent, required=(archive.name,))
    else:
        checksums[archive.name] = file_digest(archive, "sha256")

    wanted = {*CIFAR10_TRAIN_BATCHES, CIFAR10_TEST_BATCH, CIFAR10_META}
    found: dict[str, bytes] = {}
    try:
        with tarfile.open(archive, mode="r:*") as tar:
            for member in tar:
                rel = PurePosixPath(member.name)
                base = rel.name
                if base not in wanted or not member.isfile():
                    continue
                if rel.is_absolute() or ".." in rel.parts:
                    log.warning("%s: ignoring member with unsafe path %r", archive, member.name)
                    continue
                if base in found:
                    raise DataError(f"{archive}: more than one member named {base}")
                if member.size > MAX_CIFAR_MEMBER_BYTES:
                    raise DataError(f"{archive}: member {member.name} is too large ({member.size})")
                fobj = tar.extractfile(member)
                if fobj is None:
                    continue
                found[base] = fobj.read()
    except DataError:
        raise
    except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
        raise DataError(f"{archive}: not a readable tar.gz archive ({exc})") from None

    missing = sorted(wanted - set(found))
    if missing:
        hint = ""
        if any(n.startswith("data_batch") for n in missing):
            hint = f" (is this the binary version '{CIFAR10_ARCHIVE}'?)"
        raise DataError(f"{archive}: missing member(s) {', '.join(missing)}{hint}")

    try:
        meta_text = found[CIFAR10_META].decode("utf-8")
    except UnicodeDecodeError:
        raise DataError(f"{archive}: {CIFAR10_META} is not UTF-8 text") from None
    classes = [line.strip() for line in meta_text.splitlines() if line.strip()]
    if len(classes) < 2:
        raise DataError(f"{archive}: {CIFAR10_META} lists {len(classes)} class names")

    parts = [_parse_cifar_batch(found[n], f"{archive}:{n}") for n in CIFAR10_TRAIN_BATCHES]
    x_test, y_test = _parse_cifar_batch(found[CIFAR10_TEST_BATCH], f"{archive}:test_batch.bin")
    return RawDataset(
        source="cifar10",
        classes=classes,
        x_train=np.concatenate([p[0] for p in parts]),
        y_train=np.concatenate([p[1] for p in parts]),
        x_test=x_test,
        y_test=y_test,
        checksums=checksums,
    )


# --------------------------------------------------------------------------- image folder


def _class_dirs(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and not _hidden(p.name))


def _list_images(class_root: Path, cls: str, root: Path) -> tuple[list[Path], int]:
    """Image files under ``class_root/cls`` sorted by path, and the number of others."""
    files: list[Path] = []
    ignored = 0
    for dirpath, dirnames, filenames in os.walk(class_root / cls):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for fname in filenames:
            if fname.startswith("."):
                continue
            if fname.lower().endswith(IMAGE_EXTENSIONS):
                files.append(Path(dirpath) / fname)
            else:
                ignored += 1
    files.sort(key=lambda p: p.relative_to(root).as_posix())
    return files, ignored


def _split_rank(seed: int, rel: str) -> str:
    # A per-file hash (not a shuffled index) keeps a file on the same side of the split
    # when other files are added or removed.
    return hashlib.sha256(f"{seed}:{rel}".encode()).hexdigest()


def _hidden(name: str) -> bool:
    return name.startswith(".")


def folder_fingerprint(root: Path) -> str:
    """A digest of every visible file's relative path, size and modification time under
    ``root``: it changes when a picture is added, removed, renamed or rewritten."""
    h = hashlib.blake2b(digest_size=16)
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not _hidden(d))
        for fname in sorted(f for f in filenames if not _hidden(f)):
            path = Path(dirpath) / fname
            try:
                st = path.stat()
            except OSError:
                continue
            rel = path.relative_to(root).as_posix()
            h.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


@dataclass(frozen=True)
class FolderListing:
    """The files of an image folder: classes and ``(path, label, split or None)``."""

    root: Path
    classes: list[str]
    entries: list[tuple[Path, int, str | None]]
    has_split: bool

    @property
    def files(self) -> list[Path]:
        return [e[0] for e in self.entries]


def list_imagefolder(root: Path) -> FolderListing:
    """List ``root/<class>/...`` or ``root/{train,test}/<class>/...`` (``val/`` optional).

    torchvision's ImageFolder conventions: classes are the sorted names of the visible
    class folders, hidden files and folders (a leading dot) are skipped, extensions are
    matched case-insensitively and subfolders of a class folder are searched too.
    """
    root = Path(root)
    if not root.exists():
        raise DataError(f"image folder not found: {root}")
    if not root.is_dir():
        raise DataError(f"{root} is not a folder (imagefolder expects one subfolder per class)")

    train_dir, val_dir, test_dir = (root / name for name in SPLIT_FOLDERS)
    has_split = train_dir.is_dir() and test_dir.is_dir()
    if train_dir.is_dir() != test_dir.is_dir():
        present = train_dir if train_dir.is_dir() else test_dir
        raise DataError(
            f"{root}: found {present.name}/ without its partner; use both train/ and test/ "
            f"(each holding class folders, val/ optional) or neither"
        )
    if val_dir.is_dir() and not has_split:
        raise DataError(f"{root}: found val/ without train/ and test/; use all three or none")

    entries: list[tuple[Path, int, str | None]] = []
    groups: list[tuple[Path, str | None, list[str]]]
    ignored = 0
    if has_split:
        classes = _class_dirs(train_dir)
        groups = [(train_dir, "train", classes)]
        for other, split_name in ((val_dir, "val"), (test_dir, "test")):
            if not other.is_dir():
                continue
            names = _class_dirs(other)
            unknown = sorted(set(names) - set(classes))
            if unknown:
                raise DataError(f"{other}: class folder(s) {unknown} have no match in {train_dir}")
            groups.append((other, split_name, names))
    else:
        classes = _class_dirs(root)
        groups = [(root, None, classes)]
    if len(classes) < 2:
        where = train_dir if has_split else root
        raise DataError(
            f"{where}: found {len(classes)} class folder(s) {classes}; "
            f"imagefolder needs at least 2 (one subfolder per class)"
        )
    index = {c: i for i, c in enumerate(classes)}
    for base, split, names in groups:
        for cls in names:
            files, n_ignored = _list_images(base, cls, root)
            ignored += n_ignored
            entries.extend((f, index[cls], split) for f in files)
    if ignored:
        log.info(
            "%s: ignored %d file(s) that are not %s", root, ignored, "/".join(IMAGE_EXTENSIONS)
        )
    if not entries:
        raise DataError(f"{root}: no {'/'.join(IMAGE_EXTENSIONS)} files in the class folders")
    return FolderListing(root=root, classes=classes, entries=entries, has_split=has_split)


def load_imagefolder(
    root: Path,
    spec: PreprocessSpec,
    *,
    test_fraction: float,
    seed: int,
    max_pixels: int,
    listing: FolderListing | None = None,
) -> RawDataset:
    """Images from ``root/<class>/...`` (or ``root/train/<class>`` + ``root/test/<class>``,
    with ``root/val/<class>`` optional; see :func:`list_imagefolder`).

    Each file goes through :func:`~visionops.data.transforms.decode_image` and
    :func:`~visionops.data.transforms.image_to_array` with ``spec`` (the serving path).
    Files that cannot be decoded are listed in ``unreadable``. Without train/test
    subfolders, ``round(test_fraction * n)`` images of each class go to the test split,
    chosen by a seeded hash of their relative path. Pictures from ``val/`` are appended
    to the training arrays and their indices kept in ``val_indices``.
    """
    listing = listing or list_imagefolder(root)
    root, classes, entries, has_split = (
        listing.root,
        listing.classes,
        listing.entries,
        listing.has_split,
    )

    readable: list[tuple[str, int, str | None, np.ndarray, tuple[int, int], str]] = []
    unreadable: list[dict[str, str]] = []
    for n, (path, label, split) in enumerate(entries, start=1):
        rel = path.relative_to(root).as_posix()
        try:
            img = decode_image(path, max_pixels)
            arr = image_to_array(img, spec)
        except UnreadableImageError as exc:
            unreadable.append({"file": rel, "reason": exc.reason})
            continue
        except (DataError, OSError, ValueError) as exc:
            unreadable.append({"file": rel, "reason": str(exc)})
            continue
        readable.append((rel, label, split, arr, img.size, str(img.format)))
        if n % 5000 == 0:
            log.info("%s: decoded %d/%d images", root, n, len(entries))
    for bad in unreadable:
        log.warning("%s: unreadable image %s (%s)", root, bad["file"], bad["reason"])

    if not has_split:
        assigned: list[tuple[str, int, str | None, np.ndarray, tuple[int, int], str]] = []
        for label in range(len(classes)):
            members = [r for r in readable if r[1] == label]
            n_test = round(len(members) * test_fraction)
            if len(members) >= 2:
                n_test = min(max(n_test, 1), len(members) - 1)
            test_names = {
                r[0] for r in sorted(members, key=lambda r: _split_rank(seed, r[0]))[:n_test]
            }
            assigned.extend(
                (r[0], r[1], "test" if r[0] in test_names else "train", r[3], r[4], r[5])
                for r in members
            )
        readable = sorted(assigned, key=lambda r: r[0])

    shape = (spec.image_size, spec.image_size, spec.channels)

    def stack(split: str) -> tuple[np.ndarray, np.ndarray, list[str], np.ndarray, list[str]]:
        rows = [r for r in readable if r[2] == split]
        x = np.stack([r[3] for r in rows]) if rows else np.zeros((0, *shape), dtype=np.uint8)
        y = np.asarray([r[1] for r in rows], dtype=np.int64)
        sizes = np.asarray([r[4] for r in rows], dtype=np.int64).reshape(-1, 2)
        return x, y, [r[0] for r in rows], sizes, [r[5] for r in rows]

    x_train, y_train, train_files, train_sizes, train_formats = stack("train")
    x_val, y_val, val_files, val_sizes, val_formats = stack("val")
    val_indices = None
    if val_files:
        val_indices = list(range(len(y_train), len(y_train) + len(y_val)))
        x_train = np.concatenate([x_train, x_val])
        y_train = np.concatenate([y_train, y_val])
        train_files = train_files + val_files
        train_sizes = np.concatenate([train_sizes, val_sizes])
        train_formats = train_formats + val_formats
    x_test, y_test, test_files, test_sizes, test_formats = stack("test")
    checksums: dict[str, str] = {}
    if (root / CHECKSUM_FILE).is_file():
        checksums = verify_checksums(root)
    return RawDataset(
        source="imagefolder",
        classes=classes,
        x_train=x_train,
        y_train=y_train,
        x_test=x_test,
        y_test=y_test,
        train_files=train_files,
        test_files=test_files,
        unreadable=unreadable,
        checksums=checksums,
        val_indices=val_indices,
        preprocess=spec.to_dict(),
        train_sizes=train_sizes,
        test_sizes=test_sizes,
        train_formats=train_formats,
        test_formats=test_formats,
    )


# --------------------------------------------------------------------------- dispatch


def convert_arrays(x: np.ndarray, image_size: int, channels: int) -> np.ndarray:
    """Resize (Lanczos) and convert channels (luma / replication) of uint8 NHWC images."""
    if x.shape[1] == image_size and x.shape[2] == image_size and x.shape[3] == channels:
        return x
    mode_in = "L" if x.shape[3] == 1 else "RGB"
    mode_out = "L" if channels == 1 else "RGB"
    out = np.empty((len(x), image_size, image_size, channels), dtype=np.uint8)
    for i, img in enumerate(x):
        pil = Image.fromarray(img[..., 0] if mode_in == "L" else img, mode=mode_in)
        if pil.size != (image_size, image_size):
            pil = pil.resize((image_size, image_size), Image.Resampling.LANCZOS)
        arr = np.asarray(pil.convert(mode_out), dtype=np.uint8)
        out[i] = arr[..., None] if mode_out == "L" else arr
    return out


def resolve_path(path: str, layout: Layout) -> Path:
    """A path from params: relative paths are taken from the project root."""
    p = Path(path).expanduser()
    return p if p.is_absolute() else layout.root / p


def resolve_data_path(params: Params, layout: Layout) -> Path:
    """``data.path``, relative paths taken from the project root."""
    return resolve_path(params.data.path, layout)


def load_source(params: Params, layout: Layout) -> RawDataset:
    """Load the source named by ``data.source`` from ``data.path`` at the params' shape."""
    from visionops.data.profile import profile_images, resolve_spec

    path = resolve_data_path(params, layout)
    size, channels = params.data.shape()
    source = params.data.source
    if source == "imagefolder":
        fingerprint = folder_fingerprint(path) if path.is_dir() else None
        listing = list_imagefolder(path)
        profile = profile_images(listing.files, params.serve.max_pixels)
        spec = resolve_spec(params, profile)
        ds = load_imagefolder(
            path,
            spec,
            test_fraction=params.data.test_fraction,
            seed=params.seed,
            max_pixels=params.serve.max_pixels,
            listing=listing,
        )
        ds.profile = profile.to_dict()
        ds.fingerprint = fingerprint
        return ds
    if source == "mnist":
        ds = load_mnist(path)
    elif source == "cifar10":
        ds = load_cifar10_binary(path)
    else:  # pragma: no cover - config.DataSource forbids it
        raise DataError(f"unknown data.source {source!r}")
    if (size, channels) != NATIVE_SHAPE[source]:
        log.info("converting %s to %dx%dx%d", source, size, size, channels)
        ds.x_train = convert_arrays(ds.x_train, size, channels)
        ds.x_test = convert_arrays(ds.x_test, size, channels)
    ds.preprocess = resolve_spec(params, source=source).to_dict()
    return ds


# --------------------------------------------------------------------------- downloads


def download_file(
    url: str,
    dest: Path,
    *,
    sha256: str | None = None,
    md5: str | None = None,
    timeout: float = 60.0,
    max_bytes: int = MAX_DOWNLOAD_BYTES,
) -> Path:
    """Download ``url`` to ``dest`` through a temporary file; verify before moving in place.

    At least one checksum is required. On any failure ``dest`` is left untouched and a
    :class:`DataError` names the URL.
    """
    if sha256 is None and md5 is None:
        raise DataError(f"refusing to download {url} without a checksum to verify it")
    scheme = urllib.parse.urlparse(url).scheme
    if scheme not in ("http", "https", "file"):
        raise DataError(f"{url}: only http(s) and file URLs can be downloaded")
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    tmp = Path(tmp_name)
    h_sha, h_md5 = hashlib.sha256(), hashlib.md5()
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as resp:
            size = 0
            while chunk := resp.read(1 << 20):
                size += len(chunk)
                if size > max_bytes:
                    raise DataError(f"{url}: larger than {max_bytes} bytes; download refused")
                out.write(chunk)
                h_sha.update(chunk)
                h_md5.update(chunk)
        if sha256 is not None and h_sha.hexdigest() != sha256.lower():
            raise DataError(
                f"{url}: sha256 {h_sha.hexdigest()} does not match the expected {sha256}; "
                f"{dest} was not written"
            )
        if md5 is not None and h_md5.hexdigest() != md5.lower():
            raise DataError(
                f"{url}: md5 {h_md5.hexdigest()} does not match the expected {md5}; "
                f"{dest} was not written"
            )
        os.replace(tmp, dest)
    except urllib.error.HTTPError as exc:
        raise DataError(f"download of {url} failed: HTTP {exc.code} {exc.reason}") from None
    except urllib.error.URLError as exc:
        raise DataError(f"download of {url} failed: {exc.reason}") from None
    except (OSError, http.client.HTTPException) as exc:
        raise DataError(f"download of {url} failed: {exc}") from None
    finally:
        tmp.unlink(missing_ok=True)
    log.info("downloaded %s -> %s", url, dest)
    return dest


def _join_url(base: str, name: str) -> str:
    return base.rstrip("/") + "/" + urllib.parse.quote(name)


def download_mnist(
    dest: Path,
    mirror_url: str,
    *,
    sha256: Mapping[str, str] | None = None,
    timeout: float = 60.0,
) -> list[Path]:
    """Fetch the MNIST ``.gz`` files that are missing from ``dest`` or fail their checksum.

    Files come from ``<mirror_url>/<name>``; expected digests from ``sha256`` or else
    ``dest/SHA256SUMS``. Returns the paths written (empty when everything was intact).
    Only ever called explicitly: ingest never downloads.
    """
    dest = Path(dest)
    expected = dict(sha256) if sha256 is not None else read_checksum_file(dest / CHECKSUM_FILE)
    written: list[Path] = []
    for name in MNIST_FILES.values():
        if name not in expected:
            raise DataError(f"no sha256 known for {name} (add it to {dest / CHECKSUM_FILE})")
        target = dest / name
        if target.is_file() and file_digest(target) == expected[name]:
            continue
        written.append(
            download_file(
                _join_url(mirror_url, name), target, sha256=expected[name], timeout=timeout
            )
        )
    return written


def download_cifar10(
    dest: Path,
    mirror_url: str,
    *,
    sha256: str | None = None,
    timeout: float = 600.0,
) -> Path:
    """Fetch ``cifar-10-binary.tar.gz`` into the folder ``dest`` and verify it.

    ``mirror_url`` is the archive's URL or a folder URL holding it. The expected digest is
    ``sha256``, else the archive's entry in ``dest/SHA256SUMS``, else the MD5 published on
    the CIFAR-10 page. Only ever called explicitly: ingest never downloads.
    """
    dest = Path(dest)
    url = mirror_url if mirror_url.endswith(".tar.gz") else _join_url(mirror_url, CIFAR10_ARCHIVE)
    sums_path = dest / CHECKSUM_FILE
    if sha256 is None and sums_path.is_file():
        sha256 = read_checksum_file(sums_path).get(CIFAR10_ARCHIVE)
    md5 = None if sha256 is not None else CIFAR10_BINARY_MD5
    return download_file(url, dest / CIFAR10_ARCHIVE, sha256=sha256, md5=md5, timeout=timeout)
