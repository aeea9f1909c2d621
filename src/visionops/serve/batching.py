"""Adaptive micro-batching: concurrent requests share one ONNX Runtime call.

A request hands its model-sized uint8 images ``(N, H, W, C)`` to :meth:`MicroBatcher.predict`.
When the model is idle the batch is scheduled for the very next turn of the event loop
(``loop.call_soon``): requests whose bodies arrived in the same turn join it, nothing
waits for a timer. While a batch is being scored the event loop is busy, so requests that
arrive meanwhile queue up in the sockets and form the next batch, up to
``max_batch_size`` images (a request is never split between batches; one larger than
``max_batch_size`` is scored in ``max_batch_size`` chunks): under load batches grow by
themselves, at idle an image runs at once. Everything per image is done per batch:
normalisation, the pixel tests and the OOD score run once on the concatenated batch
(:meth:`LoadedModel.score_pixels`), not once per request. ``max_wait_ms`` > 0 is an optional upper
bound for deployments that prefer bigger batches over latency: a batch smaller than
``max_batch_size`` then waits at most that long for company.

Scoring runs on the event loop's own thread. Measured on the project's benchmark
(``benchmarks/bench_serve.py``), handing each batch to a worker thread cost more in GIL
hand-offs and wake-ups than it won in overlap for millisecond-sized batches; parallelism
comes from running several worker processes (``visionops serve --workers N``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from visionops.serve.model import LoadedModel, Scores

log = logging.getLogger(__name__)


@dataclass
class _Item:
    model: LoadedModel
    x: np.ndarray  # (N, H, W, C) uint8, model-sized
    future: asyncio.Future[Scores]


class InferenceError(RuntimeError):
    """ONNX Runtime failed on a batch: a server fault (500), never the client's."""


class MicroBatcher:
    """Collects the image batches of concurrent requests into ONNX Runtime calls.

    Each request carries the model it was preprocessed for, so a reload in the middle of
    traffic never mixes models within one call: a batch is split by model.
    """

    def __init__(
        self,
        max_batch_size: int,
        max_wait_ms: float = 0.0,
        on_batch: Callable[[int], None] | None = None,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be >= 1")
        self.max_batch_size = max_batch_size
        self.max_wait_s = max(0.0, max_wait_ms) / 1000.0
        self._on_batch = on_batch
        self._pending: list[_Item] = []
        self._pending_images = 0
        self._scheduled: asyncio.Handle | asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._running = False
        self.batches = 0

    @property
    def running(self) -> bool:
        return self._running

    def start(self) -> None:
        """Accept predictions on the running event loop."""
        self._loop = asyncio.get_running_loop()
        self._running = True

    async def stop(self) -> None:
        """Score everything still pending, then refuse new work."""
        if self._scheduled is not None:
            self._scheduled.cancel()
            self._scheduled = None
        while self._pending:
            self._flush()
        self._running = False

    async def predict(self, model: LoadedModel, x: np.ndarray) -> Scores:
        """The :class:`Scores` of model-sized uint8 images ``(N, H, W, C)``: probabilities
        ``(N, K)``, embeddings ``(N, D)``, OOD scores ``(N,)`` (None when the model has no
        OOD calibration) and the pixel tests.

        Raises :class:`InferenceError` when the worker is stopped or ONNX Runtime fails.
        """
        if not self._running or self._loop is None:
            raise InferenceError("the prediction worker is not running")
        fut: asyncio.Future[Scores] = self._loop.create_future()
        self._pending.append(_Item(model, x, fut))
        self._pending_images += len(x)
        if self._pending_images >= self.max_batch_size:
            self._schedule(0.0)
        elif self._scheduled is None:
            self._schedule(self.max_wait_s)
        return await fut

    def _schedule(self, delay: float) -> None:
        assert self._loop is not None
        if self._scheduled is not None:
            if delay > 0:
                return
            self._scheduled.cancel()
        self._scheduled = (
            self._loop.call_later(delay, self._flush_all)
            if delay > 0
            else self._loop.call_soon(self._flush_all)
        )

    def _flush_all(self) -> None:
        self._scheduled = None
        # One full batch per turn: requests that arrived meanwhile get their turn to
        # join the remainder before it runs.
        self._flush()
        if self._pending and self._scheduled is None:
            self._schedule(0.0)

    def _take(self) -> list[_Item]:
        """The oldest pending requests up to ``max_batch_size`` images (at least one)."""
        taken: list[_Item] = []
        images = 0
        while self._pending:
            n = len(self._pending[0].x)
            if taken and images + n > self.max_batch_size:
                break
            taken.append(self._pending.pop(0))
            images += n
        self._pending_images -= images
        return taken

    def _flush(self) -> None:
        items = [it for it in self._take() if not it.future.done()]  # skip cancelled
        groups: dict[int, list[_Item]] = {}
        for it in items:
            groups.setdefault(id(it.model), []).append(it)
        for group in groups.values():
            self._run(group)

    def _score(self, model: LoadedModel, x: np.ndarray) -> Scores:
        """One ONNX Runtime call per ``max_batch_size`` images (one request may need more)."""
        parts = []
        for start in range(0, len(x), self.max_batch_size):
            chunk = x[start : start + self.max_batch_size]
            if self._on_batch is not None:
                self._on_batch(len(chunk))
            self.batches += 1
            parts.append(model.score_pixels(chunk))
        return Scores.concatenate(parts)

    def _run(self, items: list[_Item]) -> None:
        model = items[0].model
        x = items[0].x if len(items) == 1 else np.concatenate([it.x for it in items])
        try:
            scores = self._score(model, x)
        except Exception as exc:
            log.exception("inference failed for a batch of %d", len(x))
            err = InferenceError(f"inference failed: {type(exc).__name__}: {exc}")
            for it in items:
                if not it.future.done():
                    it.future.set_exception(err)
            return
        if len(items) == 1:
            if not items[0].future.done():
                items[0].future.set_result(scores)
            return
        start = 0
        for it in items:
            stop = start + len(it.x)
            if not it.future.done():
                it.future.set_result(scores.rows(start, stop))
            start = stop
