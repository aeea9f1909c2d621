"""The core of the service: which model is served, predicting, logging, reloading.

Routes are thin: they parse a request into pixels and call :class:`PredictionService`.
The served model is one reference swapped atomically on reload; each request keeps
the model it started with, so it is preprocessed and scored by the same model.
"""

from __future__ import annotations

import asyncio
import base64
import io
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import orjson
from PIL import Image
from starlette.concurrency import run_in_threadpool

from visionops.config import ServeParams, load_params, load_settings
from visionops.errors import VisionOpsError
from visionops.ood import PixelScreen, Reason
from visionops.serve.batching import MicroBatcher
from visionops.serve.inputs import ApiError
from visionops.serve.metrics import ServeMetrics
from visionops.serve.model import LoadedModel, ResolvedModel, load_model, resolve_model_uri
from visionops.serve.predlog import PredictionBatch, PredictionLog, now_utc
from visionops.serve.schemas import ModelRef, ReloadResponse
from visionops.serve.workers import ModelState, WorkerGroup

log = logging.getLogger(__name__)

# How long a reload waits for the other workers to serve the new model.
RELOAD_WAIT_SECONDS = 30.0


@dataclass(frozen=True)
class ServeSettings:
    """Everything the app needs, resolved up front (no env or file reads inside the app)."""

    model_uri: str
    serve: ServeParams = field(default_factory=ServeParams)
    admin_token: str | None = None
    predlog_url: str | None = None  # None: predictions are not logged
    threads: int | None = None  # ONNX Runtime intra-op threads; None = all usable cores
    # Resolve models:/ URIs in a short-lived child process, so MLflow is never imported
    # into (and never stays resident in) the serving process.
    isolate_registry: bool = False

    @classmethod
    def from_environment(
        cls,
        model_uri: str | None = None,
        params_file: str | Path = "params.yaml",
        overrides: Sequence[str] = (),
        root: Path | None = None,
        threads: int | None = None,
    ) -> ServeSettings:
        """Params from ``params_file``; token and prediction-log URL from the environment.

        Without ``model_uri`` the registry's champion is served:
        ``models:/<registry model name>@champion``.
        """
        params = load_params(params_file, overrides)
        env = load_settings(root)
        return cls(
            model_uri=model_uri or f"models:/{params.model_name()}@champion",
            serve=params.serve,
            admin_token=env.admin_token,
            predlog_url=env.predlog_url,
            threads=threads,
        )


def model_ref(model: LoadedModel) -> ModelRef:
    return ModelRef(name=model.name, version=model.version, alias=model.alias)


_REASON_CODES: tuple[Reason | None, ...] = (
    None,
    "no_ink",
    "out_of_distribution",
    "low_confidence",
)


def rejection_reasons(
    screen: PixelScreen,
    ood_scores: np.ndarray | None,
    confidence: np.ndarray,
    model: LoadedModel,
    threshold: float,
) -> list[Reason | None]:
    """Why each prediction is not accepted, the strongest reason first; None when it is."""
    far = screen.no_strokes
    if ood_scores is not None and model.ood is not None:
        far = far | (ood_scores > model.ood.threshold)
    # Requests hold a few images: plain lists beat np.select's per-call cost here.
    return [
        _REASON_CODES[1 if a else 2 if b else 3 if c else 0]
        for a, b, c in zip(
            screen.no_ink.tolist(), far.tolist(), (confidence < threshold).tolist(), strict=True
        )
    ]


def input_data_urls(pixels: np.ndarray) -> list[str]:
    """The model-size inputs ``(N, H, W, C)`` uint8 as ``data:image/png;base64,`` URLs.

    One grey (C=1) or RGB (C=3) PNG per image: what the model saw, after decoding,
    inversion, centring, resizing and cropping. Only built when a request asks for it
    (``return_input=true``); a 32×32 RGB input is about 3 KB of PNG.
    """
    urls = []
    for image in pixels:
        frame = image[..., 0] if image.shape[-1] == 1 else image
        buf = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(frame)).save(buf, format="PNG")
        urls.append("data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii"))
    return urls


def render_predictions(
    model: LoadedModel,
    probs: np.ndarray,
    class_index: np.ndarray,
    confidence: np.ndarray,
    accepted: np.ndarray,
    reasons: Sequence[str | None] | None = None,
    ood_scores: np.ndarray | None = None,
    inputs: Sequence[str] | None = None,
) -> bytes:
    """The :class:`PredictResponse` JSON of one request, built straight from the arrays.

    Same fields as the schema (a test holds them equal); orjson instead of pydantic
    because this runs once per request on the hot path. ``inputs`` (from
    :func:`input_data_urls`) adds ``input_png`` to each prediction.
    """
    classes = model.classes
    n = len(class_index)
    predictions = [
        {
            "label": classes[k],
            "class_index": k,
            "confidence": min(max(c, 0.0), 1.0),
            "probabilities": dict(zip(classes, p, strict=True)),
            "accepted": a,
            "reason": r,
            "ood_score": o,
        }
        for k, c, a, p, r, o in zip(
            class_index.tolist(),
            confidence.tolist(),
            accepted.tolist(),
            probs.tolist(),
            list(reasons) if reasons is not None else [None] * n,
            ood_scores.tolist() if ood_scores is not None else [None] * n,
            strict=True,
        )
    ]
    if inputs is not None:
        for prediction, url in zip(predictions, inputs, strict=True):
            prediction["input_png"] = url
    ref = {"name": model.name, "version": model.version, "alias": model.alias}
    return orjson.dumps({"model": ref, "predictions": predictions})


class PredictionService:
    """Serves one model at a time: micro-batched predictions, the log, atomic reloads."""

    def __init__(
        self,
        settings: ServeSettings,
        metrics: ServeMetrics,
        model: LoadedModel | None = None,
        group: WorkerGroup | None = None,
        generation: int = 0,
    ) -> None:
        self.settings = settings
        self.group = group  # the other worker processes, with --workers N
        self.generation = generation  # of the group's model state this worker serves
        self.metrics = metrics
        self.batcher = MicroBatcher(
            settings.serve.max_batch_size,
            settings.serve.max_wait_ms,
            on_batch=metrics.batch_size.observe,
        )
        # stroke_thickness is left to the monitor, which computes it from the logged
        # input (visionops.monitor.window): it was half of the writer's CPU per row.
        self.predlog = (
            PredictionLog(settings.predlog_url, monitor_extras=False)
            if settings.predlog_url
            else None
        )
        self.model: LoadedModel | None = None
        self.load_error: str | None = None
        self._reload_lock = asyncio.Lock()
        self._load_task: asyncio.Task[None] | None = None
        self._watch_task: asyncio.Task[None] | None = None
        if model is not None:
            self._install(model)

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Open the prediction log, start the batcher, load the model in the background."""
        if self.predlog is not None:
            await run_in_threadpool(self.predlog.start)
        self.batcher.start()
        loop = asyncio.get_running_loop()
        if self.model is None:
            self._load_task = loop.create_task(self._load_initial())
        if self.group is not None:
            self.group.acknowledge(self.generation)
            self._watch_task = loop.create_task(self.group.watch(self._follow))

    async def stop(self) -> None:
        """Finish queued predictions and write every logged row before returning."""
        for task in (self._load_task, self._watch_task):
            if task is not None and not task.done():
                task.cancel()
        if self.group is not None:
            self.group.leave()
        await self.batcher.stop()
        if self.predlog is not None:
            await run_in_threadpool(self.predlog.close)

    async def _load_initial(self) -> None:
        try:
            model = await run_in_threadpool(self._load)
        except VisionOpsError as exc:
            self.load_error = str(exc)
            log.error("cannot load %s: %s", self.settings.model_uri, exc)
            return
        except Exception as exc:
            self.load_error = f"{type(exc).__name__}: {exc}"
            log.exception("cannot load %s", self.settings.model_uri)
            return
        self._install(model)

    def _resolve(self) -> ResolvedModel:
        return resolve_model_uri(self.settings.model_uri, isolated=self.settings.isolate_registry)

    def _load(self) -> LoadedModel:
        return load_model(self._resolve(), threads=self.settings.threads)

    async def _follow(self, state: ModelState) -> None:
        """Another worker reloaded: serve the model folder it published."""
        if state.generation <= self.generation:
            return
        async with self._reload_lock:
            try:
                model = await run_in_threadpool(load_model, state.model, self.settings.threads)
            except Exception:
                log.exception("worker %d cannot load %s", os.getpid(), state.model.path)
                return
            self._install(model)
            self.generation = state.generation
            assert self.group is not None
            self.group.acknowledge(state.generation)
            log.info("worker %d now serves %s %s", os.getpid(), model.name, model.version)

    def _install(self, model: LoadedModel) -> None:
        self.model = model  # one reference assignment: requests see the old or the new
        self.load_error = None
        self.metrics.set_model(model.name, model.version, model.alias, model.digest)

    def require_model(self) -> LoadedModel:
        model = self.model
        if model is None:
            reason = self.load_error or "the model is still loading"
            raise ApiError(503, "model_not_ready", f"no model is being served: {reason}")
        return model

    # ------------------------------------------------------------------ predict

    async def predict(
        self,
        model: LoadedModel,
        pixels: np.ndarray,
        request_id: str,
        return_input: bool = False,
        original_sizes: np.ndarray | None = None,
        original_formats: Sequence[str | None] | None = None,
    ) -> bytes:
        """Score model-sized uint8 images ``(N, H, W, C)``; the JSON answer, in input order.

        One micro-batched ONNX Runtime call, metrics and one prediction-log entry for the
        whole request. With ``return_input`` each prediction also carries ``input_png``,
        the model input as a PNG data URL. ``original_sizes`` (``(N, 2)`` width, height
        of the pictures before preprocessing) and ``original_formats`` (each upload's
        Pillow format name, None for a JSON instance) are logged for the monitor. Raises
        :class:`InferenceError` when the model fails.
        """
        # Normalisation, pixel tests, model and OOD score: once per micro-batch.
        probs, emb, ood_scores, screen = await self.batcher.predict(model, pixels)
        class_index = probs.argmax(axis=1)
        confidence = probs[np.arange(len(probs)), class_index]
        threshold = self.settings.serve.confidence_threshold
        reasons = rejection_reasons(screen, ood_scores, confidence, model, threshold)
        accepted = np.asarray([r is None for r in reasons], dtype=bool)
        inputs = input_data_urls(pixels) if return_input else None
        body = render_predictions(
            model, probs, class_index, confidence, accepted, reasons, ood_scores, inputs
        )
        self.metrics.observe_predictions(model.classes, class_index, confidence, accepted)
        self.metrics.observe_rejections(reasons)
        if self.predlog is not None:
            self.predlog.submit(
                PredictionBatch(
                    created_at=now_utc(),
                    request_id=request_id,
                    model_name=model.name,
                    model_version=model.version,
                    model_alias=model.alias,
                    classes=model.classes,
                    class_index=class_index,
                    confidence=confidence,
                    accepted=accepted,
                    probabilities=probs,
                    embeddings=emb,
                    pixels=pixels,
                    reasons=reasons,
                    ood_scores=ood_scores,
                    original_sizes=original_sizes,
                    original_formats=original_formats,
                )
            )
        return body

    # ------------------------------------------------------------------ reload

    async def reload(self) -> ReloadResponse:
        """Re-resolve the model URI and swap in the new model; refuse a broken one."""
        async with self._reload_lock:
            old = self.model
            try:
                resolved = await run_in_threadpool(self._resolve)
                new = await run_in_threadpool(load_model, resolved, self.settings.threads)
            except Exception as exc:
                self.metrics.reloads.labels("refused").inc()
                if not isinstance(exc, VisionOpsError):
                    log.exception("reload of %s failed", self.settings.model_uri)
                still = f"still serving {old.name} {old.version or old.digest}" if old else ""
                raise ApiError(
                    409,
                    "reload_refused",
                    f"new model from {self.settings.model_uri} refused: {exc}"
                    + (f"; {still}" if still else ""),
                ) from None
            self._install(new)
            self.metrics.reloads.labels("ok").inc()
            workers = None
            if self.group is not None:  # every other worker loads the same folder
                self.generation = self.group.publish(resolved)
                self.group.acknowledge(self.generation)
                workers, _ = await self.group.wait_for(self.generation, RELOAD_WAIT_SECONDS)
            changed = old is None or (old.version, old.digest) != (new.version, new.digest)
            log.info(
                "reloaded %s: %s -> %s",
                self.settings.model_uri,
                old.version if old else None,
                new.version,
            )
            return ReloadResponse(
                previous=model_ref(old) if old else None,
                current=model_ref(new),
                changed=changed,
                workers=workers,
            )
