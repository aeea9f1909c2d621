"""Distributed data-parallel training: process group, ranks, the data split, metric sums.

``torchrun`` (``python -m torch.distributed.run``) starts one process per rank and tells
each its place through the environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``LOCAL_WORLD_SIZE``, ``MASTER_ADDR``/``MASTER_PORT``). :func:`process_group` reads it and
joins the group (gloo on the CPU, nccl on CUDA); :func:`current` tells the training loop
whether it runs distributed. Nothing here reads the environment or imports torch at import
time.

How :mod:`visionops.train` uses it:

- Every rank draws the same seeded permutation of the (in-memory) training set each
  epoch; each global batch of ``train.batch_size`` images is cut into one contiguous
  chunk per rank (:func:`shard_bounds`), so the ranks together see every image once per
  epoch and the optimisation (steps per epoch, batch size, learning-rate schedule) is the
  single-process one.
- ``DistributedDataParallel`` averages the gradients; per-epoch loss/accuracy sums and
  the sharded validation are added up with :func:`all_reduce_sums`, so every rank takes
  the same early-stopping decision.
- Only rank 0 writes: checkpoints, ``model.pt``, metrics, TensorBoard, MLflow.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING

from visionops.errors import ConfigError, ModelError

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

#: Environment variables torchrun sets for every worker.
TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")


@dataclass(frozen=True)
class DistContext:
    """Where this process stands in the process group."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def backend_for(device_type: str) -> str:
    """nccl between GPUs, gloo between CPU processes."""
    return "nccl" if device_type == "cuda" else "gloo"


def launched_by_torchrun() -> bool:
    """True inside a worker started by torchrun (the variables it sets are present)."""
    return all(name in os.environ for name in TORCHRUN_ENV[:2])


def env_world_size() -> int:
    """``WORLD_SIZE`` from torchrun's environment (1 outside torchrun)."""
    raw = os.environ.get("WORLD_SIZE", "1")
    try:
        return max(1, int(raw))
    except ValueError:
        raise ConfigError(f"WORLD_SIZE={raw!r} is not an integer") from None


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    try:
        return int(raw) if raw is not None else default
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not an integer") from None


def current() -> DistContext | None:
    """The process group this process belongs to, or None when training alone."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return None
    world = dist.get_world_size()
    return DistContext(
        rank=dist.get_rank(),
        world_size=world,
        local_rank=_env_int("LOCAL_RANK", 0),
        local_world_size=_env_int("LOCAL_WORLD_SIZE", world),
        backend=str(dist.get_backend()),
    )


@contextmanager
def process_group(device_type: str, timeout_s: float = 1800.0) -> Iterator[DistContext | None]:
    """Join torchrun's process group for the duration of the block (None when alone).

    Outside torchrun, or with ``WORLD_SIZE=1``, nothing is initialised and the block runs
    as plain single-process code. On CUDA each rank is pinned to GPU ``LOCAL_RANK``.
    """
    import torch
    import torch.distributed as dist

    if env_world_size() <= 1 or dist.is_initialized():
        yield current()
        return
    if not dist.is_available():  # pragma: no cover - every official build has it
        raise ModelError("this torch build has no torch.distributed")
    backend = backend_for(device_type)
    local_rank = _env_int("LOCAL_RANK", 0)
    if device_type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise ModelError(
                f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} CUDA device(s): "
                "start at most one process per GPU (--nproc-per-node)"
            )
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s))
    ctx = current()
    assert ctx is not None
    log.debug("rank %d/%d joined the %s process group", ctx.rank, ctx.world_size, backend)
    try:
        yield ctx
    finally:
        dist.destroy_process_group()


def threads_per_rank(cores: int, local_world_size: int) -> int:
    """Intra-op threads for each of ``local_world_size`` processes sharing ``cores``."""
    return max(1, cores // max(1, local_world_size))


def shard_bounds(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """``[start, stop)`` of rank ``rank``'s contiguous chunk of ``n`` items.

    Chunk sizes differ by at most one (the first ``n % world_size`` ranks get one more),
    the chunks are disjoint and together cover ``range(n)`` -- ``torch.tensor_split``'s rule.
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in a world of {world_size}")
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def all_reduce_sums(values: Sequence[float], ctx: DistContext | None) -> list[float]:
    """Element-wise sums of ``values`` over every rank (the values themselves when alone).

    Float64, so counts and sums of losses add up exactly enough; on nccl the tensor
    travels through the rank's GPU.
    """
    if ctx is None or ctx.world_size == 1:
        return [float(v) for v in values]
    import torch
    import torch.distributed as dist

    device = torch.device("cuda", torch.cuda.current_device()) if ctx.backend == "nccl" else None
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return [float(v) for v in t.cpu().tolist()]


def all_agree(flag: bool, ctx: DistContext | None) -> bool:
    """Whether every rank passed the same ``flag``."""
    if ctx is None or ctx.world_size == 1:
        return True
    total = all_reduce_sums([1.0 if flag else 0.0], ctx)[0]
    return total in (0.0, float(ctx.world_size))


def broadcast_buffers(model: torch.nn.Module, ctx: DistContext | None) -> None:
    """Copy rank 0's buffers (BatchNorm running statistics) to every rank.

    DDP broadcasts them at the start of every forward pass, so after the last training
    step of an epoch each rank holds the statistics of its own last batch; validation
    must use one model.
    """
    if ctx is None or ctx.world_size == 1:
        return
    import torch.distributed as dist

    for buf in model.buffers():
        dist.broadcast(buf, src=0)


def barrier(ctx: DistContext | None) -> None:
    """Wait until every rank gets here."""
    if ctx is not None and ctx.world_size > 1:
        import torch
        import torch.distributed as dist

        if ctx.backend == "nccl":  # name the rank's GPU, or nccl guesses (and warns)
            dist.barrier(device_ids=[torch.cuda.current_device()])
        else:
            dist.barrier()


def torchrun_command(nproc: int, script_args: Sequence[str]) -> list[str]:
    """``torchrun --standalone --nproc-per-node nproc <script_args>`` with this interpreter.

    ``--standalone``: one machine, a private rendezvous on a free local port.
    ``python -m torch.distributed.run`` is ``torchrun``, and with ``sys.executable`` the
    workers run in this environment. Several machines: run torchrun by hand with
    ``--nnodes`` and a rendezvous endpoint (docs/scaling.md).
    """
    if nproc < 1:
        raise ConfigError(f"nproc must be at least 1, got {nproc}")
    return [
        *[sys.executable, "-m", "torch.distributed.run"],
        *["--standalone", "--nproc-per-node", str(nproc), *script_args],
    ]


def launch(cmd: Sequence[str]) -> int:
    """Run a torchrun command line in the foreground; its exit code.

    The workers inherit stdout/stderr: rank 0's progress bar and result line show as if
    training ran in this process. ``OMP_NUM_THREADS`` is left to the training code (it
    sets threads per rank), which silences torchrun's warning about it.
    """
    import subprocess

    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    log.info("launching %s", " ".join(cmd))
    try:
        return subprocess.run(list(cmd), env=env, check=False).returncode
    except KeyboardInterrupt:  # torchrun forwards the signal to the workers itself
        return 130
