"""What the worker processes of ``visionops serve --workers N`` share: one run folder.

``run_server`` creates the folder before the workers start and removes it after they
stopped. It holds

- ``model.json`` — the model every worker must serve (folder, name, version, alias) and
  its *generation*, raised by each successful reload. A worker starting (or restarted by
  the supervisor) loads what it names; running workers poll its modification time
  (one ``stat`` every :data:`POLL_SECONDS`) and load a newer generation from the folder,
  so ``POST /v1/admin/reload`` answered by any worker reaches every worker;
- ``workers/<pid>`` — the generation each live worker serves (its acknowledgement);
- ``metrics/`` — prometheus-client's multiprocess directory.

Only folders cross process boundaries: registry URIs are resolved once, by the worker
that received the reload, so the others never touch MLflow.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import logging
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from visionops.serve.model import ResolvedModel

log = logging.getLogger(__name__)

POLL_SECONDS = 0.2
MODEL_FILE = "model.json"


@dataclass(frozen=True)
class ModelState:
    """The model all workers serve, and how many reloads produced it."""

    generation: int
    model: ResolvedModel


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # pragma: no cover - someone else's process
        return True
    return True


class WorkerGroup:
    """One worker's handle on the shared run folder."""

    def __init__(self, run_dir: Path, pid: int | None = None) -> None:
        self.run_dir = Path(run_dir)
        self.pid = pid or os.getpid()
        self._acks = self.run_dir / "workers"
        self._mtime = 0

    @property
    def metrics_dir(self) -> Path:
        return self.run_dir / "metrics"

    # ------------------------------------------------------------------ setup (parent)

    @classmethod
    def create(cls, run_dir: Path, model: ResolvedModel) -> WorkerGroup:
        """Lay out a fresh run folder serving ``model`` (generation 0)."""
        run_dir = Path(run_dir)
        (run_dir / "workers").mkdir(parents=True, exist_ok=True)
        (run_dir / "metrics").mkdir(parents=True, exist_ok=True)
        group = cls(run_dir)
        group._write(ModelState(0, model))
        return group

    # ------------------------------------------------------------------ state

    def _write(self, state: ModelState) -> None:
        m = state.model
        doc = {
            "generation": state.generation,
            "path": str(m.path),
            "name": m.name,
            "version": m.version,
            "alias": m.alias,
        }
        tmp = self.run_dir / f".{MODEL_FILE}.{self.pid}"
        tmp.write_text(json.dumps(doc))
        os.replace(tmp, self.run_dir / MODEL_FILE)  # atomic: readers see old or new

    def current(self) -> ModelState:
        """The model the workers should serve now."""
        doc = json.loads((self.run_dir / MODEL_FILE).read_text())
        model = ResolvedModel(
            path=Path(doc["path"]), name=doc["name"], version=doc["version"], alias=doc["alias"]
        )
        return ModelState(int(doc["generation"]), model)

    def publish(self, model: ResolvedModel) -> int:
        """Make ``model`` the one every worker serves; returns its generation."""
        with open(self.run_dir / ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # two reloads at once get distinct generations
            state = ModelState(self.current().generation + 1, model)
            self._write(state)
        return state.generation

    def changed(self) -> bool:
        """Whether ``model.json`` changed since the last call (one ``stat``)."""
        try:
            mtime = (self.run_dir / MODEL_FILE).stat().st_mtime_ns
        except OSError:
            return False
        if mtime == self._mtime:
            return False
        self._mtime = mtime
        return True

    # ------------------------------------------------------------------ acknowledgements

    def acknowledge(self, generation: int) -> None:
        """Record that this worker serves ``generation``."""
        (self._acks / str(self.pid)).write_text(str(generation))

    def leave(self) -> None:
        (self._acks / str(self.pid)).unlink(missing_ok=True)

    def serving(self) -> dict[int, int]:
        """Generation served by each live worker (pid -> generation)."""
        out = {}
        for f in self._acks.iterdir():
            if not f.name.isdigit():
                continue
            pid = int(f.name)
            try:
                generation = int(f.read_text() or -1)
            except (OSError, ValueError):
                continue
            if _pid_alive(pid):
                out[pid] = generation
        return out

    async def wait_for(self, generation: int, timeout: float) -> tuple[int, int]:
        """Wait until every live worker serves ``generation`` (or ``timeout`` s passed).

        Returns (workers serving it, live workers).
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            serving = self.serving()
            done = sum(1 for g in serving.values() if g >= generation)
            if done == len(serving) or loop.time() >= deadline:
                return done, len(serving)
            await asyncio.sleep(POLL_SECONDS / 2)

    async def watch(self, on_change: Callable[[ModelState], Awaitable[None]]) -> None:
        """Call ``on_change`` with each new model state, until cancelled."""
        self.changed()
        while True:
            await asyncio.sleep(POLL_SECONDS)
            if self.changed():
                try:
                    state = self.current()
                except (OSError, ValueError, KeyError):
                    continue  # mid-replace or damaged: the next poll reads it again
                await on_change(state)
