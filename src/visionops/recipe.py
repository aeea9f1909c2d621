"""The training recipe that scales with the data, and augmentations for natural pictures.

Scaling (all in ``train.*`` params, recorded in each model's ``config.json``):

- Batch size: ``train.batch_size``, but no larger than an eighth of the training set
  (a power of two, at least 16), so even a few hundred pictures give eight optimiser
  steps per epoch.
- Epochs: ``train.epochs``, raised to reach ``train.min_steps`` optimiser steps on a small
  dataset (``ceil(min_steps / steps_per_epoch)``), capped at ``train.max_epochs``.
- Learning rate: ``train.natural_lr`` (0.01) for natural pictures, ``train.lr`` for digits
  (measured on the generated shapes folder: 97.8 % test accuracy at 0.003, 98.9 % at 0.01).
- Early stopping watches the validation loss: ``train.patience`` epochs without a new
  lowest loss, or a quarter of the planned epochs when ``min_steps`` raised them (the
  epochs of a small dataset are short and its validation loss noisy).

Natural-picture augmentation (``kind == "natural"``, :func:`augment_natural`), each
drawn per image from the run's seeded generator:

- random resized crop: a crop of ``crop_scale``..1 of the area and aspect ratio 3/4..4/3
  (torchvision's ``RandomResizedCrop`` ranges), resized back to the input size (bilinear,
  through one ``affine_grid``/``grid_sample`` call for the whole batch);
- horizontal flip with probability 1/2 (``train.hflip``);
- colour jitter: brightness, contrast and saturation factors in ``1 ± color_jitter``.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from visionops.config import TrainParams

#: Steps per epoch the batch-size rule aims for on small datasets.
MIN_STEPS_PER_EPOCH = 8
MIN_BATCH = 16


def scaled_batch_size(batch_size: int, n_train: int) -> int:
    """``batch_size``, lowered on small datasets so an epoch has at least 8 steps."""
    target = n_train // MIN_STEPS_PER_EPOCH
    if target >= batch_size:
        return batch_size
    power = 2 ** max(0, math.floor(math.log2(max(target, 1))))
    return max(min(batch_size, MIN_BATCH), min(batch_size, power))


def planned_epochs(tp: TrainParams, steps_per_epoch: int) -> int:
    """``train.epochs`` raised to reach ``train.min_steps`` (capped at ``max_epochs``)."""
    needed = math.ceil(tp.min_steps / max(steps_per_epoch, 1)) if tp.min_steps else 0
    return max(tp.epochs, min(needed, tp.max_epochs))


def peak_lr(tp: TrainParams, kind: str) -> float:
    """The one-cycle peak learning rate: ``train.natural_lr`` for natural pictures (heavy
    augmentation, few steps), ``train.lr`` for digits."""
    return tp.natural_lr if kind == "natural" else tp.lr


def early_stop_patience(tp: TrainParams, epochs: int) -> int:
    """Epochs without a lower validation loss before stopping (see the module docstring)."""
    if epochs > tp.epochs:
        return max(tp.patience, math.ceil(epochs / 4))
    return tp.patience


def recipe_record(tp: TrainParams, kind: str, batch_size: int, epochs: int, steps: int) -> dict:
    """What the run did, for ``config.json`` and MLflow: the scaled numbers and the
    augmentations actually applied."""
    record: dict[str, Any] = {
        "kind": kind,
        "batch_size": batch_size,
        "planned_epochs": epochs,
        "steps_per_epoch": steps,
        "min_steps": tp.min_steps,
        "early_stopping": {"monitor": "val_loss", "patience": early_stop_patience(tp, epochs)},
        "lr": peak_lr(tp, kind),
        "weight_decay": tp.weight_decay,
        "label_smoothing": tp.label_smoothing,
    }
    if not tp.augment:
        record["augment"] = []
    elif kind == "natural":
        record["augment"] = [
            {"random_resized_crop": {"scale": [tp.crop_scale, 1.0], "ratio": [0.75, 4 / 3]}},
            *([{"horizontal_flip": 0.5}] if tp.hflip else []),
            *([{"color_jitter": tp.color_jitter}] if tp.color_jitter > 0 else []),
        ]
    else:
        record["augment"] = [{"shift": tp.max_shift}] if tp.max_shift > 0 else []
    return record


def draw_natural(n: int, tp: TrainParams, generator: torch.Generator) -> torch.Tensor:
    """Per-image augmentation parameters ``(n, 8)``: crop area, log aspect, centre x/y
    (0..1), flip (0/1) and brightness/contrast/saturation factors. Drawn on the CPU from
    ``generator`` for a whole global batch (DDP ranks take their rows)."""
    import torch

    u = torch.rand((n, 8), generator=generator)
    out = torch.empty_like(u)
    out[:, 0] = tp.crop_scale + (1.0 - tp.crop_scale) * u[:, 0]
    out[:, 1] = (u[:, 1] * 2.0 - 1.0) * math.log(4 / 3)
    out[:, 2:4] = u[:, 2:4]
    out[:, 4] = (u[:, 4] < 0.5).float() if tp.hflip else 0.0
    out[:, 5:8] = 1.0 + (u[:, 5:8] * 2.0 - 1.0) * tp.color_jitter
    return out


def augment_natural(
    x: torch.Tensor, draws: torch.Tensor, mean: torch.Tensor, std: torch.Tensor
) -> torch.Tensor:
    """Augment a normalised batch ``x (N, C, H, W)`` with :func:`draw_natural`'s rows.

    Works on the ``[0, 1]`` pixel scale (``x * std + mean``) and returns the batch
    normalised again; ``mean``/``std`` are per channel, shape ``(C,)``.
    """
    import torch
    import torch.nn.functional as F

    n, c = x.shape[:2]
    d = draws.to(x.device, x.dtype)
    m = mean.to(x.device, x.dtype).view(1, -1, 1, 1)
    s = std.to(x.device, x.dtype).view(1, -1, 1, 1)
    pix = x * s + m
    # Crop side lengths (fractions of the image) from area and aspect ratio, clamped to 1.
    ratio = torch.exp(d[:, 1])
    w = torch.sqrt(d[:, 0] * ratio).clamp(max=1.0)
    h = torch.sqrt(d[:, 0] / ratio).clamp(max=1.0)
    cx = (d[:, 2] * 2.0 - 1.0) * (1.0 - w)
    cy = (d[:, 3] * 2.0 - 1.0) * (1.0 - h)
    flip = 1.0 - 2.0 * d[:, 4]
    theta = torch.zeros((n, 2, 3), device=x.device, dtype=x.dtype)
    theta[:, 0, 0] = w * flip
    theta[:, 0, 2] = cx
    theta[:, 1, 1] = h
    theta[:, 1, 2] = cy
    grid = F.affine_grid(theta, list(pix.shape), align_corners=False)
    pix = F.grid_sample(pix, grid, mode="bilinear", padding_mode="border", align_corners=False)
    # Colour jitter (torchvision's definitions): brightness scales, contrast blends with
    # the grey mean, saturation blends with the grey image.
    pix = pix * d[:, 5].view(-1, 1, 1, 1)
    grey = pix.mean(dim=1, keepdim=True) if c == 1 else _luma(pix)
    pix = (pix - grey.mean(dim=(2, 3), keepdim=True)) * d[:, 6].view(-1, 1, 1, 1) + grey.mean(
        dim=(2, 3), keepdim=True
    )
    if c == 3:
        grey = _luma(pix)
        pix = (pix - grey) * d[:, 7].view(-1, 1, 1, 1) + grey
    pix = pix.clamp(0.0, 1.0)
    return (pix - m) / s


def _luma(pix: torch.Tensor) -> torch.Tensor:
    """ITU-R 601 grey of RGB ``(N, 3, H, W)`` in ``[0, 1]``: ``(N, 1, H, W)``."""
    r, g, b = pix[:, 0:1], pix[:, 1:2], pix[:, 2:3]
    return 0.299 * r + 0.587 * g + 0.114 * b
