"""Preprocessing for photos and drawings: each way real uploads go wrong, on generated images.

Every test draws the input it needs (Pillow), runs the shared preprocessing
(``image_to_array``) and asserts properties of what the model would see: the strongest
ink, the stroke width in pixels (:func:`visionops.data.ink.stroke_width`), the size of
the digit's box and the centre of mass.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFilter

from visionops.data.ink import (
    MNIST_STROKE_WIDTH,
    is_dark_on_light,
    otsu_threshold,
    stroke_width,
)
from visionops.data.transforms import PreprocessSpec, decode_image, image_to_array, normalize

SPEC = PreprocessSpec(image_size=28, channels=1, invert="auto", center=True, digit_box=20)
LOW, _, HIGH = MNIST_STROKE_WIDTH

# A "7" with a crossbar and a "4": polylines in a unit square (x, y), y down.
SEVEN = [[(0.1, 0.05), (0.9, 0.05), (0.35, 0.95)], [(0.3, 0.5), (0.75, 0.5)]]
FOUR = [[(0.65, 0.95), (0.65, 0.05), (0.05, 0.65), (0.95, 0.65)]]


def draw_digit(
    canvas: Image.Image,
    strokes: list[list[tuple[float, float]]],
    box: tuple[int, int, int, int],
    width: int,
    fill: int | tuple[int, ...],
) -> None:
    """Draw polylines scaled into ``box`` = (left, top, right, bottom) of ``canvas``."""
    left, top, right, bottom = box
    draw = ImageDraw.Draw(canvas)
    for line in strokes:
        pts = [(left + x * (right - left), top + y * (bottom - top)) for x, y in line]
        draw.line(pts, fill=fill, width=width, joint="curve")


def model_input(img: Image.Image) -> np.ndarray:
    """What the model sees for ``img`` as an uploaded PNG: float64 (28, 28) in 0..255."""
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    out = image_to_array(decode_image(buf.getvalue(), max_pixels=10**8), SPEC)
    assert out.shape == (28, 28, 1) and out.dtype == np.uint8
    return out[:, :, 0].astype(np.float64)


def box_size(a: np.ndarray, level: float = 0.1 * 255) -> tuple[int, int]:
    rows = np.flatnonzero((a > level).any(axis=1))
    cols = np.flatnonzero((a > level).any(axis=0))
    return int(rows[-1] - rows[0] + 1), int(cols[-1] - cols[0] + 1)


def centre_of_mass(a: np.ndarray) -> tuple[float, float]:
    ys, xs = np.indices(a.shape)
    return float((ys * a).sum() / a.sum()), float((xs * a).sum() / a.sum())


def assert_mnist_like(a: np.ndarray) -> None:
    """Full ink, MNIST stroke width, a 20 px box, centre of mass at the centre."""
    assert a.max() == 255
    assert LOW * 0.9 <= stroke_width(a) <= HIGH * 1.1, stroke_width(a)
    assert max(box_size(a)) == 20, box_size(a)
    cy, cx = centre_of_mass(a)
    assert abs(cy - 14.0) <= 1.0 and abs(cx - 14.0) <= 1.0, (cy, cx)


def correlation(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


def reference_seven() -> np.ndarray:
    """The same "7" drawn cleanly: black marker on white, moderate size."""
    img = Image.new("L", (200, 200), 255)
    draw_digit(img, SEVEN, (40, 20, 160, 180), 12, 0)
    return model_input(img)


def test_reference_digit_is_mnist_like() -> None:
    assert_mnist_like(reference_seven())


def test_one_pixel_pen_stroke_on_a_1000_px_canvas_arrives_at_mnist_width() -> None:
    img = Image.new("L", (1000, 1000), 255)
    draw_digit(img, SEVEN, (300, 200, 700, 800), 1, 0)
    a = model_input(img)
    assert_mnist_like(a)
    # Not a faint hairline: a good share of the strokes is full ink.
    assert (a >= 200).sum() >= 25
    assert correlation(a, reference_seven()) > 0.8


def test_shadowed_photo_loses_its_shadow_and_gradient() -> None:
    rng = np.random.default_rng(0)
    h, w = 300, 400
    # Light falls from the left: paper goes from 235 to 80, with a soft shadow blob.
    x = np.linspace(0.0, 1.0, w)[None, :]
    y = np.linspace(0.0, 1.0, h)[:, None]
    paper = 235.0 - 155.0 * x - 60.0 * np.exp(-((x - 0.8) ** 2 + (y - 0.2) ** 2) / 0.05)
    ink = Image.new("L", (w, h), 0)
    draw_digit(ink, FOUR, (150, 60, 260, 240), 9, 255)
    darkness = np.asarray(ink, dtype=np.float64) / 255.0
    photo = paper * (1.0 - 0.65 * darkness) + rng.normal(0.0, 3.0, (h, w))
    rgb = np.clip(np.stack([photo, photo * 0.97, photo * 0.9], axis=-1), 0, 255)
    a = model_input(Image.fromarray(rgb.astype(np.uint8), mode="RGB"))
    assert_mnist_like(a)
    # The digit fills the box, not a grey fog: few ink pixels outside its strokes.
    assert (a > 0).mean() < 0.35
    clean = Image.new("L", (w, h), 255)
    draw_digit(clean, FOUR, (150, 60, 260, 240), 9, 0)
    assert correlation(a, model_input(clean)) > 0.85


def test_outline_digit_is_filled_into_strokes() -> None:
    solid = Image.new("L", (300, 300), 0)
    draw_digit(solid, SEVEN, (60, 30, 240, 270), 34, 255)
    # The outline: the solid glyph minus its erosion, 2 px thick, black on white.
    eroded = solid.filter(ImageFilter.MinFilter(5))
    outline = np.asarray(solid, dtype=np.int16) - np.asarray(eroded, dtype=np.int16)
    img = Image.fromarray((255 - outline).astype(np.uint8), mode="L")
    a = model_input(img)
    assert_mnist_like(a)
    filled = model_input(Image.fromarray(255 - np.asarray(solid), mode="L"))
    assert correlation(a, filled) > 0.9
    # Along the diagonal stroke's middle there is ink, not the hole of an outline.
    assert a[14, 11:17].max() >= 200


def test_round_loops_of_a_thin_pen_zero_stay_open() -> None:
    img = Image.new("L", (300, 300), 255)
    ImageDraw.Draw(img).ellipse((80, 40, 220, 260), outline=0, width=2)
    a = model_input(img)
    assert_mnist_like(a)
    assert a[12:16, 12:16].max() == 0  # the hole of the 0 is still there


def test_tiny_off_centre_digit_on_a_big_canvas_fills_the_box() -> None:
    img = Image.new("L", (1200, 900), 255)
    draw_digit(img, FOUR, (1080, 780, 1104, 816), 3, 0)  # 24 x 36 px near a corner
    a = model_input(img)
    assert_mnist_like(a)
    assert box_size(a)[0] == 20  # the digit is taller than wide


@pytest.mark.parametrize("colour", [(255, 255, 255), (0, 0, 0), (200, 30, 30)])
def test_ink_only_in_alpha_is_read_whatever_its_colour(colour: tuple[int, int, int]) -> None:
    alpha = Image.new("L", (200, 200), 0)
    draw_digit(alpha, SEVEN, (40, 20, 160, 180), 12, 255)
    rgba = Image.new("RGBA", (200, 200), (*colour, 0))
    rgba.putalpha(alpha)
    a = model_input(rgba)
    assert_mnist_like(a)
    assert np.abs(a - reference_seven()).max() <= 2


def test_transparent_margin_around_paper_is_background() -> None:
    rgba = Image.new("RGBA", (240, 240), (0, 0, 0, 0))
    paper = Image.new("RGBA", (200, 200), (250, 250, 245, 255))
    draw_digit(paper, SEVEN, (40, 20, 160, 180), 12, (0, 0, 0, 255))
    rgba.paste(paper, (20, 20))
    a = model_input(rgba)
    assert_mnist_like(a)
    assert correlation(a, reference_seven()) > 0.95


@pytest.mark.parametrize(
    ("line_colour", "box", "jpeg"),
    [
        ((150, 170, 220), (220, 250, 380, 520), False),
        # Faint lines through a small digit, JPEG-compressed: the lines dip below the ink
        # threshold in places and must still be found.
        ((170, 185, 225), (260, 330, 340, 440), True),
    ],
)
def test_ruled_paper_lines_are_removed_and_the_digit_kept(
    line_colour: tuple[int, int, int], box: tuple[int, int, int, int], jpeg: bool
) -> None:
    img = Image.new("RGB", (600, 800), (250, 250, 240))
    draw = ImageDraw.Draw(img)
    for y in range(40, 800, 45):
        draw.line([(0, y), (600, y)], fill=line_colour, width=2)
    draw.line([(70, 0), (70, 800)], fill=(220, 120, 120), width=2)  # margin line
    draw_digit(img, SEVEN, box, 10, (20, 20, 60))
    if jpeg:
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=80)
        img = Image.open(buf)
    a = model_input(img)
    assert_mnist_like(a)
    clean = Image.new("L", (600, 800), 255)
    draw_digit(clean, SEVEN, box, 10, 0)
    assert correlation(a, model_input(clean)) > 0.9


def test_straight_stem_of_a_nine_is_a_stroke_not_a_ruled_line() -> None:
    img = Image.new("L", (120, 200), 235)
    draw = ImageDraw.Draw(img)
    draw.ellipse((30, 15, 85, 70), outline=30, width=6)
    draw.line([(82, 40), (82, 190)], fill=30, width=6)  # straight, over half the height
    a = model_input(img)
    assert_mnist_like(a)
    height, width = box_size(a)
    assert height == 20 and width <= 12  # the stem is still there: tall and narrow


def test_specks_and_paper_edges_do_not_stretch_the_box() -> None:
    img = Image.new("L", (500, 400), 235)
    draw = ImageDraw.Draw(img)
    draw.rectangle((0, 370, 500, 400), fill=40)  # the table below the sheet
    for x, y in [(30, 30), (460, 50), (40, 330), (420, 300)]:
        draw.ellipse((x, y, x + 3, y + 3), fill=60)  # dust
    draw_digit(img, FOUR, (200, 100, 300, 260), 8, 20)
    a = model_input(img)
    assert_mnist_like(a)
    clean = Image.new("L", (500, 400), 255)
    draw_digit(clean, FOUR, (200, 100, 300, 260), 8, 0)
    assert correlation(a, model_input(clean)) > 0.9


def test_table_around_the_sheet_is_background() -> None:
    rng = np.random.default_rng(1)
    photo = np.full((400, 500), 45.0)  # a dark table
    photo[20:390, 10:330] = 225.0  # the sheet, on the left two thirds
    photo += rng.normal(0.0, 4.0, photo.shape)
    ink = Image.new("L", (500, 400), 0)
    draw_digit(ink, SEVEN, (110, 90, 230, 290), 9, 255)
    photo -= (photo - 30.0) * 0.8 * np.asarray(ink, dtype=np.float64) / 255.0
    a = model_input(Image.fromarray(np.clip(photo, 0, 255).astype(np.uint8), mode="L"))
    assert_mnist_like(a)
    clean = Image.new("L", (500, 400), 255)
    draw_digit(clean, SEVEN, (110, 90, 230, 290), 9, 0)
    assert correlation(a, model_input(clean)) > 0.9


@pytest.mark.parametrize("fill", [0, 255, 128])
def test_blank_images_give_an_empty_canvas(fill: int) -> None:
    a = model_input(Image.new("L", (300, 200), fill))
    assert a.max() == 0


def test_light_gradients_and_empty_ruled_paper_hold_no_ink() -> None:
    ramp = np.linspace(0.0, 255.0, 320)[None, :].repeat(240, axis=0)
    assert model_input(Image.fromarray(ramp.astype(np.uint8), mode="L")).max() == 0
    paper = Image.new("RGB", (400, 500), (250, 250, 245))
    draw = ImageDraw.Draw(paper)
    for y in range(30, 500, 30):
        draw.line([(0, y), (400, y)], fill=(150, 170, 220), width=2)
    draw.line([(50, 0), (50, 500)], fill=(220, 120, 120), width=2)
    assert model_input(paper).max() == 0


def test_mnist_like_upload_passes_unchanged() -> None:
    # What the model sees is its own preprocessing's fixed point: an MNIST-like 28 x 28
    # upload (20 px box, centred, MNIST stroke width) goes through unchanged.
    img = Image.new("L", (28, 28), 0)
    draw_digit(img, SEVEN, (8, 4, 20, 24), 2, 255)
    once = model_input(img)
    twice = model_input(Image.fromarray(once.astype(np.uint8), mode="L"))
    assert np.array_equal(once, twice)
    assert_mnist_like(once)


def test_stroke_width_measures_lines_and_is_blank_safe() -> None:
    for width in (1, 2, 4, 7):
        a = np.zeros((200, 200))
        a[20:180, 100 : 100 + width] = 255
        assert stroke_width(a) == pytest.approx(width, rel=0.1)
    assert stroke_width(np.zeros((5, 5))) == 0.0


def test_otsu_threshold_separates_two_modes() -> None:
    values = np.concatenate([np.full(900, 20.0), np.full(100, 200.0)])
    assert 20.0 <= otsu_threshold(values) < 200.0
    assert otsu_threshold(np.full(10, 7.0)) == 7.0


def test_polarity_follows_the_sparse_tail_not_the_light() -> None:
    # Dark ink on paper lit unevenly: the border is dark on one side, light on the other.
    x = np.linspace(0.0, 1.0, 300)[None, :].repeat(200, axis=0)
    paper = 230.0 - 170.0 * x
    img = Image.new("L", (300, 200), 0)
    draw_digit(img, FOUR, (120, 40, 180, 160), 4, 255)
    dark_ink = paper * (1.0 - 0.7 * np.asarray(img, dtype=np.float64) / 255.0)
    assert is_dark_on_light(dark_ink)
    assert not is_dark_on_light(255.0 - dark_ink)


def test_train_time_and_serve_time_tensors_are_identical(tmp_path: Path) -> None:
    from visionops.data.sources import load_imagefolder
    from visionops.serve.inputs import RawImage, prepare_file

    files: dict[str, bytes] = {}
    photo = Image.new("RGB", (500, 400), (200, 190, 170))
    draw_digit(photo, FOUR, (200, 100, 300, 260), 3, (40, 40, 120))
    alpha = Image.new("RGBA", (120, 120), (255, 255, 255, 0))
    draw_digit(alpha, SEVEN, (20, 10, 100, 110), 6, (255, 255, 255, 255))
    for name, img, fmt in (("4/photo.jpg", photo, "JPEG"), ("7/alpha.png", alpha, "PNG")):
        buf = io.BytesIO()
        img.save(buf, format=fmt)
        files[name] = buf.getvalue()
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_bytes(buf.getvalue())
    ds = load_imagefolder(tmp_path, SPEC, test_fraction=0.0, seed=0, max_pixels=10**8)
    assert ds.train_files is not None
    for x, rel in zip(ds.x_train, ds.train_files, strict=True):
        served = prepare_file(RawImage(rel, files[rel]), 0, SPEC, 10**8)
        assert np.array_equal(normalize(x, SPEC), normalize(served, SPEC))
        assert x.max() == 255
