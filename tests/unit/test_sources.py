"""Data sources on generated files: MNIST IDX, binary CIFAR-10, image folders, downloads."""

from __future__ import annotations

import functools
import gzip
import hashlib
import http.server
import io
import struct
import tarfile
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from visionops.config import Params
from visionops.data.sources import (
    CIFAR10_ARCHIVE,
    MNIST_FILES,
    download_cifar10,
    download_mnist,
    load_cifar10_binary,
    load_imagefolder,
    load_mnist,
    load_mnist_idx,
    load_source,
)
from visionops.data.transforms import PreprocessSpec
from visionops.errors import DataError
from visionops.layout import Layout

# --------------------------------------------------------------------------- helpers


def idx_bytes(arr: np.ndarray, type_code: int = 0x08) -> bytes:
    dtype = {0x08: ">u1", 0x0C: ">i4", 0x0D: ">f4"}[type_code]
    header = bytes([0, 0, type_code, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    return header + arr.astype(dtype).tobytes()


def write_sums(folder: Path, names: list[str], algo: str = "sha256", fname: str = "SHA256SUMS"):
    lines = [f"{hashlib.new(algo, (folder / n).read_bytes()).hexdigest()}  {n}" for n in names]
    (folder / fname).write_text("\n".join(lines) + "\n")


def make_mnist(folder: Path, n_train: int = 30, n_test: int = 10, seed: int = 0) -> dict:
    """Four gzipped IDX files with SHA256SUMS and MD5SUMS.uncompressed, like data/raw/mnist."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    data = {
        "train_images": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train_labels": (np.arange(n_train) % 10).astype(np.uint8),
        "test_images": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "test_labels": (np.arange(n_test) % 10).astype(np.uint8),
    }
    md5_lines = []
    for key, name in MNIST_FILES.items():
        raw = idx_bytes(data[key])
        (folder / name).write_bytes(gzip.compress(raw, mtime=0))
        md5_lines.append(f"{hashlib.md5(raw).hexdigest()}  {name.removesuffix('.gz')}")
    write_sums(folder, list(MNIST_FILES.values()))
    (folder / "MD5SUMS.uncompressed").write_text("\n".join(md5_lines) + "\n")
    return data


def cifar_batch(labels: list[int], rng: np.random.Generator) -> tuple[bytes, np.ndarray]:
    chw = rng.integers(0, 256, (len(labels), 3, 32, 32), dtype=np.uint8)
    recs = np.concatenate([np.asarray(labels, np.uint8)[:, None], chw.reshape(len(labels), -1)], 1)
    return recs.tobytes(), chw


CIFAR_CLASSES = ["airplane", "automobile", "bird", "cat", "deer"]


def make_cifar(
    path: Path, members: dict[str, bytes] | None = None, prefix: str = "cifar-10-batches-bin/"
) -> dict[str, np.ndarray]:
    """A small archive in the binary CIFAR-10 format (3 records per train batch, 4 test)."""
    rng = np.random.default_rng(1)
    chws: dict[str, np.ndarray] = {}
    if members is None:
        members = {}
        for i in range(1, 6):
            members[f"data_batch_{i}.bin"], chws[f"data_batch_{i}.bin"] = cifar_batch(
                [i % 5, (i + 1) % 5, (i + 2) % 5], rng
            )
        members["test_batch.bin"], chws["test_batch.bin"] = cifar_batch([0, 1, 2, 4], rng)
        members["batches.meta.txt"] = ("\n".join(CIFAR_CLASSES) + "\n\n").encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as tar:
        for name, payload in members.items():
            info = tarfile.TarInfo(prefix + name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return chws


def save_image(path: Path, img: Image.Image, fmt: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format=fmt)


def digit(size: tuple[int, int], mode: str = "L", dark_on_light: bool = True) -> Image.Image:
    w, h = size
    a = np.zeros((h, w), dtype=np.uint8)
    a[h // 4 : 3 * h // 4, w // 3 : w // 2] = 255
    if dark_on_light:
        a = 255 - a
    return Image.fromarray(a, mode="L").convert(mode)


def make_imagefolder(root: Path) -> None:
    """Two classes, mixed formats, sizes and modes, one corrupt file, one non-image."""
    save_image(root / "cat" / "a.png", digit((40, 30)), "PNG")
    save_image(root / "cat" / "b.jpg", digit((64, 64), "RGB"), "JPEG")
    save_image(root / "cat" / "c.bmp", digit((28, 28), dark_on_light=False), "BMP")
    save_image(root / "cat" / "sub" / "d.png", digit((100, 50), "RGBA"), "PNG")
    save_image(root / "cat" / "e.png", digit((33, 47), "P"), "PNG")
    save_image(root / "dog" / "a.png", digit((20, 60)), "PNG")
    save_image(root / "dog" / "b.png", digit((80, 80), "LA"), "PNG")
    save_image(root / "dog" / "c.jpeg", digit((31, 29), "RGB"), "JPEG")
    save_image(root / "dog" / "d.bmp", digit((12, 16), "RGB"), "BMP")
    (root / "dog" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    (root / "dog" / "garbage.jpg").write_bytes(b"hello")
    (root / "dog" / "notes.txt").write_text("not an image")


# --------------------------------------------------------------------------- MNIST


def test_load_mnist_idx_parses_gzip_and_raw(tmp_path: Path) -> None:
    arr = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    (tmp_path / "a.gz").write_bytes(gzip.compress(idx_bytes(arr)))
    (tmp_path / "a.idx").write_bytes(idx_bytes(arr))
    np.testing.assert_array_equal(load_mnist_idx(tmp_path / "a.gz"), arr)
    np.testing.assert_array_equal(load_mnist_idx(tmp_path / "a.idx"), arr)
    ints = np.array([-2, 70000, 3], dtype=np.int32)
    (tmp_path / "i.idx").write_bytes(idx_bytes(ints, 0x0C))
    out = load_mnist_idx(tmp_path / "i.idx")
    assert out.dtype == np.int32 and out.tolist() == [-2, 70000, 3]


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (b"\x00\x01\x08\x01" + b"\x00" * 8, "not an IDX file"),
        (b"\x00\x00\x07\x01\x00\x00\x00\x01\x05", "unknown IDX data type 0x07"),
        (b"\x00\x00\x08\x03\x00\x00", "truncated IDX header"),
        (bytes([0, 0, 8, 2]) + struct.pack(">2I", 3, 3) + b"\x00" * 8, r"shape \(3, 3\)"),
    ],
)
def test_malformed_idx_raises_data_error_naming_the_file(
    tmp_path: Path, payload: bytes, message: str
) -> None:
    p = tmp_path / "bad-idx1-ubyte.gz"
    p.write_bytes(gzip.compress(payload))
    with pytest.raises(DataError, match=message) as err:
        load_mnist_idx(p)
    assert "bad-idx1-ubyte.gz" in str(err.value)


def test_corrupt_gzip_is_a_data_error(tmp_path: Path) -> None:
    p = tmp_path / "x.gz"
    p.write_bytes(gzip.compress(b"\x00" * 1000)[:20])
    with pytest.raises(DataError, match=r"x\.gz: cannot decompress"):
        load_mnist_idx(p)


def test_load_mnist_on_generated_files(tmp_path: Path) -> None:
    data = make_mnist(tmp_path / "mnist")
    ds = load_mnist(tmp_path / "mnist")
    assert ds.source == "mnist" and ds.classes == [str(i) for i in range(10)]
    assert ds.x_train.shape == (30, 28, 28, 1) and ds.x_train.dtype == np.uint8
    assert ds.y_train.dtype == np.int64 and ds.x_test.shape == (10, 28, 28, 1)
    np.testing.assert_array_equal(ds.x_train[..., 0], data["train_images"])
    np.testing.assert_array_equal(ds.y_test, data["test_labels"])
    name = MNIST_FILES["train_images"]
    expected = hashlib.sha256((tmp_path / "mnist" / name).read_bytes()).hexdigest()
    assert ds.checksums[name] == expected and len(ds.checksums) == 4
    assert ds.train_files is None


def test_altered_mnist_file_is_named(tmp_path: Path) -> None:
    folder = tmp_path / "mnist"
    make_mnist(folder)
    target = folder / MNIST_FILES["test_labels"]
    target.write_bytes(target.read_bytes() + b"\0")
    with pytest.raises(DataError, match=r"t10k-labels-idx1-ubyte\.gz has been altered"):
        load_mnist(folder)


def test_missing_mnist_file_is_named(tmp_path: Path) -> None:
    folder = tmp_path / "mnist"
    make_mnist(folder)
    (folder / MNIST_FILES["train_images"]).unlink()
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte\.gz is missing") as err:
        load_mnist(folder)
    assert "download_mnist" in str(err.value)


def test_mnist_without_checksums_or_folder_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "mnist"
    make_mnist(folder)
    (folder / "SHA256SUMS").unlink()
    with pytest.raises(DataError, match=r"checksum file not found: .*SHA256SUMS"):
        load_mnist(folder)
    with pytest.raises(DataError, match=r"MNIST folder not found: .*nowhere"):
        load_mnist(tmp_path / "nowhere")
    with pytest.raises(DataError, match=r"train-labels-idx1-ubyte\.gz is a file; data\.path"):
        load_mnist(folder / MNIST_FILES["train_labels"])


def test_uncompressed_md5_mismatch_is_detected(tmp_path: Path) -> None:
    folder = tmp_path / "mnist"
    make_mnist(folder)
    md5 = folder / "MD5SUMS.uncompressed"
    lines = md5.read_text().splitlines()
    lines[0] = "0" * 32 + "  " + lines[0].split()[1]
    md5.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte\.gz: decompressed content"):
        load_mnist(folder)


def test_mnist_with_mismatched_counts_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "mnist"
    make_mnist(folder)
    labels = np.zeros(7, dtype=np.uint8)
    (folder / MNIST_FILES["train_labels"]).write_bytes(gzip.compress(idx_bytes(labels)))
    (folder / "MD5SUMS.uncompressed").unlink()
    write_sums(folder, list(MNIST_FILES.values()))
    with pytest.raises(DataError, match=r"holds 30 images but .*train-labels.* holds 7 labels"):
        load_mnist(folder)


# --------------------------------------------------------------------------- CIFAR-10


def test_load_cifar10_binary_archive(tmp_path: Path) -> None:
    archive = tmp_path / CIFAR10_ARCHIVE
    chws = make_cifar(archive)
    for target in (archive, tmp_path):  # the archive itself or its folder
        ds = load_cifar10_binary(target)
        assert ds.classes == CIFAR_CLASSES
        assert ds.x_train.shape == (15, 32, 32, 3) and ds.x_test.shape == (4, 32, 32, 3)
        assert ds.y_train.tolist()[:6] == [1, 2, 3, 2, 3, 4]
        assert ds.y_test.tolist() == [0, 1, 2, 4]
        # CHW on disk becomes HWC: pixel (y=5, x=7) of channel 2 of the first test image.
        assert ds.x_test[0, 5, 7, 2] == chws["test_batch.bin"][0, 2, 5, 7]
        np.testing.assert_array_equal(
            ds.x_train[3:6], chws["data_batch_2.bin"].transpose(0, 2, 3, 1)
        )
        assert ds.checksums[CIFAR10_ARCHIVE] == hashlib.sha256(archive.read_bytes()).hexdigest()


def test_cifar_missing_member_and_unsafe_members(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    members = {f"data_batch_{i}.bin": cifar_batch([0], rng)[0] for i in range(1, 6)}
    members["batches.meta.txt"] = b"a\nb\n"
    archive = tmp_path / "a" / CIFAR10_ARCHIVE
    make_cifar(archive, members)
    with pytest.raises(DataError, match=r"missing member\(s\) test_batch\.bin"):
        load_cifar10_binary(archive)

    # A member that climbs out of the archive is never used (nor extracted).
    members["test_batch.bin"] = cifar_batch([1], rng)[0]
    archive2 = tmp_path / "b" / CIFAR10_ARCHIVE
    make_cifar(archive2, members, prefix="../../")
    with pytest.raises(DataError, match="missing member"):
        load_cifar10_binary(archive2)
    assert not (tmp_path / "test_batch.bin").exists()


def test_cifar_link_member_is_ignored(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    archive = tmp_path / CIFAR10_ARCHIVE
    with tarfile.open(archive, "w:gz") as tar:
        for i in range(1, 6):
            payload = cifar_batch([0], rng)[0]
            info = tarfile.TarInfo(f"data_batch_{i}.bin")
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
        link = tarfile.TarInfo("test_batch.bin")
        link.type = tarfile.SYMTYPE
        link.linkname = "/etc/passwd"
        tar.addfile(link)
        meta = b"a\nb\n"
        info = tarfile.TarInfo("batches.meta.txt")
        info.size = len(meta)
        tar.addfile(info, io.BytesIO(meta))
    with pytest.raises(DataError, match=r"missing member\(s\) test_batch\.bin"):
        load_cifar10_binary(archive)


def test_cifar_bad_inputs_are_named(tmp_path: Path) -> None:
    corrupt = tmp_path / "c" / CIFAR10_ARCHIVE
    corrupt.parent.mkdir()
    corrupt.write_bytes(b"\x1f\x8b not a real gzip stream")
    with pytest.raises(DataError, match=r"cifar-10-binary\.tar\.gz: not a readable tar"):
        load_cifar10_binary(corrupt)

    pickled = tmp_path / "cifar-10-python.tar.gz"
    pickled.write_bytes(b"irrelevant")
    with pytest.raises(DataError, match="never unpickles"):
        load_cifar10_binary(pickled)

    with pytest.raises(DataError, match=r"cifar-10-binary\.tar\.gz not found"):
        load_cifar10_binary(tmp_path)

    rng = np.random.default_rng(0)
    members = {f"data_batch_{i}.bin": cifar_batch([0], rng)[0] for i in range(1, 6)}
    members["test_batch.bin"] = cifar_batch([0], rng)[0][:-5]
    members["batches.meta.txt"] = b"a\nb\n"
    short = tmp_path / "s" / CIFAR10_ARCHIVE
    make_cifar(short, members)
    with pytest.raises(DataError, match=r"test_batch\.bin: 3068 bytes is not a whole number"):
        load_cifar10_binary(short)


def test_cifar_checksum_file_is_enforced(tmp_path: Path) -> None:
    archive = tmp_path / CIFAR10_ARCHIVE
    make_cifar(archive)
    (tmp_path / "SHA256SUMS").write_text(f"{'0' * 64}  {CIFAR10_ARCHIVE}\n")
    with pytest.raises(DataError, match=r"cifar-10-binary\.tar\.gz has been altered"):
        load_cifar10_binary(tmp_path)
    write_sums(tmp_path, [CIFAR10_ARCHIVE])
    assert load_cifar10_binary(tmp_path).x_train.shape[0] == 15


# --------------------------------------------------------------------------- image folder

SPEC = PreprocessSpec(image_size=28, channels=1)


def test_imagefolder_reads_formats_and_records_unreadable(tmp_path: Path) -> None:
    make_imagefolder(tmp_path / "imgs")
    ds = load_imagefolder(tmp_path / "imgs", SPEC, test_fraction=0.25, seed=3, max_pixels=10**6)
    assert ds.classes == ["cat", "dog"]
    assert [u["file"] for u in ds.unreadable] == ["dog/broken.png", "dog/garbage.jpg"]
    assert ds.unreadable[0]["reason"].startswith("malformed image header")
    assert ds.unreadable[1]["reason"].startswith("cannot identify image file")
    # 5 readable cats -> round(1.25) = 1 test; 4 readable dogs -> 1 test.
    assert len(ds.x_train) == 7 and len(ds.x_test) == 2
    assert ds.x_train.shape[1:] == (28, 28, 1) and ds.x_train.dtype == np.uint8
    assert ds.train_files is not None and ds.test_files is not None
    assert sorted(ds.train_files + ds.test_files) == [
        "cat/a.png", "cat/b.jpg", "cat/c.bmp", "cat/e.png", "cat/sub/d.png",
        "dog/a.png", "dog/b.png", "dog/c.jpeg", "dog/d.bmp",
    ]  # fmt: skip
    labels = dict(zip(ds.train_files + ds.test_files, [*ds.y_train, *ds.y_test], strict=True))
    assert labels["cat/sub/d.png"] == 0 and labels["dog/d.bmp"] == 1
    # Every digit came out ink-bright on a dark background, whatever the input polarity.
    assert all(img[0, 0, 0] == 0 and img.max() == 255 for img in ds.x_train)


def test_imagefolder_split_is_deterministic_from_seed(tmp_path: Path) -> None:
    root = tmp_path / "imgs"
    for cls in ("a", "b"):
        for i in range(20):
            save_image(root / cls / f"{i:02d}.png", digit((20 + i, 30)), "PNG")
    kw = {"test_fraction": 0.2, "max_pixels": 10**6}
    one = load_imagefolder(root, SPEC, seed=7, **kw)  # type: ignore[arg-type]
    two = load_imagefolder(root, SPEC, seed=7, **kw)  # type: ignore[arg-type]
    other = load_imagefolder(root, SPEC, seed=8, **kw)  # type: ignore[arg-type]
    assert one.test_files == two.test_files
    np.testing.assert_array_equal(one.x_train, two.x_train)
    assert one.test_files != other.test_files
    assert one.test_files is not None and len(one.test_files) == 8
    assert sum(f.startswith("a/") for f in one.test_files) == 4  # stratified per class


def test_imagefolder_with_train_and_test_subfolders(tmp_path: Path) -> None:
    root = tmp_path / "imgs"
    for split, n in (("train", 3), ("test", 2)):
        for cls in ("zeta", "alpha"):
            for i in range(n):
                save_image(root / split / cls / f"{i}.png", digit((30, 30)), "PNG")
    ds = load_imagefolder(root, SPEC, test_fraction=0.5, seed=0, max_pixels=10**6)
    assert ds.classes == ["alpha", "zeta"]
    assert len(ds.y_train) == 6 and len(ds.y_test) == 4
    assert ds.test_files is not None and ds.test_files[0] == "test/alpha/0.png"
    assert ds.y_test.tolist() == [0, 0, 1, 1]

    save_image(root / "test" / "omega" / "0.png", digit((30, 30)), "PNG")
    with pytest.raises(DataError, match=r"\['omega'\] have no match"):
        load_imagefolder(root, SPEC, test_fraction=0.5, seed=0, max_pixels=10**6)


def test_imagefolder_bad_layouts(tmp_path: Path) -> None:
    kw = {"test_fraction": 0.2, "seed": 0, "max_pixels": 10**6}
    with pytest.raises(DataError, match=r"image folder not found: .*missing"):
        load_imagefolder(tmp_path / "missing", SPEC, **kw)  # type: ignore[arg-type]
    save_image(tmp_path / "one" / "only" / "a.png", digit((10, 10)), "PNG")
    with pytest.raises(DataError, match=r"found 1 class folder\(s\) \['only'\]"):
        load_imagefolder(tmp_path / "one", SPEC, **kw)  # type: ignore[arg-type]
    (tmp_path / "empty" / "a").mkdir(parents=True)
    (tmp_path / "empty" / "b").mkdir()
    with pytest.raises(DataError, match=r"no \.png/\.jpg/\.jpeg/\.bmp/\.webp/\.gif files"):
        load_imagefolder(tmp_path / "empty", SPEC, **kw)  # type: ignore[arg-type]
    (tmp_path / "half" / "train" / "a").mkdir(parents=True)
    with pytest.raises(DataError, match="found train/ without its partner"):
        load_imagefolder(tmp_path / "half", SPEC, **kw)  # type: ignore[arg-type]


def test_imagefolder_pixel_limit_marks_file_unreadable(tmp_path: Path) -> None:
    root = tmp_path / "imgs"
    save_image(root / "a" / "big.png", digit((300, 300)), "PNG")
    save_image(root / "a" / "ok.png", digit((20, 20)), "PNG")
    save_image(root / "b" / "ok.png", digit((20, 20)), "PNG")
    ds = load_imagefolder(root, SPEC, test_fraction=0.2, seed=0, max_pixels=50_000)
    assert [u["file"] for u in ds.unreadable] == ["a/big.png"]
    assert "90000 pixels exceeds the limit of 50000" in ds.unreadable[0]["reason"]


# --------------------------------------------------------------------------- dispatch


def test_load_source_resolves_relative_path_and_converts_shape(tmp_path: Path) -> None:
    make_mnist(tmp_path / "data" / "raw" / "mnist", n_train=4, n_test=2)
    params = Params.model_validate({"data": {"image_size": 14, "channels": 3}})
    ds = load_source(params, Layout(tmp_path))
    assert ds.x_train.shape == (4, 14, 14, 3) and ds.x_test.shape == (2, 14, 14, 3)
    # Grey replicated into three equal channels.
    np.testing.assert_array_equal(ds.x_train[..., 0], ds.x_train[..., 2])

    missing = Params.model_validate({"data": {"source": "cifar10", "path": "nope.tar.gz"}})
    with pytest.raises(DataError, match=r"CIFAR-10 archive not found: .*nope\.tar\.gz"):
        load_source(missing, Layout(tmp_path))


# --------------------------------------------------------------------------- downloads


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def local_mirror(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """An HTTP server on 127.0.0.1 serving a folder (no internet involved)."""
    root = tmp_path / "mirror"
    root.mkdir()
    handler = functools.partial(_QuietHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/mnist", root
    finally:
        server.shutdown()
        server.server_close()


def test_download_mnist_from_local_http_mirror(
    tmp_path: Path, local_mirror: tuple[str, Path]
) -> None:
    url, root = local_mirror
    make_mnist(root / "mnist")
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "SHA256SUMS").write_bytes((root / "mnist" / "SHA256SUMS").read_bytes())
    written = download_mnist(dest, url)
    assert sorted(p.name for p in written) == sorted(MNIST_FILES.values())
    assert load_mnist(dest).x_train.shape == (30, 28, 28, 1)
    assert download_mnist(dest, url) == []  # everything intact: nothing fetched

    # An altered local file is replaced; an altered mirror file is refused.
    (dest / MNIST_FILES["test_labels"]).write_bytes(b"junk")
    assert [p.name for p in download_mnist(dest, url)] == [MNIST_FILES["test_labels"]]
    (dest / MNIST_FILES["test_labels"]).unlink()
    (root / "mnist" / MNIST_FILES["test_labels"]).write_bytes(b"tampered")
    with pytest.raises(DataError, match=r"t10k-labels-idx1-ubyte\.gz: sha256 .* does not match"):
        download_mnist(dest, url)
    assert not (dest / MNIST_FILES["test_labels"]).exists()
    assert not [p for p in dest.iterdir() if p.name.endswith(".part")]

    with pytest.raises(DataError, match="HTTP 404"):
        download_mnist(dest, url + "/nowhere")


def test_download_cifar10_from_file_url(tmp_path: Path) -> None:
    src = tmp_path / "src" / CIFAR10_ARCHIVE
    make_cifar(src)
    digest = hashlib.sha256(src.read_bytes()).hexdigest()
    dest = tmp_path / "dest"
    path = download_cifar10(dest, src.parent.as_uri(), sha256=digest)
    assert path == dest / CIFAR10_ARCHIVE and path.read_bytes() == src.read_bytes()
    assert load_cifar10_binary(path).x_test.shape == (4, 32, 32, 3)

    # Without a known sha256 the published MD5 is used, which this small archive fails.
    other = tmp_path / "other"
    with pytest.raises(DataError, match=r"md5 .* does not match the expected c32a1d4a"):
        download_cifar10(other, src.as_uri())
    assert not (other / CIFAR10_ARCHIVE).exists()
