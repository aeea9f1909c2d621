"""The core of the service: which model is served, predicting, logging, reloading.

Routes are thin: they parse a request into pixels and call :class:`PredictionService`.
The served model is one reference swapped atomically on reload; each request keeps
the model it started with, so it is preprocessed and scored by the same model.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from starlette.concurrency import run_in_threadpool

from visionops.config import ServeParams, load_params, load_settings
from visionops.data.transforms import normalize
from visionops.errors import VisionOpsError
from visionops.serve.batching import MicroBatcher
from visionops.serve.inputs import ApiError
from visionops.serve.metrics import ServeMetrics
from visionops.serve.model import LoadedModel, load_from_uri
from visionops.serve.predlog import PredictionLog, PredictionRecord, now_utc
from visionops.serve.schemas import ModelRef, Prediction, PredictResponse, ReloadResponse

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServeSettings:
    """Everything the app needs, resolved up front (no env or file reads inside the app)."""

    model_uri: str
    serve: ServeParams = field(default_factory=ServeParams)
    admin_token: str | None = None
    predlog_url: str | None = None  # None: predictions are not logged
    threads: int | None = None  # ONNX Runtime intra-op threads; None = all usable cores

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


@dataclass
class PreparedInputs:
    """Model-sized uint8 images (for statistics) and the normalised batch (for the model)."""

    pixels: list[np.ndarray]
    x: np.ndarray


def prepare_batch(pixels: list[np.ndarray], model: LoadedModel) -> PreparedInputs:
    return PreparedInputs(pixels=pixels, x=normalize(np.stack(pixels), model.spec))


class PredictionService:
    """Serves one model at a time: micro-batched predictions, the log, atomic reloads."""

    def __init__(
        self, settings: ServeSettings, metrics: ServeMetrics, model: LoadedModel | None = None
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self.batcher = MicroBatcher(
            settings.serve.max_batch_size,
            settings.serve.max_wait_ms,
            on_batch=metrics.batch_size.observe,
        )
        self.predlog = PredictionLog(settings.predlog_url) if settings.predlog_url else None
        self.model: LoadedModel | None = None
        self.load_error: str | None = None
        self._reload_lock = asyncio.Lock()
        self._load_task: asyncio.Task[None] | None = None
        if model is not None:
            self._install(model)

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Open the prediction log, start the batcher, load the model in the background."""
        if self.predlog is not None:
            await run_in_threadpool(self.predlog.start)
        self.batcher.start()
        if self.model is None:
            self._load_task = asyncio.get_running_loop().create_task(self._load_initial())

    async def stop(self) -> None:
        """Finish queued predictions and write every logged row before returning."""
        if self._load_task is not None and not self._load_task.done():
            self._load_task.cancel()
        await self.batcher.stop()
        if self.predlog is not None:
            await run_in_threadpool(self.predlog.close)

    async def _load_initial(self) -> None:
        try:
            model = await run_in_threadpool(
                load_from_uri, self.settings.model_uri, self.settings.threads
            )
        except VisionOpsError as exc:
            self.load_error = str(exc)
            log.error("cannot load %s: %s", self.settings.model_uri, exc)
            return
        except Exception as exc:
            self.load_error = f"{type(exc).__name__}: {exc}"
            log.exception("cannot load %s", self.settings.model_uri)
            return
        self._install(model)

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
        self, model: LoadedModel, inputs: PreparedInputs, request_id: str
    ) -> PredictResponse:
        """Score a prepared batch, record metrics and the prediction log, answer in order."""
        rows = await self.batcher.predict(model, list(inputs.x))
        threshold = self.settings.serve.confidence_threshold
        created = now_utc()
        predictions: list[Prediction] = []
        records: list[PredictionRecord] = []
        for i, (probs, emb) in enumerate(rows):
            k = int(np.argmax(probs))
            confidence = float(probs[k])
            by_class = {c: float(p) for c, p in zip(model.classes, probs, strict=True)}
            accepted = confidence >= threshold
            label = model.classes[k]
            predictions.append(
                Prediction(
                    label=label,
                    class_index=k,
                    confidence=min(max(confidence, 0.0), 1.0),
                    probabilities=by_class,
                    accepted=accepted,
                )
            )
            self.metrics.predictions.labels(label, str(accepted).lower()).inc()
            self.metrics.confidence.observe(confidence)
            if self.predlog is not None:
                records.append(
                    PredictionRecord(
                        created_at=created,
                        request_id=request_id,
                        input_index=i,
                        model_name=model.name,
                        model_version=model.version,
                        model_alias=model.alias,
                        label=label,
                        class_index=k,
                        confidence=confidence,
                        accepted=accepted,
                        probabilities=by_class,
                        embedding=emb.tolist(),
                        pixels=inputs.pixels[i],
                    )
                )
        if self.predlog is not None:
            self.predlog.submit(records)
        return PredictResponse(model=model_ref(model), predictions=predictions)

    # ------------------------------------------------------------------ reload

    async def reload(self) -> ReloadResponse:
        """Re-resolve the model URI and swap in the new model; refuse a broken one."""
        async with self._reload_lock:
            old = self.model
            try:
                new = await run_in_threadpool(
                    load_from_uri, self.settings.model_uri, self.settings.threads
                )
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
            changed = old is None or (old.version, old.digest) != (new.version, new.digest)
            log.info(
                "reloaded %s: %s -> %s",
                self.settings.model_uri,
                old.version if old else None,
                new.version,
            )
            return ReloadResponse(
                previous=model_ref(old) if old else None, current=model_ref(new), changed=changed
            )
