"""A generated image folder of coloured shapes: a small natural-picture task to try
``data.source: imagefolder`` on (tests and the training benchmark use it).

``write_shapes_folder(root)`` writes ``root/{circle,square,triangle}/NNNN.{png,jpg}``:
RGB pictures (64×64 by default) of one filled shape of a random colour, size and
position on a random background colour, alternately PNG and JPEG (quality 90). The
same ``seed`` writes the same files.

    python -m visionops.data.shapes DIR [--per-class 150] [--size 64] [--seed 0]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

CLASSES = ("circle", "square", "triangle")


def _colour(rng: np.random.Generator) -> tuple[int, int, int]:
    return (int(rng.integers(0, 256)), int(rng.integers(0, 256)), int(rng.integers(0, 256)))


def _far_colour(rng: np.random.Generator, other: tuple[int, int, int]) -> tuple[int, int, int]:
    """A random colour at least 120 away (sum of channel differences) from ``other``."""
    while True:
        c = _colour(rng)
        if sum(abs(a - b) for a, b in zip(c, other, strict=True)) >= 120:
            return c


def draw_shape(kind: str, size: int, rng: np.random.Generator) -> Image.Image:
    """One ``size × size`` RGB picture of ``kind`` (circle, square or triangle)."""
    background = _colour(rng)
    img = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(img)
    side = int(rng.integers(size * 3 // 10, size * 7 // 10 + 1))
    x0 = int(rng.integers(0, size - side + 1))
    y0 = int(rng.integers(0, size - side + 1))
    fill = _far_colour(rng, background)
    if kind == "circle":
        draw.ellipse((x0, y0, x0 + side - 1, y0 + side - 1), fill=fill)
    elif kind == "square":
        draw.rectangle((x0, y0, x0 + side - 1, y0 + side - 1), fill=fill)
    elif kind == "triangle":
        draw.polygon(
            [(x0 + side // 2, y0), (x0, y0 + side - 1), (x0 + side - 1, y0 + side - 1)], fill=fill
        )
    else:
        raise ValueError(f"unknown shape {kind!r}; choose from {CLASSES}")
    return img


def write_shapes_folder(
    root: Path, per_class: int = 150, size: int = 64, seed: int = 0
) -> list[Path]:
    """Write ``per_class`` pictures of each shape under ``root/<shape>/``; returns the files."""
    rng = np.random.default_rng(seed)
    written: list[Path] = []
    for kind in CLASSES:
        folder = Path(root) / kind
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            img = draw_shape(kind, size, rng)
            if i % 2:
                path = folder / f"{i:04d}.jpg"
                img.save(path, format="JPEG", quality=90)
            else:
                path = folder / f"{i:04d}.png"
                img.save(path, format="PNG")
            written.append(path)
    return written


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("root", type=Path)
    ap.add_argument("--per-class", type=int, default=150)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    files = write_shapes_folder(args.root, args.per_class, args.size, args.seed)
    print(f"wrote {len(files)} pictures under {args.root}")


if __name__ == "__main__":  # pragma: no cover
    main()
