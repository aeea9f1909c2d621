"""Training checkpoints: the run state, its fingerprint, save and load.

``checkpoints/last.pt`` holds the model, optimizer, scheduler (and loss scaler), the
history, early-stopping state and both RNG states after every epoch, so a resumed run
reaches exactly the weights of an uninterrupted one. It holds only tensors, dicts,
lists, strings and numbers and is read with ``torch.load(weights_only=True)``. The
fingerprint (train params, seed, model and a digest of the data) must match for a
checkpoint to be resumed.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from visionops.errors import ModelError

if TYPE_CHECKING:
    import torch

    from visionops.config import Params

CHECKPOINT_FORMAT = 1


@dataclass
class RunState:
    """Everything besides model/optimizer/scheduler that a checkpoint must restore."""

    epoch: int = 0  # epochs completed
    history: list[dict[str, float]] = field(default_factory=list)
    best_state: dict[str, Any] | None = None
    best_val_accuracy: float = -1.0
    best_val_loss: float = math.inf
    best_epoch: int = 0
    bad_epochs: int = 0
    finished: bool = False
    stopped_early: bool = False
    seconds: float = 0.0  # wall time of the epochs so far (train + validation)
    step_seconds: float = 0.0  # time inside training steps only
    images_seen: int = 0


def run_fingerprint(
    params: Params, model_name: str, arrays: Sequence[np.ndarray], world_size: int = 1
) -> dict[str, Any]:
    """What must not change between an interrupted run and its resumption."""
    # Where and how fast it runs does not change the maths; amp and the number of
    # processes do (recorded only when used, so older checkpoints stay resumable).
    runtime = {"models", "num_threads", "device", "compile", "nproc", "amp"}
    tp = params.train.model_dump(mode="json", exclude=runtime)
    if params.train.amp:
        tp["amp"] = True
    if world_size > 1:
        tp["world_size"] = world_size
    digest = hashlib.blake2b(digest_size=16)
    for a in arrays:  # ~50 MB for MNIST: a few tens of milliseconds
        digest.update(str((a.dtype, a.shape)).encode())
        digest.update(np.ascontiguousarray(a).data)
    return {"model": model_name, "seed": params.seed, "data": digest.hexdigest(), **tp}


def save_checkpoint(
    path: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    state: RunState,
    generator: torch.Generator,
    fingerprint: dict[str, Any],
    scaler: Any = None,
) -> None:
    import torch

    rng: dict[str, Any] = {"torch": torch.get_rng_state(), "shuffle": generator.get_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    checkpoint = {
        "format": CHECKPOINT_FORMAT,
        "fingerprint": fingerprint,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "epoch": state.epoch,
        "history": state.history,
        "best_state": state.best_state,
        "best_val_accuracy": state.best_val_accuracy,
        "best_val_loss": state.best_val_loss,
        "best_epoch": state.best_epoch,
        "bad_epochs": state.bad_epochs,
        "finished": state.finished,
        "stopped_early": state.stopped_early,
        "seconds": state.seconds,
        "step_seconds": state.step_seconds,
        "images_seen": state.images_seen,
        "rng": rng,
    }
    if scaler is not None:  # float16 autocast on CUDA: the loss scale
        checkpoint["scaler"] = scaler.state_dict()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(checkpoint, tmp)
    os.replace(tmp, path)  # a kill mid-write never leaves a truncated last.pt


def load_checkpoint(
    path: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    generator: torch.Generator,
    fingerprint: dict[str, Any],
    scaler: Any = None,
) -> RunState:
    import torch

    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # unpickling errors come in many types
        raise ModelError(f"{path}: cannot read checkpoint ({exc})") from None
    if not isinstance(ck, dict) or ck.get("format") != CHECKPOINT_FORMAT:
        raise ModelError(f"{path}: not a visionops checkpoint (format {CHECKPOINT_FORMAT})")
    saved = ck["fingerprint"]
    changed = sorted(k for k in set(saved) | set(fingerprint) if saved.get(k) != fingerprint.get(k))
    if changed:
        diffs = ", ".join(f"{k}: {saved.get(k)!r} -> {fingerprint.get(k)!r}" for k in changed)
        raise ModelError(
            f"{path} was written with different settings ({diffs}); train without --resume"
        )
    model.load_state_dict(ck["model"])
    optimizer.load_state_dict(ck["optimizer"])
    scheduler.load_state_dict(ck["scheduler"])
    if scaler is not None and "scaler" in ck:
        scaler.load_state_dict(ck["scaler"])
    torch.set_rng_state(ck["rng"]["torch"])
    generator.set_state(ck["rng"]["shuffle"])
    if "cuda" in ck["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(ck["rng"]["cuda"])
    return RunState(
        epoch=int(ck["epoch"]),
        history=list(ck["history"]),
        best_state=ck["best_state"],
        best_val_accuracy=float(ck["best_val_accuracy"]),
        best_val_loss=float(ck["best_val_loss"]),
        best_epoch=int(ck["best_epoch"]),
        bad_epochs=int(ck["bad_epochs"]),
        finished=bool(ck["finished"]),
        stopped_early=bool(ck["stopped_early"]),
        seconds=float(ck["seconds"]),
        step_seconds=float(ck["step_seconds"]),
        images_seen=int(ck["images_seen"]),
    )
