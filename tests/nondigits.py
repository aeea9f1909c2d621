"""Generated images that are not digits: what a classifier of digits must not accept.

Deterministic (seeded) Pillow images of the kinds people send by mistake or on purpose:
blank pages, uniform colours, fully transparent PNGs, noise, gradients, printed text,
blurred colour scenes and ruled paper. Each comes with a ``kind`` so results can be
counted per kind. Used by the OOD tests; the images are built here, nothing is read.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

KINDS = (
    "blank",
    "uniform_colour",
    "transparent",
    "noise",
    "gradient",
    "text",
    "blurred_scene",
    "ruled_paper",
)

_WORDS = (
    "The quick brown fox",
    "jumps over the lazy dog",
    "Invoice total due",
    "Hello, world!",
    "Chapter One",
    "printed text page",
    "MLOps pipeline",
    "Lorem ipsum dolor",
)


@dataclass(frozen=True)
class NonDigit:
    kind: str
    name: str
    image: Image.Image

    def png(self) -> bytes:
        buf = io.BytesIO()
        self.image.save(buf, format="PNG")
        return buf.getvalue()


def _blank(rng: np.random.Generator) -> list[tuple[str, Image.Image]]:
    out = []
    for size in (28, 280, 640):
        out.append((f"white_{size}", Image.new("L", (size, size), 255)))
        out.append((f"black_{size}", Image.new("L", (size, size), 0)))
    out.append(("white_rgb_800x600", Image.new("RGB", (800, 600), (255, 255, 255))))
    # A "blank" photo: paper with a little sensor noise.
    paper = np.clip(rng.normal(235, 3, (300, 400)), 0, 255).astype(np.uint8)
    out.append(("paper_photo", Image.fromarray(paper, "L")))
    return out


def _uniform(rng: np.random.Generator) -> list[tuple[str, Image.Image]]:
    colours = [(255, 0, 0), (0, 160, 0), (0, 0, 255), (128, 128, 128), (250, 220, 40)]
    colours += [tuple(int(v) for v in rng.integers(0, 256, 3)) for _ in range(3)]
    return [(f"rgb_{r}_{g}_{b}", Image.new("RGB", (200, 150), (r, g, b))) for r, g, b in colours]


def _transparent(rng: np.random.Generator) -> list[tuple[str, Image.Image]]:
    out = []
    for colour in ((0, 0, 0, 0), (255, 255, 255, 0), (255, 0, 0, 0)):
        out.append((f"rgba_{colour[0]}_{colour[1]}", Image.new("RGBA", (280, 280), colour)))
    out.append(("la_clear", Image.new("LA", (64, 64), (0, 0))))
    # Random colour values under zero alpha: nothing is visible either.
    hidden = rng.integers(0, 256, (120, 120, 4), dtype=np.uint8)
    hidden[..., 3] = 0
    out.append(("rgba_hidden_noise", Image.fromarray(hidden, "RGBA")))
    return out


def _noise(rng: np.random.Generator) -> list[tuple[str, Image.Image]]:
    out = []
    for size in (28, 100, 400):
        out.append(
            (f"uniform_{size}", Image.fromarray(rng.integers(0, 256, (size, size), np.uint8)))
        )
    gauss = np.clip(rng.normal(128, 50, (200, 200)), 0, 255).astype(np.uint8)
    out.append(("gaussian_200", Image.fromarray(gauss)))
    colour = rng.integers(0, 256, (150, 150, 3), dtype=np.uint8)
    out.append(("colour_150", Image.fromarray(colour, "RGB")))
    sp = np.full((200, 200), 255, np.uint8)
    sp[rng.random((200, 200)) < 0.05] = 0
    out.append(("salt_pepper_200", Image.fromarray(sp)))
    return out


def _gradient(rng: np.random.Generator) -> list[tuple[str, Image.Image]]:
    h, w = 240, 320
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    fields = {
        "horizontal": xs / (w - 1),
        "vertical": ys / (h - 1),
        "diagonal": (xs / (w - 1) + ys / (h - 1)) / 2,
        "radial": np.hypot(xs - w / 2, ys - h / 2) / np.hypot(w / 2, h / 2),
        "grey_soft": 0.3 + 0.4 * xs / (w - 1),
    }
    out = [(k, Image.fromarray((255 * v).astype(np.uint8))) for k, v in fields.items()]
    out.append(
        (
            "horizontal_reversed",
            Image.fromarray((255 * (1 - fields["horizontal"])).astype(np.uint8)),
        )
    )
    a, b = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
    t = fields["diagonal"][..., None]
    colour = (a * (1 - t) + b * t).astype(np.uint8)
    out.append(("colour_diagonal", Image.fromarray(colour, "RGB")))
    return out


def _text_image(text: str, size: int, dark_on_light: bool, lines: int = 1) -> Image.Image:
    font = ImageFont.load_default(size=size)
    bg, fg = (255, 0) if dark_on_light else (0, 255)
    width = int(size * 0.62 * len(text)) + 2 * size
    img = Image.new("L", (width, int(size * 1.5 * lines) + size), bg)
    d = ImageDraw.Draw(img)
    for i in range(lines):
        d.text((size, size // 2 + int(i * size * 1.5)), text, fill=fg, font=font)
    return img


def _text(rng: np.random.Generator) -> list[tuple[str, Image.Image]]:
    out = []
    for i, words in enumerate(_WORDS):
        size = (18, 28, 40)[i % 3]
        lines = 1 + i % 3
        out.append((f"font_{i}", _text_image(words, size, dark_on_light=i % 4 != 3, lines=lines)))
    # A "photo" of printed text: uneven light, blur and sensor noise.
    page = np.asarray(_text_image("Printed page text", 30, True, lines=4), np.float32)
    h, w = page.shape
    light = 0.75 + 0.25 * np.linspace(0, 1, w)[None, :] * np.linspace(1, 0.6, h)[:, None]
    photo = page * light + rng.normal(0, 4, page.shape)
    img = Image.fromarray(np.clip(photo, 0, 255).astype(np.uint8)).filter(
        ImageFilter.GaussianBlur(1)
    )
    out.append(("text_photo", img))
    return out


def _blurred_scene(rng: np.random.Generator) -> list[tuple[str, Image.Image]]:
    out = []
    for i in range(6):
        img = Image.new("RGB", (320, 240), tuple(int(v) for v in rng.integers(0, 256, 3)))
        d = ImageDraw.Draw(img)
        for _ in range(12):
            x0, y0 = int(rng.integers(-40, 300)), int(rng.integers(-40, 220))
            x1, y1 = x0 + int(rng.integers(30, 200)), y0 + int(rng.integers(30, 160))
            fill = tuple(int(v) for v in rng.integers(0, 256, 3))
            (d.ellipse if rng.random() < 0.5 else d.rectangle)([x0, y0, x1, y1], fill=fill)
        out.append((f"scene_{i}", img.filter(ImageFilter.GaussianBlur(float(rng.uniform(3, 10))))))
    return out


def _ruled_paper(rng: np.random.Generator) -> list[tuple[str, Image.Image]]:
    out = []
    for i, (w, h, gap) in enumerate(((400, 300, 24), (600, 800, 32), (280, 280, 20))):
        img = Image.new("RGB", (w, h), (250, 250, 245))
        d = ImageDraw.Draw(img)
        for y in range(gap, h, gap):
            d.line([(0, y), (w, y)], fill=(150, 180, 230), width=1 + i % 2)
        d.line([(gap * 2, 0), (gap * 2, h)], fill=(230, 120, 120), width=2)
        out.append((f"lined_{i}", img))
    grid = Image.new("L", (300, 300), 255)
    d = ImageDraw.Draw(grid)
    for v in range(0, 300, 15):
        d.line([(v, 0), (v, 300)], fill=170)
        d.line([(0, v), (300, v)], fill=170)
    out.append(("squared", grid))
    return out


_BUILDERS = {
    "blank": _blank,
    "uniform_colour": _uniform,
    "transparent": _transparent,
    "noise": _noise,
    "gradient": _gradient,
    "text": _text,
    "blurred_scene": _blurred_scene,
    "ruled_paper": _ruled_paper,
}


def non_digit_images(seed: int = 0) -> list[NonDigit]:
    """Every generated non-digit image, in :data:`KINDS` order (about 60 images)."""
    rng = np.random.default_rng(seed)
    return [
        NonDigit(kind, f"{kind}/{name}", img)
        for kind in KINDS
        for name, img in _BUILDERS[kind](rng)
    ]
