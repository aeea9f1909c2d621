"""Train one architecture of the zoo on the prepared splits.

``run_train(params, layout, model_name)`` is one readable loop:

- The prepared uint8 splits are normalised once (``data.transforms.normalize``, the same
  function serving uses) into one float tensor held in memory; batches are index slices
  of it, so there is no per-sample Python and no DataLoader.
- Augmentation (``train.augment``): for digits a random translation of up to
  ``train.max_shift`` pixels per image, done for a whole batch with two ``gather`` calls,
  then what users' photos and drawings vary in (:mod:`visionops.augment`: rotation,
  shear, scale, stroke thickness, blur, contrast, background level), also whole-batch
  tensor operations; for natural pictures random resized crop, horizontal flip and
  colour jitter (:mod:`visionops.recipe`).
- The recipe scales with the data (:mod:`visionops.recipe`): the batch size shrinks and
  the epochs grow on small datasets to reach ``train.min_steps`` optimiser steps.
- AdamW with a OneCycle learning-rate schedule stepped every batch, label smoothing,
  validation after every epoch, early stopping on validation loss (``train.patience``)
  keeping the weights of the lowest validation loss. The peak learning rate is
  ``train.lr`` (``train.natural_lr`` for natural pictures). A pretrained timm backbone
  trains at that times ``train.backbone_lr_scale``, its new classifier at the full rate.
- Everything random comes from ``params.seed``: the global torch RNG (initialisation,
  dropout) and one ``torch.Generator`` for shuffling and augmentation. Deterministic
  algorithms are switched on for the run; the same params, data and thread count give
  the same weights bit for bit.
- After every epoch ``checkpoints/last.pt`` gets the model, optimizer, scheduler, history,
  early-stopping state and both RNG states, so ``resume=True`` continues to exactly the
  weights an uninterrupted run reaches; a checkpoint made with other params or other data
  is refused (:mod:`visionops.checkpoint`).
- On the CPU, convolutional models train in the channels_last memory format (about 1.3x
  faster with oneDNN here).
- ``train.device``: ``cpu``, ``cuda`` or ``auto`` (CUDA when present). On CUDA the splits
  live on the GPU (indexing and augmentation happen there, so no DataLoader, workers or
  pinned host memory are needed); ``train.amp`` adds bfloat16/float16 autocast and
  ``train.compile`` wraps the model in ``torch.compile``.
- Distributed data parallel: started by torchrun (``visionops train --nproc K`` launches
  ``torchrun --nproc-per-node K -m visionops.train``), every rank draws the same seeded
  permutation and trains on its own contiguous chunk of each global batch of
  ``train.batch_size`` images (:mod:`visionops.distributed`); DDP averages the gradients,
  epoch metrics and the sharded validation are summed over the ranks, and only rank 0
  writes checkpoints, outputs, TensorBoard and MLflow. Same params, same outputs.

Outputs (paths from :class:`~visionops.layout.Layout`): ``model_dir/model.pt`` (best
``state_dict``), ``model_dir/config.json``, ``train_metrics`` and ``learning_curve``
JSON, TensorBoard events in ``tensorboard_dir/<model>``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from visionops import augment, distributed
from visionops.checkpoint import RunState, load_checkpoint, run_fingerprint, save_checkpoint
from visionops.data.ingest import read_npz
from visionops.errors import ConfigError, DataError, ModelError, VisionOpsError
from visionops.stages import missing_input

if TYPE_CHECKING:
    import torch

    from visionops.config import Params
    from visionops.data.transforms import PreprocessSpec
    from visionops.distributed import DistContext
    from visionops.layout import Layout

log = logging.getLogger(__name__)

TENSORBOARD_TAGS = {
    "train_loss": "loss/train",
    "val_loss": "loss/val",
    "train_accuracy": "accuracy/train",
    "val_accuracy": "accuracy/val",
    "lr": "lr",
}
EpochCallback = Callable[[dict[str, float], int], Any]


# --------------------------------------------------------------------------- results


@dataclass(frozen=True)
class TrainResult:
    """What one training run produced (the best epoch's numbers)."""

    model_name: str
    model_dir: Path
    val_accuracy: float
    val_loss: float
    best_epoch: int
    epochs_run: int
    stopped_early: bool
    resumed_from_epoch: int
    train_seconds: float
    images_per_second: float
    params: int
    history: list[dict[str, float]] = field(default_factory=list, repr=False)

    def summary(self) -> dict[str, float]:
        return {
            "val_accuracy": self.val_accuracy,
            "val_loss": self.val_loss,
            "best_epoch": float(self.best_epoch),
            "epochs_run": float(self.epochs_run),
            "train_seconds": self.train_seconds,
            "images_per_second": self.images_per_second,
            "params": float(self.params),
        }

    def describe(self) -> str:
        early = ", stopped early" if self.stopped_early else ""
        resumed = (
            f", resumed after epoch {self.resumed_from_epoch}" if self.resumed_from_epoch else ""
        )
        return (
            f"{self.model_name}: val accuracy {self.val_accuracy:.2%} at epoch {self.best_epoch}"
            f"/{self.epochs_run}{early}{resumed}, {self.train_seconds:.0f} s, "
            f"{self.images_per_second:.0f} img/s, {self.params:,} params -> "
            f"{display_path(self.model_dir)}"
        )


def display_path(path: Path) -> str:
    """``path`` relative to the working directory when inside it (shorter CLI lines)."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


# --------------------------------------------------------------------------- data


def read_prepared_meta(layout: Layout) -> dict[str, Any]:
    """``data/prepared/meta.json`` as a dict; a missing file names the stage to run."""
    path = layout.prepared_meta
    if not path.is_file():
        raise DataError(missing_input(path))
    try:
        meta = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: not readable JSON ({exc})") from None
    missing = [k for k in ("classes", "image_size", "channels", "mean", "std") if k not in meta]
    if missing:
        raise DataError(f"{path}: missing key(s) {missing}")
    return dict(meta)


def load_split(layout: Layout, split: str, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """``(x uint8 NHWC, y int64)`` of a prepared split, checked for shape and label range."""
    path = layout.split_npz(split)
    if not path.is_file():
        raise DataError(missing_input(path))
    arrays = read_npz(path, ("x", "y"))
    x, y = arrays["x"], arrays["y"]
    if x.dtype != np.uint8 or x.ndim != 4:
        raise DataError(f"{path}: 'x' must be uint8 (N, H, W, C), got {x.dtype} {x.shape}")
    if y.ndim != 1 or len(y) != len(x) or not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"{path}: 'y' must be {len(x)} integer labels, got {y.dtype} {y.shape}")
    if len(y) and (y.min() < 0 or y.max() >= num_classes):
        raise DataError(f"{path}: labels outside 0..{num_classes - 1}: [{y.min()}, {y.max()}]")
    return x, y.astype(np.int64, copy=False)


def _check_geometry(x: np.ndarray, spec: PreprocessSpec, source: Path) -> None:
    expected = (spec.image_size, spec.image_size, spec.channels)
    if tuple(x.shape[1:]) != expected:
        raise DataError(f"{source}: images are {x.shape[1:]}, meta.json says {expected}")


# --------------------------------------------------------------------------- pieces


def resolve_device(requested: str) -> torch.device:
    """``cpu``, ``cuda`` (an error when absent) or ``auto`` (cuda when present)."""
    import torch

    if requested == "cuda" and not torch.cuda.is_available():
        raise ModelError("train.device is 'cuda' but no CUDA device is available (use cpu/auto)")
    if requested in ("cuda", "auto") and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


def rank_device(device: torch.device, ctx: DistContext | None) -> torch.device:
    """The device of this process: ``cuda:LOCAL_RANK`` for a DDP rank on CUDA."""
    import torch

    if ctx is not None and device.type == "cuda":
        return torch.device("cuda", ctx.local_rank)
    return device


def mixed_precision_dtype(amp: bool, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``train.amp``: None on the CPU or when off (CUDA only)."""
    import torch

    if not amp or device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def shift_offsets(n: int, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Random ``(2, n)`` row/column offsets in ``[0, 2 * max_shift]`` for :func:`shift_batch`."""
    import torch

    return torch.randint(0, 2 * max_shift + 1, (2, n), generator=generator)


def shift_batch(
    x: torch.Tensor,
    max_shift: int,
    fill: torch.Tensor,
    generator: torch.Generator,
    offsets: torch.Tensor | None = None,
) -> torch.Tensor:
    """Translate every image of ``x (N, C, H, W)`` by its own random offset in
    ``[-max_shift, max_shift]`` pixels; uncovered pixels get ``fill`` (per channel).

    Whole-batch tensor ops (pad, then gather rows and columns); the offsets come from
    ``generator`` (on the CPU) so runs and resumed runs repeat exactly. DDP ranks pass
    their columns of ``offsets`` drawn for the whole global batch instead, which keeps
    every rank's generator in step.
    """
    import torch

    if max_shift <= 0:
        return x
    n, c, h, w = x.shape
    s = max_shift
    padded = fill.to(x.device, x.dtype).view(1, c, 1, 1).expand(n, c, h + 2 * s, w + 2 * s)
    padded = padded.clone()
    padded[:, :, s : s + h, s : s + w] = x
    if offsets is None:
        offsets = shift_offsets(n, max_shift, generator)
    offsets = offsets.to(x.device)
    rows = offsets[0, :, None] + torch.arange(h, device=x.device)
    cols = offsets[1, :, None] + torch.arange(w, device=x.device)
    padded = padded.gather(2, rows[:, None, :, None].expand(n, c, h, w + 2 * s))
    return padded.gather(3, cols[:, None, None, :].expand(n, c, h, w))


def steps_per_epoch(n: int, batch_size: int, world_size: int = 1) -> int:
    """Batches per epoch; a last batch too small to give every process two images is
    dropped (BatchNorm needs two): alone, that is a lone leftover image."""
    steps = math.ceil(n / batch_size)
    leftover = n - (steps - 1) * batch_size  # a full batch is never dropped
    return steps - 1 if steps > 1 and leftover < min(batch_size, 2 * world_size) else steps


def evaluate_logits(
    model: torch.nn.Module, x: torch.Tensor, batch_size: int, channels_last: bool = False
) -> torch.Tensor:
    """Logits of ``model`` (put in eval mode) for every row of ``x``, batched, no grad."""
    import torch

    model.eval()
    outs = []
    with torch.no_grad():
        for i in range(0, len(x), batch_size):
            xb = x[i : i + batch_size]
            if channels_last:
                xb = xb.contiguous(memory_format=torch.channels_last)
            outs.append(model(xb).float())
    if not outs:
        return torch.empty(0, 0)
    return torch.cat(outs)


@contextmanager
def _torch_settings(num_threads: int) -> Iterator[None]:
    """Threads and deterministic algorithms for the run, restored afterwards."""
    import torch
    import torch.utils.deterministic

    saved = (
        torch.get_num_threads(),
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        torch.utils.deterministic.fill_uninitialized_memory,  # type: ignore[attr-defined]
    )
    torch.set_num_threads(num_threads)
    # warn_only: an op without a deterministic kernel (some CUDA ones) warns, not fails.
    torch.use_deterministic_algorithms(True, warn_only=True)
    # Filling every torch.empty with NaN costs time and changes no result here.
    torch.utils.deterministic.fill_uninitialized_memory = False  # type: ignore[attr-defined]
    try:
        yield
    finally:
        torch.set_num_threads(saved[0])
        torch.use_deterministic_algorithms(saved[1], warn_only=saved[2])
        torch.utils.deterministic.fill_uninitialized_memory = saved[3]  # type: ignore[attr-defined]


def _usable_cores() -> int:
    """Cores this process may run on (a container's CPU set, not the host's count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not available on macOS
        return os.cpu_count() or 1


def _write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2) + "\n")


def progress_bar(enabled: bool = True) -> Any:
    """A transient rich progress bar on stderr, silent when stderr is not a terminal.

    Its rows show ``task.description``, a bar, done/total, ``task.fields["status"]`` and
    the elapsed and remaining time.
    """
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    console = Console(stderr=True)
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=True,
        disable=not (enabled and console.is_terminal and sys.stderr.isatty()),
    )


# --------------------------------------------------------------------------- the run


def run_train(
    params: Params,
    layout: Layout,
    model_name: str,
    resume: bool = False,
    on_epoch: EpochCallback | None = None,
    show_progress: bool = True,
) -> TrainResult:
    """Train ``model_name`` on the prepared train split, select on the val split.

    ``on_epoch(metrics, epoch)`` is called after every epoch (after the checkpoint is
    written) with ``train_loss``, ``train_accuracy``, ``val_loss``, ``val_accuracy`` and
    ``lr``; the CLI passes MLflow's ``log_metrics``. With ``resume=True`` training
    continues from ``checkpoints/last.pt`` (or starts afresh when there is none).
    ``show_progress=False`` hides the progress bar (a caller showing its own).

    Inside an initialised process group (torchrun, :func:`main`) this process is one DDP
    rank: every rank returns the same result, only rank 0 writes files and calls
    ``on_epoch``.
    """
    from visionops.data.transforms import PreprocessSpec
    from visionops.models.zoo import build_model

    started = time.perf_counter()
    tp = params.train
    meta = read_prepared_meta(layout)
    classes = [str(c) for c in meta["classes"]]
    spec = PreprocessSpec.from_meta(meta)
    x_train, y_train = load_split(layout, "train", len(classes))
    x_val, y_val = load_split(layout, "val", len(classes))
    _check_geometry(x_train, spec, layout.split_npz("train"))
    _check_geometry(x_val, spec, layout.split_npz("val"))
    if len(x_train) < 2 or len(x_val) < 1:
        raise DataError(
            f"{layout.prepared_dir}: need at least 2 training and 1 validation images, "
            f"got {len(x_train)} and {len(x_val)}"
        )
    # Fail on an unknown architecture (or a missing checkpoint file) before any work.
    build_model(model_name, spec.channels, spec.image_size, len(classes), tp.width, tp.dropout)
    if not isinstance(tp.pretrained, bool) and not Path(tp.pretrained).expanduser().is_file():
        raise ConfigError(f"train.pretrained: checkpoint file not found: {tp.pretrained}")
    ctx = distributed.current()
    device = rank_device(resolve_device(tp.device), ctx)
    world = ctx.world_size if ctx else 1
    if world > 1 and min(tp.batch_size, len(x_train)) < 2 * world:
        raise ConfigError(
            f"train.batch_size={tp.batch_size} over {len(x_train)} images leaves fewer than "
            f"2 images per process for {world} processes"
        )
    threads = tp.num_threads or distributed.threads_per_rank(
        _usable_cores(), ctx.local_world_size if ctx else 1
    )

    with _torch_settings(threads):
        return _train(
            params, layout, model_name, resume, on_epoch, device, spec, classes, started,
            (x_train, y_train, x_val, y_val), show_progress, ctx,
        )  # fmt: skip


def _validate(
    model: torch.nn.Module,
    x_val: torch.Tensor,
    y_val: torch.Tensor,
    batch_size: int,
    channels_last: bool,
    ctx: DistContext | None,
) -> tuple[float, float]:
    """``(val_loss, val_accuracy)``; DDP ranks each score a shard and add up the sums."""
    import torch.nn.functional as F

    if ctx is None or ctx.world_size == 1:
        val_logits = evaluate_logits(model, x_val, batch_size, channels_last)
        val_loss = float(F.cross_entropy(val_logits, y_val).item())
        return val_loss, float((val_logits.argmax(1) == y_val).float().mean().item())
    lo, hi = distributed.shard_bounds(len(x_val), ctx.rank, ctx.world_size)
    loss_sum, correct = 0.0, 0.0
    if hi > lo:
        logits = evaluate_logits(model, x_val[lo:hi], batch_size, channels_last)
        loss_sum = float(F.cross_entropy(logits, y_val[lo:hi], reduction="sum").item())
        correct = float((logits.argmax(1) == y_val[lo:hi]).sum().item())
    loss_sum, correct = distributed.all_reduce_sums([loss_sum, correct], ctx)
    return loss_sum / len(x_val), correct / len(x_val)


def _train(
    params: Params,
    layout: Layout,
    model_name: str,
    resume: bool,
    on_epoch: EpochCallback | None,
    device: torch.device,
    spec: PreprocessSpec,
    classes: list[str],
    started: float,
    arrays: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray],
    show_progress: bool = True,
    ctx: DistContext | None = None,
) -> TrainResult:
    import torch
    import torch.nn.functional as F
    from torch.utils.tensorboard import SummaryWriter

    from visionops import recipe
    from visionops.data.transforms import normalize
    from visionops.models.names import MODEL_NAMES
    from visionops.models.zoo import build_model, count_parameters

    tp = params.train
    rank, world = (ctx.rank, ctx.world_size) if ctx else (0, 1)
    is_main = rank == 0
    torch.manual_seed(params.seed)
    generator = torch.Generator().manual_seed(params.seed)
    is_timm = model_name not in MODEL_NAMES
    pretrained = tp.pretrained if is_timm else False
    if tp.pretrained is not False and not is_timm:
        log.info("train.pretrained applies to timm models; %s starts from scratch", model_name)
    model = build_model(
        model_name, spec.channels, spec.image_size, len(classes), tp.width, tp.dropout, pretrained
    ).to(device)
    channels_last = device.type == "cpu" and model.prefers_channels_last
    if channels_last:
        model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    # `net` is what the training steps call: the model, or its DDP / compiled wrapper.
    # State dicts, validation and outputs always use the plain `model`.
    net: Any = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        net = DistributedDataParallel(
            model,
            device_ids=[device.index] if device.type == "cuda" else None,
            gradient_as_bucket_view=True,  # gradients live in the all-reduce buckets: no copies
        )
    if tp.compile and device.type == "cuda":
        net = torch.compile(net)
    elif tp.compile:
        log.info("train.compile applies on CUDA only; training uncompiled on %s", device)
    amp_dtype = mixed_precision_dtype(tp.amp, device)
    if tp.amp and amp_dtype is None:
        log.info("train.amp applies on CUDA only; training in float32 on %s", device)
    scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None

    x_train = torch.from_numpy(normalize(arrays[0], spec)).to(device)
    y_train = torch.from_numpy(arrays[1]).to(device)
    x_val = torch.from_numpy(normalize(arrays[2], spec)).to(device)
    y_val = torch.from_numpy(arrays[3]).to(device)
    n_train = len(x_train)
    batch_size = min(recipe.scaled_batch_size(tp.batch_size, n_train), n_train)
    n_steps = steps_per_epoch(n_train, batch_size, world)
    epochs = recipe.planned_epochs(tp, n_steps)
    patience = recipe.early_stop_patience(tp, epochs)
    natural = spec.kind == "natural"
    mean_t, std_t = torch.tensor(spec.mean), torch.tensor(spec.std)
    run_recipe = recipe.recipe_record(tp, spec.kind, batch_size, epochs, n_steps)
    if pretrained is not False:
        run_recipe["pretrained"] = str(pretrained) if not isinstance(pretrained, bool) else True
        run_recipe["backbone_lr_scale"] = tp.backbone_lr_scale
    # The value of a black pixel after normalisation: what a shift uncovers.
    fill = -torch.tensor(spec.mean) / torch.tensor(spec.std)
    fill = fill.expand(spec.channels).clone()
    mean = torch.tensor(spec.mean).expand(spec.channels)
    std = torch.tensor(spec.std).expand(spec.channels)

    groups: Any = model.parameters()
    peak_lr = recipe.peak_lr(tp, spec.kind)
    max_lr: float | list[float] = peak_lr
    if pretrained is not False:  # fine-tuning: the pretrained backbone moves more slowly
        groups = model.parameter_groups(peak_lr, tp.backbone_lr_scale)
        max_lr = [g["lr"] for g in groups]
    optimizer = torch.optim.AdamW(groups, lr=peak_lr, weight_decay=tp.weight_decay)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=max_lr, total_steps=epochs * n_steps
    )
    model_dir = layout.model_dir(model_name)
    ckpt_path = model_dir / "checkpoints" / "last.pt"
    fingerprint = run_fingerprint(params, model_name, arrays, world)

    state = RunState()
    found = resume and ckpt_path.is_file()
    if resume and not distributed.all_agree(found, ctx):
        raise ModelError(
            f"{ckpt_path} exists for some processes only: resuming on several machines "
            "needs the checkpoint folder on a shared filesystem"
        )
    if found:
        state = load_checkpoint(
            ckpt_path, model, optimizer, scheduler, generator, fingerprint, scaler
        )
        log.info("resuming %s after epoch %d from %s", model_name, state.epoch, ckpt_path)
    elif resume:
        log.warning("no checkpoint at %s; training %s from scratch", ckpt_path, model_name)
    resumed_from, seconds_before = state.epoch, state.seconds
    log.info(
        "training %s (%s params) on %d images, %d val, %d epochs x %d steps, %s, %d threads%s",
        model_name, f"{count_parameters(model):,}", n_train, len(x_val), epochs, n_steps,
        device, torch.get_num_threads(), f", {world} DDP processes" if world > 1 else "",
    )  # fmt: skip

    writer = (
        SummaryWriter(log_dir=str(layout.tensorboard_dir / model_name), purge_step=state.epoch + 1)
        if is_main
        else None
    )
    try:
        with progress_bar(enabled=show_progress and is_main) as progress:
            task = progress.add_task(model_name, total=epochs * n_steps, status="")
            progress.update(task, completed=state.epoch * n_steps)
            while not state.finished:
                epoch = state.epoch + 1
                epoch_start = time.perf_counter()
                net.train()
                perm = torch.randperm(n_train, generator=generator).to(device)
                loss_sum, correct, seen, lr = 0.0, 0, 0, peak_lr
                for step in range(n_steps):
                    idx = perm[step * batch_size : (step + 1) * batch_size]
                    n_global = len(idx)
                    # Offsets for the whole global batch: every rank's generator stays in step.
                    offsets = (
                        shift_offsets(n_global, tp.max_shift, generator)
                        if tp.augment and tp.max_shift > 0 and not natural
                        else None
                    )
                    natural_draws = (
                        recipe.draw_natural(n_global, tp, generator)
                        if tp.augment and natural
                        else None
                    )
                    # The digit augmentations are for digits; photos get their own above.
                    draws = (
                        augment.draw_augmentation(n_global, tp, generator)
                        if augment.is_enabled(tp) and not natural
                        else None
                    )
                    if world > 1:
                        lo, hi = distributed.shard_bounds(n_global, rank, world)
                        idx = idx[lo:hi]
                        offsets = offsets[:, lo:hi] if offsets is not None else None
                        draws = draws.rows(lo, hi) if draws is not None else None
                        natural_draws = natural_draws[lo:hi] if natural_draws is not None else None
                    xb, yb = x_train[idx], y_train[idx]
                    if offsets is not None:
                        xb = shift_batch(xb, tp.max_shift, fill, generator, offsets)
                    if draws is not None:
                        xb = augment.augment_batch(xb, draws, mean, std)
                    if natural_draws is not None:
                        xb = recipe.augment_natural(xb, natural_draws, mean_t, std_t)
                    if channels_last:
                        xb = xb.contiguous(memory_format=torch.channels_last)
                    with torch.autocast(
                        device.type, dtype=amp_dtype, enabled=amp_dtype is not None
                    ):
                        logits = net(xb)
                        loss = F.cross_entropy(logits, yb, label_smoothing=tp.label_smoothing)
                    # DDP averages gradients over ranks; weighting by the chunk's share
                    # makes that the global batch's mean when chunks differ in size.
                    weighted = loss * (len(yb) * world / n_global) if world > 1 else loss
                    optimizer.zero_grad(set_to_none=True)
                    if scaler is not None:
                        scaler.scale(weighted).backward()
                        scaler.step(optimizer)
                        scaler.update()
                    else:
                        weighted.backward()
                        optimizer.step()
                    lr = float(optimizer.param_groups[0]["lr"])
                    scheduler.step()
                    # .item() syncs; cheap on CPU, and once per batch is fine on GPU too.
                    loss_sum += float(loss.item()) * len(yb)
                    correct += int((logits.argmax(1) == yb).sum().item())
                    seen += len(yb)
                    if step % 20 == 0 or step == n_steps - 1:
                        progress.update(
                            task,
                            completed=(epoch - 1) * n_steps + step + 1,
                            description=f"{model_name} epoch {epoch}/{epochs}",
                            status=f"loss {loss_sum / seen:.4f}",
                        )
                step_seconds = time.perf_counter() - epoch_start
                if world > 1:
                    loss_sum, total_correct, total_seen = distributed.all_reduce_sums(
                        [loss_sum, correct, seen], ctx
                    )
                    correct, seen = round(total_correct), round(total_seen)
                    distributed.broadcast_buffers(model, ctx)

                val_loss, val_accuracy = _validate(
                    model, x_val, y_val, params.evaluate.batch_size, channels_last, ctx
                )
                row = {
                    "epoch": epoch,
                    "train_loss": loss_sum / seen,
                    "train_accuracy": correct / seen,
                    "val_loss": val_loss,
                    "val_accuracy": val_accuracy,
                    "lr": lr,
                }
                state.history.append(row)
                state.epoch = epoch
                state.images_seen += seen
                state.step_seconds += step_seconds
                state.seconds += time.perf_counter() - epoch_start
                if val_loss < state.best_val_loss:
                    state.best_val_accuracy, state.best_val_loss = val_accuracy, val_loss
                    state.best_epoch, state.bad_epochs = epoch, 0
                    state.best_state = {
                        k: v.detach().clone() for k, v in model.state_dict().items()
                    }
                else:
                    state.bad_epochs += 1
                if state.bad_epochs >= patience and epoch < epochs:
                    state.finished = state.stopped_early = True
                    log.info("early stop after epoch %d: no val loss gain in %d", epoch, patience)
                state.finished = state.finished or epoch >= epochs
                if is_main:
                    save_checkpoint(
                        ckpt_path, model, optimizer, scheduler, state, generator, fingerprint,
                        scaler,
                    )  # fmt: skip
                log.info(
                    "%s epoch %d/%d: train loss %.4f acc %.4f | val loss %.4f acc %.4f | %.1f s",
                    model_name, epoch, epochs, row["train_loss"], row["train_accuracy"],
                    val_loss, val_accuracy, time.perf_counter() - epoch_start,
                )  # fmt: skip
                # Same tags for every model: TensorBoard overlays runs/cnn, runs/mlp, ...
                if writer is not None:
                    for key, tag in TENSORBOARD_TAGS.items():
                        writer.add_scalar(tag, row[key], epoch)
                    writer.flush()
                if on_epoch is not None and is_main:
                    on_epoch({k: float(v) for k, v in row.items() if k != "epoch"}, epoch)
    finally:
        if writer is not None:
            writer.close()

    if state.best_state is None:  # pragma: no cover - at least one epoch always runs
        raise ModelError(f"{model_name}: no epoch completed")
    n_params = count_parameters(model)
    images_per_second = state.images_seen / state.step_seconds if state.step_seconds else 0.0
    # This call's wall time plus the epochs that interrupted earlier calls completed.
    train_seconds = seconds_before + (time.perf_counter() - started)
    result = TrainResult(
        model_name=model_name,
        model_dir=model_dir,
        val_accuracy=state.best_val_accuracy,
        val_loss=state.best_val_loss,
        best_epoch=state.best_epoch,
        epochs_run=state.epoch,
        stopped_early=state.stopped_early,
        resumed_from_epoch=resumed_from,
        train_seconds=train_seconds,
        images_per_second=images_per_second,
        params=n_params,
        history=list(state.history),
    )
    if is_main:
        _write_outputs(params, layout, result, state.best_state, spec, classes, run_recipe)
    distributed.barrier(ctx)  # the other ranks end once rank 0 has written
    return result


def _write_outputs(
    params: Params,
    layout: Layout,
    result: TrainResult,
    best_state: dict[str, Any],
    spec: PreprocessSpec,
    classes: list[str],
    run_recipe: dict[str, Any] | None = None,
) -> None:
    import torch

    tp = params.train
    result.model_dir.mkdir(parents=True, exist_ok=True)
    # Contiguous copies: the CPU run keeps conv weights channels_last, readers need not care.
    torch.save(
        {k: v.detach().cpu().contiguous() for k, v in best_state.items()},
        result.model_dir / "model.pt",
    )
    config = {
        "architecture": result.model_name,
        "in_channels": spec.channels,
        "image_size": spec.image_size,
        "num_classes": len(classes),
        "width": tp.width,
        "dropout": tp.dropout,
        "augmentation": augment.describe(tp),
        "classes": classes,
        "preprocess": spec.to_dict(),
        "best_epoch": result.best_epoch,
        "val_accuracy": result.val_accuracy,
        "val_loss": result.val_loss,
        "params": result.params,
        "seed": params.seed,
        "recipe": run_recipe or {},
    }
    _write_json(result.model_dir / "config.json", config)
    _write_json(
        layout.train_metrics(result.model_name),
        {
            "val_accuracy": result.val_accuracy,
            "val_loss": result.val_loss,
            "best_epoch": result.best_epoch,
            "epochs_run": result.epochs_run,
            "stopped_early": result.stopped_early,
            "train_seconds": round(result.train_seconds, 2),
            "images_per_second": round(result.images_per_second, 1),
            "params": result.params,
        },
    )
    _write_json(layout.learning_curve(result.model_name), result.history)
    log.info("wrote %s", result.model_dir)


# --------------------------------------------------------------------------- entry point


def launch_distributed(
    params_file: str | Path, overrides: Sequence[str], model_name: str, nproc: int, resume: bool
) -> None:
    """Train with ``nproc`` DDP processes on this machine: ``torchrun --standalone
    --nproc-per-node nproc -m visionops.train MODEL ...`` in the foreground.

    What ``visionops train --nproc K`` (or ``train.nproc: K``) runs. Raises
    :class:`ModelError` when a rank fails; its message is above in the output.
    """
    if distributed.launched_by_torchrun():
        raise ConfigError(
            "already running under torchrun: run `python -m visionops.train` as the worker "
            "instead of launching another torchrun (leave train.nproc at 1)"
        )
    args = ["-m", "visionops.train", model_name, "--params", str(params_file)]
    for item in [*overrides, f"train.nproc={nproc}"]:
        args += ["--set", item]
    if resume:
        args.append("--resume")
    code = distributed.launch(distributed.torchrun_command(nproc, args))
    if code != 0:
        raise ModelError(
            f"distributed training of {model_name} on {nproc} processes failed "
            f"(torchrun exit code {code}); the failing rank's message is above"
        )


def _train_tracked(
    params: Params, layout: Layout, model_name: str, resume: bool, ctx: DistContext | None
) -> TrainResult:
    """``run_train`` in a tracked MLflow stage run on rank 0 (as ``visionops train``)."""
    from visionops.stages import declared_view

    declared = declared_view(params, "train")  # only the params the stage declares
    if ctx is not None and not ctx.is_main:
        return run_train(declared, layout, model_name, resume=resume)
    from visionops import registry

    with registry.stage_run(f"train-{model_name}", params, layout) as tracker:
        if ctx is not None:
            tracker.set_tags({"visionops.world_size": ctx.world_size})
        result = run_train(
            declared, layout, model_name, resume=resume, on_epoch=tracker.log_metrics
        )
        tracker.log_metrics(result.summary())
        tracker.log_artifacts(layout.model_dir(model_name), "model")
    return result


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m visionops.train MODEL [--params FILE] [--set key=value ...] [--resume]``.

    The command torchrun starts on every rank (``torchrun --nproc-per-node K -m
    visionops.train cnn``), and a plain single-process ``visionops train`` without
    torchrun. Rank 0 tracks the run in MLflow and prints the result line; an error is one
    line on stderr and exit code 2.
    """
    import argparse

    # Read by torch and MLflow when they load, i.e. after this point.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS
    parser = argparse.ArgumentParser(
        prog="python -m visionops.train",
        description="Train one architecture of the zoo (one DDP rank under torchrun).",
    )
    parser.add_argument(
        "model", help="architecture from the zoo: mlp, cnn, resnet or a timm model name"
    )
    parser.add_argument("--params", "-p", default="params.yaml", help="params file (YAML)")
    parser.add_argument(
        "--set", "-s", dest="overrides", action="append", default=[], help="key=value"
    )
    parser.add_argument("--resume", action="store_true", help="continue from the checkpoint")
    args = parser.parse_args(argv)

    rank = int(os.environ.get("RANK", "0") or 0)
    level = os.environ.get("VISIONOPS_LOG_LEVEL", "INFO").upper() if rank == 0 else "WARNING"
    where = f" [rank {rank}]" if distributed.launched_by_torchrun() else ""
    logging.basicConfig(level=level, format=f"%(levelname)s %(name)s{where}: %(message)s")
    for noisy in ("alembic", "mlflow", "urllib3", "matplotlib", "PIL", "git"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    from visionops.config import load_params
    from visionops.layout import Layout
    from visionops.stages import check_overrides

    try:
        check_overrides("train", args.overrides)
        params = load_params(args.params, args.overrides)
        layout = Layout.at(Path.cwd())
        device = resolve_device(params.train.device)
        with distributed.process_group(device.type) as ctx:
            result = _train_tracked(params, layout, args.model, args.resume, ctx)
    except VisionOpsError as exc:
        print(f"error{where}: {exc}", file=sys.stderr)
        return 2
    if rank == 0:
        print(f"trained {result.describe()}")
    return 0


if __name__ == "__main__":  # pragma: no cover - `python -m visionops.train`, torchrun's target
    # Run the imported module's main, not this __main__ copy: one set of classes.
    from visionops.train import main as _main

    sys.exit(_main())
