"""Training augmentations for what users send: whole-batch tensor operations, no loops.

What a photo or a drawing still differs in after :mod:`visionops.data.ink` has cleaned it
up is what the default recipe draws, per image (``train.*`` params, ``train.augment``
switches them all off):

- **geometry** — rotation (``max_rotate`` degrees), shear (``max_shear`` degrees) and
  scale (``1 ± max_scale``) about the centre, one ``affine_grid`` + ``grid_sample``;
- **stroke thickness** — a share ``thickness`` of the images is thickened or thinned
  (half each) by up to half a 3×3 grey dilation or erosion (0–1 px);
- **blur** — a share ``blur`` is smoothed by a Gaussian of σ in [0.5, 1.0] px (one
  grouped convolution);
- **contrast** — the ink is scaled by a factor in ``[1 - contrast, 1]``;
- **background level** — the black background is raised to a level in
  ``[0, background]`` of full ink.

The shift (``max_shift``) stays in :func:`visionops.train.shift_batch`. All draws come from
the caller's CPU ``torch.Generator`` for the whole global batch (:func:`draw_augmentation`),
so runs repeat exactly and DDP ranks slice the same draws (:meth:`AugmentDraw.rows`).
Tensors are ``(N, C, H, W)`` float32 in the model's normalised units; ``mean`` and ``std``
convert them to ink units (0 = background, 1 = full ink) and back.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from visionops.config import TrainParams


@dataclass(frozen=True)
class AugmentDraw:
    """Per-image random parameters, each a ``(N,)`` CPU tensor."""

    angle: torch.Tensor  # radians
    shear: torch.Tensor  # radians
    scale: torch.Tensor  # zoom factor
    thickness: torch.Tensor  # in [-0.5, 0.5]: < 0 thins, > 0 thickens, 0 leaves alone
    blur_sigma: torch.Tensor  # pixels; 0 = no blur
    contrast: torch.Tensor  # ink factor
    background: torch.Tensor  # background level in ink units

    def rows(self, lo: int, hi: int) -> AugmentDraw:
        """The draws of images ``lo:hi`` (one DDP rank's chunk of the global batch)."""
        return AugmentDraw(**{f.name: getattr(self, f.name)[lo:hi] for f in fields(self)})


def is_enabled(tp: TrainParams) -> bool:
    """Whether any augmentation besides the shift is switched on."""
    return tp.augment and any(
        v > 0
        for v in (
            tp.max_rotate,
            tp.max_shear,
            tp.max_scale,
            tp.thickness,
            tp.blur,
            tp.contrast,
            tp.background,
        )
    )


def draw_augmentation(n: int, tp: TrainParams, generator: torch.Generator) -> AugmentDraw:
    """Draw the parameters for ``n`` images from ``generator`` (always the same 8 draws)."""
    import torch

    def uniform(lo: float, hi: float) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(n, generator=generator)

    rad = math.pi / 180.0
    angle = uniform(-tp.max_rotate * rad, tp.max_rotate * rad)
    shear = uniform(-tp.max_shear * rad, tp.max_shear * rad)
    scale = uniform(1.0 - tp.max_scale, 1.0 + tp.max_scale)
    amount = uniform(0.0, 1.0)
    pick = torch.rand(n, generator=generator)
    # pick < thickness/2: thin; thickness/2 <= pick < thickness: thicken; else nothing.
    # At most half way to a 3x3 erosion or dilation (±1 px): a full erosion would erase
    # MNIST's thinnest strokes, and the preprocessing already brings widths into
    # MNIST's range.
    thickness = torch.where(
        pick < tp.thickness / 2,
        -0.5 * amount,
        torch.where(pick < tp.thickness, 0.5 * amount, torch.zeros_like(amount)),
    )
    blur_pick = torch.rand(n, generator=generator)
    sigma = torch.where(blur_pick < tp.blur, uniform(0.5, 1.0), torch.zeros(n))
    contrast = uniform(1.0 - tp.contrast, 1.0)
    background = uniform(0.0, tp.background)
    return AugmentDraw(angle, shear, scale, thickness, sigma, contrast, background)


def _affine(u: torch.Tensor, d: AugmentDraw) -> torch.Tensor:
    import torch
    import torch.nn.functional as F

    cos, sin, tan = torch.cos(d.angle), torch.sin(d.angle), torch.tan(d.shear)
    # Output -> input sampling matrix: rotation times horizontal shear, over the zoom.
    theta = torch.zeros(len(u), 2, 3)
    theta[:, 0, 0] = cos / d.scale
    theta[:, 0, 1] = (cos * tan - sin) / d.scale
    theta[:, 1, 0] = sin / d.scale
    theta[:, 1, 1] = (sin * tan + cos) / d.scale
    theta = theta.to(u.device, u.dtype)
    grid = F.affine_grid(theta, list(u.shape), align_corners=False)
    return F.grid_sample(u, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def _max3(u: torch.Tensor) -> torch.Tensor:
    """3×3 grey dilation, separable: two shifted maxima per axis (faster than max_pool2d)."""
    import torch
    import torch.nn.functional as F

    p = F.pad(u, (1, 1, 1, 1), mode="replicate")
    rows = torch.maximum(torch.maximum(p[:, :, :, :-2], p[:, :, :, 1:-1]), p[:, :, :, 2:])
    return torch.maximum(torch.maximum(rows[:, :, :-2], rows[:, :, 1:-1]), rows[:, :, 2:])


def _thickness(u: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    t = t.to(u.device, u.dtype).view(-1, 1, 1, 1)
    dilated = _max3(u)
    eroded = -_max3(-u)
    grow = t.clamp(min=0.0)
    shrink = (-t).clamp(min=0.0)
    return u + grow * (dilated - u) - shrink * (u - eroded)


def _blur(u: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    import torch
    import torch.nn.functional as F

    n, c, h, w = u.shape
    r = torch.arange(-2, 3, dtype=u.dtype)
    s = sigma.to(u.dtype).clamp(min=1e-3).view(-1, 1)
    g = torch.exp(-(r.view(1, -1) ** 2) / (2 * s**2))
    g = g / g.sum(dim=1, keepdim=True)
    # sigma = 0 means no blur: the identity kernel.
    identity = (r == 0).to(u.dtype).view(1, -1)
    g = torch.where(sigma.view(-1, 1) > 0, g, identity)
    kernel = (g[:, :, None] * g[:, None, :]).repeat_interleave(c, dim=0)[:, None]
    out = F.conv2d(u.reshape(1, n * c, h, w), kernel.to(u.device), padding=2, groups=n * c)
    return out.view(n, c, h, w)


def augment_batch(
    x: torch.Tensor, d: AugmentDraw, mean: torch.Tensor, std: torch.Tensor
) -> torch.Tensor:
    """Apply the draws ``d`` to the normalised batch ``x (N, C, H, W)``; same shape back.

    ``mean`` and ``std`` (``(C,)``) are the normalisation of the prepared data.
    """
    mean = mean.to(x.device, x.dtype).view(1, -1, 1, 1)
    std = std.to(x.device, x.dtype).view(1, -1, 1, 1)
    u = x * std + mean  # ink units: 0 background, 1 full ink
    u = _affine(u, d)
    if bool((d.thickness != 0).any()):
        u = _thickness(u, d.thickness)
    if bool((d.blur_sigma > 0).any()):
        u = _blur(u, d.blur_sigma)
    contrast = d.contrast.to(u.device, u.dtype).view(-1, 1, 1, 1)
    level = d.background.to(u.device, u.dtype).view(-1, 1, 1, 1)
    u = level + (1.0 - level) * (u * contrast)
    return (u - mean) / std


def describe(tp: TrainParams) -> dict[str, float | int | bool]:
    """The augmentation recipe as recorded with the model (``config.json``)."""
    return {
        "augment": tp.augment,
        "max_shift": tp.max_shift,
        "max_rotate": tp.max_rotate,
        "max_shear": tp.max_shear,
        "max_scale": tp.max_scale,
        "thickness": tp.thickness,
        "blur": tp.blur,
        "contrast": tp.contrast,
        "background": tp.background,
    }
