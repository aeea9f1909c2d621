"""Micro-batching: concurrent requests share one ONNX Runtime call.

Requests put single images on an asyncio queue and await a future. One worker task
takes the first waiting image, then collects more until ``max_batch_size`` images or
``max_wait_ms`` have passed, runs the batch in a thread (so the event loop keeps
accepting requests while ORT computes) and resolves each future with its own row.
While a batch runs, new images queue up, so under load batches grow by themselves.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from visionops.serve.model import LoadedModel

log = logging.getLogger(__name__)

RowResult = tuple[np.ndarray, np.ndarray]  # (probabilities (K,), embedding (D,))


@dataclass
class _Item:
    model: LoadedModel
    x: np.ndarray  # (C, H, W) float32, already normalised
    future: asyncio.Future[RowResult]


_STOP = object()


class InferenceError(RuntimeError):
    """ONNX Runtime failed on a batch: a server fault (500), never the client's."""


class MicroBatcher:
    """Collects single images into batches for :meth:`LoadedModel.run`.

    Each image carries the model it was preprocessed for, so a reload in the middle of
    traffic never mixes models within a request: a batch is split by model.
    """

    def __init__(
        self,
        max_batch_size: int,
        max_wait_ms: float,
        on_batch: Callable[[int], None] | None = None,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be >= 1")
        self.max_batch_size = max_batch_size
        self.max_wait_s = max(0.0, max_wait_ms) / 1000.0
        self._on_batch = on_batch
        self._queue: asyncio.Queue[Any] | None = None
        self._worker: asyncio.Task[None] | None = None
        self._executor: ThreadPoolExecutor | None = None

    @property
    def running(self) -> bool:
        return self._worker is not None and not self._worker.done()

    def start(self) -> None:
        """Start the worker on the running event loop."""
        if self.running:
            return
        self._queue = asyncio.Queue()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="visionops-ort")
        self._worker = asyncio.get_running_loop().create_task(self._work(), name="micro-batcher")

    async def stop(self) -> None:
        """Finish every queued image, then stop the worker and its thread."""
        if self._queue is not None and self.running:
            await self._queue.put(_STOP)
            assert self._worker is not None
            await self._worker
        self._worker = None
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None

    async def predict(self, model: LoadedModel, xs: Sequence[np.ndarray]) -> list[RowResult]:
        """Probabilities and embedding for each normalised ``(C, H, W)`` image, in order."""
        if not self.running or self._queue is None:
            raise InferenceError("the prediction worker is not running")
        loop = asyncio.get_running_loop()
        futures: list[asyncio.Future[RowResult]] = []
        for x in xs:
            fut: asyncio.Future[RowResult] = loop.create_future()
            futures.append(fut)
            self._queue.put_nowait(_Item(model, x, fut))
        try:
            return list(await asyncio.gather(*futures))
        except BaseException:
            for f in futures:  # a disconnected client: don't compute the rest for nobody
                f.cancel()
            raise

    async def _next_batch(self, first: _Item) -> tuple[list[_Item], bool]:
        assert self._queue is not None
        loop = asyncio.get_running_loop()
        batch, stop = [first], False
        deadline = loop.time() + self.max_wait_s
        while len(batch) < self.max_batch_size:
            try:
                nxt = self._queue.get_nowait()
            except asyncio.QueueEmpty:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                try:
                    nxt = await asyncio.wait_for(self._queue.get(), remaining)
                except TimeoutError:
                    break
            if nxt is _STOP:
                stop = True
                break
            batch.append(nxt)
        return batch, stop

    async def _work(self) -> None:
        assert self._queue is not None
        while True:
            first = await self._queue.get()
            if first is _STOP:
                return
            batch, stop = await self._next_batch(first)
            try:
                await self._run(batch)
            except Exception:  # never let one bad batch kill the worker
                log.exception("micro-batch of %d failed", len(batch))
            if stop:
                return

    async def _run(self, batch: list[_Item]) -> None:
        loop = asyncio.get_running_loop()
        live = [it for it in batch if not it.future.done()]
        groups: dict[int, list[_Item]] = {}
        for it in live:
            groups.setdefault(id(it.model), []).append(it)
        for items in groups.values():
            model = items[0].model
            if self._on_batch is not None:
                self._on_batch(len(items))
            try:
                x = np.stack([it.x for it in items]).astype(np.float32, copy=False)
                probs, emb = await loop.run_in_executor(self._executor, model.run, x)
            except Exception as exc:
                log.exception("inference failed for a batch of %d", len(items))
                for it in items:
                    if not it.future.done():
                        it.future.set_exception(
                            InferenceError(f"inference failed: {type(exc).__name__}: {exc}")
                        )
                continue
            for i, it in enumerate(items):
                if not it.future.done():
                    it.future.set_result((probs[i], emb[i]))
