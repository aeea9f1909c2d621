"""The one preprocessing shared by training and serving: decode, convert, centre, normalise."""

from __future__ import annotations

import io
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest
from PIL import Image, ImageFile

from visionops.data.transforms import (
    PreprocessSpec,
    UnreadableImageError,
    array_from_unit_floats,
    decode_image,
    image_to_array,
    normalize,
)
from visionops.errors import DataError

SPEC = PreprocessSpec(image_size=28, channels=1, invert="auto", center=True, digit_box=20)


def png_bytes(img: Image.Image, **save_args: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", **save_args)
    return buf.getvalue()


def ink_on_paper(h: int = 60, w: int = 40) -> np.ndarray:
    """A dark 'L' glyph on white paper: lopsided, so its centre of mass is off its box."""
    a = np.full((h, w), 255, dtype=np.uint8)
    a[10:50, 8:14] = 0  # vertical stroke
    a[44:50, 8:32] = 0  # foot
    return a


def centre_of_mass(a: np.ndarray) -> tuple[float, float]:
    a = a.astype(np.float64)
    ys, xs = np.indices(a.shape)
    return float((ys * a).sum() / a.sum()), float((xs * a).sum() / a.sum())


def test_dark_on_light_is_inverted_so_ink_is_bright() -> None:
    img = Image.fromarray(ink_on_paper(), mode="L")
    out = image_to_array(img, SPEC)
    assert out.shape == (28, 28, 1) and out.dtype == np.uint8
    border = np.concatenate([out[0, :, 0], out[-1, :, 0], out[:, 0, 0], out[:, -1, 0]])
    assert border.max() == 0
    assert out.max() == 255

    never = image_to_array(img, PreprocessSpec(invert="never", center=False))
    assert never[0, 0, 0] == 255  # paper stays white without inversion
    always = image_to_array(img, PreprocessSpec(invert="always", center=False))
    assert always[0, 0, 0] == 0


def test_light_on_dark_is_not_inverted_by_auto() -> None:
    a = 255 - ink_on_paper()
    out = image_to_array(Image.fromarray(a, mode="L"), SPEC)
    assert out[0, 0, 0] == 0 and out.max() == 255


def test_centring_fits_digit_box_and_puts_centre_of_mass_at_centre() -> None:
    big = np.full((120, 90), 255, dtype=np.uint8)
    big[5:65, 3:63] = ink_on_paper(60, 60)  # glyph in a corner of a large page
    out = image_to_array(Image.fromarray(big, mode="L"), SPEC)[:, :, 0]
    rows = np.flatnonzero(out.any(axis=1))
    cols = np.flatnonzero(out.any(axis=0))
    # Ink box 40 tall x 24 wide is scaled to 20 x 12 (aspect kept).
    assert rows[-1] - rows[0] + 1 == 20
    assert cols[-1] - cols[0] + 1 == 12
    cy, cx = centre_of_mass(out)
    assert abs(cy - 14.0) <= 0.5 and abs(cx - 14.0) <= 0.5
    # The glyph's mass is lower-left of its box centre, so an integer shift was applied:
    # the box no longer sits in the middle of the canvas.
    assert (rows[0], cols[0]) != ((28 - 20) // 2, (28 - 12) // 2)


def test_centring_is_identity_like_on_a_centred_mnist_style_rectangle() -> None:
    a = np.zeros((28, 28), dtype=np.uint8)
    a[4:24, 9:19] = 255  # a 20x10 bar, already centred
    out = image_to_array(Image.fromarray(a, mode="L"), SPEC)[:, :, 0]
    np.testing.assert_array_equal(out, a)


def test_blank_image_gives_a_blank_canvas() -> None:
    out = image_to_array(Image.new("L", (50, 50), 255), SPEC)
    assert out.shape == (28, 28, 1) and out.max() == 0


def test_rgba_is_composited_on_white_and_palette_matches_grayscale() -> None:
    gray = ink_on_paper()
    expected = image_to_array(Image.fromarray(gray, mode="L"), SPEC)

    rgba = np.zeros((*gray.shape, 4), dtype=np.uint8)  # fully transparent ...
    rgba[gray == 0] = (0, 0, 0, 255)  # ... except opaque black ink
    got_rgba = image_to_array(Image.fromarray(rgba, mode="RGBA"), SPEC)
    np.testing.assert_array_equal(got_rgba, expected)

    pal = Image.fromarray(gray, mode="L").convert("P")
    assert pal.mode == "P"
    np.testing.assert_array_equal(image_to_array(pal, SPEC), expected)

    # Palette with a transparent background entry: also paper-white after compositing.
    p = Image.new("P", (40, 60), 0)
    p.putpalette([0, 255, 0] + [0, 0, 0] * 255)  # index 0 green (transparent), 1 black
    p.paste(1, (8, 10, 14, 50))
    p.paste(1, (8, 44, 32, 50))
    p.info["transparency"] = 0
    decoded = decode_image(png_bytes(p, transparency=0), max_pixels=10_000)
    np.testing.assert_array_equal(image_to_array(decoded, SPEC), expected)


def test_rgb_and_16bit_grayscale_convert_to_the_same_digit() -> None:
    gray = ink_on_paper()
    expected = image_to_array(Image.fromarray(gray, mode="L"), SPEC)
    rgb = Image.fromarray(np.stack([gray] * 3, axis=-1), mode="RGB")
    np.testing.assert_array_equal(image_to_array(rgb, SPEC), expected)
    sixteen = Image.fromarray(gray.astype(np.uint16) * 257)
    assert sixteen.mode.startswith("I")
    np.testing.assert_array_equal(image_to_array(sixteen, SPEC), expected)


def test_three_channel_spec_resizes_and_keeps_colours() -> None:
    a = np.zeros((64, 48, 3), dtype=np.uint8)
    a[..., 0] = 200  # red everywhere, a light image: auto must NOT invert colours
    spec = PreprocessSpec(image_size=32, channels=3, invert="auto", center=True)
    out = image_to_array(Image.fromarray(a, mode="RGB"), spec)
    assert out.shape == (32, 32, 3)
    assert (out[..., 0] == 200).all() and (out[..., 1:] == 0).all()
    gray = image_to_array(Image.new("L", (10, 10), 77), spec)
    assert gray.shape == (32, 32, 3) and (gray == 77).all()


def test_exif_orientation_is_applied() -> None:
    # Stored 40 wide x 20 tall with a white block at the stored top-left corner.
    stored = np.zeros((20, 40, 3), dtype=np.uint8)
    stored[:10, :10] = 255
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    buf = io.BytesIO()
    Image.fromarray(stored).save(buf, format="JPEG", exif=exif.tobytes(), quality=95)
    img = decode_image(buf.getvalue(), max_pixels=10_000)
    assert img.size == (20, 40)  # upright: 20 wide, 40 tall
    a = np.asarray(img.convert("L"), dtype=np.int32)
    # Rotating 90° clockwise moves the stored top-left corner to the top-right.
    assert a[:10, 10:].mean() > 200 and a[:10, :10].mean() < 50


def _png_header_only(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    # A tiny IDAT: decoding it would fail as truncated, so only the header check can pass.
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 8))


def test_pixel_limit_is_checked_before_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_decoding(self: ImageFile.ImageFile) -> None:
        raise AssertionError("pixel data was decoded before the size check")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    with pytest.raises(UnreadableImageError, match=r"3000x2000 = 6000000 pixels exceeds"):
        decode_image(_png_header_only(3000, 2000), max_pixels=1_000_000)


def test_decompression_bomb_becomes_a_data_error() -> None:
    # Beyond Pillow's own limit: Pillow refuses while opening; we turn that into DataError.
    with pytest.raises(DataError, match="image: "):
        decode_image(_png_header_only(50_000, 50_000), max_pixels=10**12)


def test_unreadable_bytes_name_the_reason(tmp_path: object) -> None:
    with pytest.raises(UnreadableImageError) as err:
        decode_image(b"definitely not an image", max_pixels=1000)
    assert err.value.reason.startswith("cannot identify image file")
    good = png_bytes(Image.fromarray(ink_on_paper(), mode="L"))
    with pytest.raises(UnreadableImageError, match=r"corrupt image data|malformed"):
        decode_image(good[: len(good) // 2], max_pixels=10_000)
    with pytest.raises(UnreadableImageError, match="empty file"):
        decode_image(b"", max_pixels=10)


def test_decode_from_path_names_the_file(tmp_path: pytest.TempPathFactory) -> None:
    from pathlib import Path

    p = Path(str(tmp_path)) / "bad.png"
    p.write_bytes(b"\x89PNG garbage")
    with pytest.raises(UnreadableImageError, match=r"bad\.png: cannot identify"):
        decode_image(p, max_pixels=10_000)


def test_normalize_matches_hand_computation() -> None:
    x = np.array([[[[0, 10, 255]], [[128, 1, 2]]]], dtype=np.uint8)  # (1, 2, 1, 3) NHWC
    spec = PreprocessSpec(image_size=2, channels=3, mean=(0.1, 0.2, 0.3), std=(0.5, 0.25, 2.0))
    x = np.repeat(x, 2, axis=2)  # (1, 2, 2, 3)
    out = normalize(x, spec)
    assert out.shape == (1, 3, 2, 2) and out.dtype == np.float32
    # Pixel (row 1, col 0), channel 0 = 128: (128/255 - 0.1) / 0.5
    assert out[0, 0, 1, 0] == pytest.approx((128 / 255 - 0.1) / 0.5, abs=1e-6)
    # Pixel (row 0, col 1), channel 2 = 255: (1 - 0.3) / 2
    assert out[0, 2, 0, 1] == pytest.approx(0.35, abs=1e-6)
    hand = (x.astype(np.float64) / 255 - [0.1, 0.2, 0.3]) / [0.5, 0.25, 2.0]
    np.testing.assert_allclose(out, hand.transpose(0, 3, 1, 2), atol=1e-6)
    # One image without the batch axis gets N = 1.
    assert normalize(x[0], spec).shape == (1, 3, 2, 2)
    with pytest.raises(DataError, match="uint8"):
        normalize(x.astype(np.float32), spec)
    with pytest.raises(DataError, match=r"\(N, 2, 2, 3\)"):
        normalize(np.zeros((1, 3, 3, 3), np.uint8), spec)


def test_array_from_unit_floats() -> None:
    a = np.array([[0.0, 0.5], [1.0, 0.25]])
    out = array_from_unit_floats(a)
    assert out.shape == (2, 2, 1) and out.dtype == np.uint8
    np.testing.assert_array_equal(out[:, :, 0], [[0, 128], [255, 64]])
    with pytest.raises(DataError, match=r"\[0, 1\]"):
        array_from_unit_floats(np.array([[0.0, 1.5]]))
    with pytest.raises(DataError, match="NaN"):
        array_from_unit_floats(np.array([[np.nan, 0.0]]))
    with pytest.raises(DataError, match="shape"):
        array_from_unit_floats(np.zeros(5))


def test_spec_round_trip_and_validation() -> None:
    spec = PreprocessSpec(
        image_size=32, channels=3, mean=(0.4, 0.5, 0.6), std=(0.2, 0.2, 0.3), invert="never"
    )
    d = spec.to_dict()
    assert d["mean"] == [0.4, 0.5, 0.6] and d["invert"] == "never"
    assert PreprocessSpec.from_dict(d) == spec
    meta = {
        "image_size": 28,
        "channels": 1,
        "mean": [0.1307],
        "std": [0.3081],
        "preprocess": {"invert": "auto", "center": True, "digit_box": 20},
    }
    assert PreprocessSpec.from_meta(meta).std == (0.3081,)
    with pytest.raises(DataError, match="channels must be 1 or 3"):
        PreprocessSpec(channels=2)
    with pytest.raises(DataError, match="std must be positive"):
        PreprocessSpec(std=(0.0,))
    with pytest.raises(DataError, match="missing"):
        PreprocessSpec.from_dict({"image_size": 28})


def test_transforms_do_not_import_torch() -> None:
    code = (
        "import sys, visionops.data.transforms as t; "
        "assert 'torch' not in sys.modules, 'torch imported'; print('ok')"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"
