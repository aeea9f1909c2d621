"""Draw docs/img/preprocessing.png: uploads of each kind, and what the model sees.

Every input is drawn here (no third-party images): a 1 px pen stroke on a 1000 px
canvas, a photo of paper with a shadow and uneven light, an outlined digit, a tiny digit
in the corner of a big canvas, white ink only in the alpha channel, a digit on ruled
paper, a light gradient and an empty page. Each goes through the shared preprocessing
(``visionops.data.transforms.image_to_array``) exactly as an upload does.

    python tools/preprocessing_figure.py
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from visionops.data.ink import stroke_width
from visionops.data.transforms import PreprocessSpec, decode_image, image_to_array

OUT = Path(__file__).resolve().parents[1] / "docs" / "img" / "preprocessing.png"
SPEC = PreprocessSpec(image_size=28, channels=1, invert="auto", center=True, digit_box=20)
TILE = 150

SEVEN = [[(0.1, 0.05), (0.9, 0.05), (0.35, 0.95)], [(0.3, 0.5), (0.75, 0.5)]]
FOUR = [[(0.65, 0.95), (0.65, 0.05), (0.05, 0.65), (0.95, 0.65)]]
TWO = [[(0.1, 0.25), (0.3, 0.05), (0.7, 0.05), (0.9, 0.25), (0.85, 0.45), (0.1, 0.95),
        (0.95, 0.95)]]  # fmt: skip


def draw(canvas: Image.Image, strokes: list, box: tuple[int, int, int, int], width: int,
         fill: int | tuple[int, ...]) -> None:  # fmt: skip
    left, top, right, bottom = box
    d = ImageDraw.Draw(canvas)
    for line in strokes:
        pts = [(left + x * (right - left), top + y * (bottom - top)) for x, y in line]
        d.line(pts, fill=fill, width=width, joint="curve")


def examples() -> list[tuple[str, Image.Image]]:
    out = []
    pen = Image.new("L", (1000, 1000), 255)
    draw(pen, TWO, (300, 200, 700, 800), 1, 0)
    out.append(("1 px pen, 1000 px canvas", pen))

    rng = np.random.default_rng(0)
    h, w = 300, 400
    x = np.linspace(0.0, 1.0, w)[None, :]
    y = np.linspace(0.0, 1.0, h)[:, None]
    paper = 235.0 - 155.0 * x - 60.0 * np.exp(-((x - 0.8) ** 2 + (y - 0.2) ** 2) / 0.05)
    ink = Image.new("L", (w, h), 0)
    draw(ink, FOUR, (150, 60, 260, 240), 9, 255)
    photo = paper * (1.0 - 0.65 * np.asarray(ink) / 255.0) + rng.normal(0.0, 3.0, (h, w))
    rgb = np.clip(np.stack([photo, photo * 0.97, photo * 0.9], axis=-1), 0, 255)
    out.append(("shadow, uneven light", Image.fromarray(rgb.astype(np.uint8), mode="RGB")))

    solid = Image.new("L", (300, 300), 0)
    draw(solid, SEVEN, (60, 30, 240, 270), 34, 255)
    edge = np.asarray(solid, np.int16) - np.asarray(solid.filter(ImageFilter.MinFilter(5)))
    out.append(("outlined digit", Image.fromarray((255 - edge).astype(np.uint8), mode="L")))

    tiny = Image.new("L", (1200, 900), 255)
    draw(tiny, FOUR, (1080, 780, 1104, 816), 3, 0)
    out.append(("tiny, in a corner", tiny))

    alpha = Image.new("L", (200, 200), 0)
    draw(alpha, SEVEN, (40, 20, 160, 180), 12, 255)
    white = Image.new("RGBA", (200, 200), (255, 255, 255, 0))
    white.putalpha(alpha)
    out.append(("white ink in alpha", white))

    ruled = Image.new("RGB", (600, 800), (250, 250, 245))
    d = ImageDraw.Draw(ruled)
    for yy in range(40, 800, 45):
        d.line([(0, yy), (600, yy)], fill=(150, 170, 220), width=2)
    d.line([(70, 0), (70, 800)], fill=(220, 120, 120), width=2)
    draw(ruled, TWO, (220, 250, 380, 520), 10, (20, 20, 60))
    out.append(("ruled paper", ruled))

    ramp = np.linspace(0, 255, 320)[None, :].repeat(240, axis=0).astype(np.uint8)
    out.append(("gradient: no ink", Image.fromarray(ramp, mode="L")))
    out.append(("empty page: no ink", Image.new("L", (400, 300), 250)))
    return out


def tile(img: Image.Image) -> Image.Image:
    rgba = img.convert("RGBA")
    # Checkerboard behind the upload, so transparency shows.
    check = np.indices((rgba.height, rgba.width)).sum(axis=0) // 12 % 2
    board = np.where(check[..., None] == 1, 205, 160).repeat(3, axis=2).astype(np.uint8)
    back = Image.fromarray(np.dstack([board, np.full(check.shape, 255, np.uint8)]), "RGBA")
    flat = Image.alpha_composite(back, rgba).convert("RGB")
    flat.thumbnail((TILE, TILE))
    out = Image.new("RGB", (TILE, TILE), (255, 255, 255))
    out.paste(flat, ((TILE - flat.width) // 2, (TILE - flat.height) // 2))
    return out


def main() -> None:
    items = examples()
    cap = 34
    sheet = Image.new("RGB", (len(items) * (TILE + 10) + 10, 2 * TILE + 3 * cap), "white")
    d = ImageDraw.Draw(sheet)
    d.text((10, 6), "top: the upload; bottom: what the model sees (28 x 28)", fill=(0, 0, 0))
    for i, (label, img) in enumerate(items):
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        seen = image_to_array(decode_image(buf.getvalue(), max_pixels=10**8), SPEC)[:, :, 0]
        x = 10 + i * (TILE + 10)
        sheet.paste(tile(img), (x, cap - 10))
        model = Image.fromarray(seen).resize((TILE, TILE), Image.Resampling.NEAREST)
        sheet.paste(model.convert("RGB"), (x, TILE + 2 * cap - 10))
        d.text((x, TILE + cap - 6), f"{label}", fill=(0, 0, 0))
        info = f"{img.width}x{img.height} {img.mode}"
        if seen.max() > 0:
            info = f"stroke {stroke_width(seen):.1f} px, max {seen.max()}"
        d.text((x, 2 * TILE + 2 * cap - 6), info, fill=(90, 90, 90))
    sheet.save(OUT, optimize=True)
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
