"""The FastAPI app factory and the server entry point behind ``visionops serve``.

``create_app(settings)`` builds a self-contained app: its own metrics registry, its own
prediction log and micro-batcher, started and drained by the lifespan. Nothing happens
at import time, so tests can build several apps in one process.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import tempfile
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp

from visionops import __version__
from visionops.errors import ConfigError, VisionOpsError
from visionops.serve.inputs import ApiError, client_error
from visionops.serve.metrics import ServeMetrics, mark_process_dead
from visionops.serve.middleware import (
    ACCESS_LOGGER,
    BodySizeLimitMiddleware,
    RequestContextMiddleware,
)
from visionops.serve.model import LoadedModel
from visionops.serve.predlog import ensure_predlog_table
from visionops.serve.routes import PREDICT_ROUTE, STATIC_DIR, predict_docs, router
from visionops.serve.schemas import PredictRequest, error_body
from visionops.serve.service import PredictionService, ServeSettings
from visionops.serve.workers import WorkerGroup

log = logging.getLogger(__name__)

_HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "invalid_request",
}


def _install_error_handlers(app: FastAPI) -> None:
    async def input_error(_: Request, exc: Exception) -> JSONResponse:
        status, body, headers = client_error(exc)
        return JSONResponse(body, status, headers=headers)

    async def http_error(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        code = _HTTP_CODES.get(exc.status_code, f"http_{exc.status_code}")
        return JSONResponse(error_body(code, str(exc.detail)), exc.status_code, headers=exc.headers)

    async def validation_error(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        where = ".".join(str(p) for p in first.get("loc", ())) or "request"
        return JSONResponse(error_body("invalid_request", f"{where}: {first['msg']}"), 422)

    app.add_exception_handler(ApiError, input_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(VisionOpsError, input_error)


def _install_openapi(app: FastAPI) -> None:
    """Add ``PredictRequest`` to the schema: /v1/predict reads its body by hand."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        schema = get_openapi(
            title=app.title,
            version=app.version,
            description=app.description,
            routes=[*app.routes, *predict_docs.routes],
        )
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        components["PredictRequest"] = PredictRequest.model_json_schema(
            ref_template="#/components/schemas/{model}"
        )
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


class ServeAPI(FastAPI):
    """The FastAPI app with :class:`~visionops.serve.hotpath.PredictEndpoint` in front."""

    def build_middleware_stack(self) -> ASGIApp:
        from visionops.serve.hotpath import PredictEndpoint

        service: PredictionService = self.state.service
        return PredictEndpoint(
            super().build_middleware_stack(),
            service,
            service.metrics,
            service.settings.serve.max_body_bytes,
        )


def create_app(
    settings: ServeSettings,
    model: LoadedModel | None = None,
    *,
    group: WorkerGroup | None = None,
    generation: int = 0,
) -> FastAPI:
    """A ready-to-run app; ``model`` is served at once, otherwise loaded in the background.

    Without ``model`` the app starts answering at once: /healthz is 200 and /readyz 503
    until ``settings.model_uri`` is loaded. ``group``: the run folder this app shares
    with the other worker processes (``--workers N``): reloads reach them all and
    metrics are summed over them.
    """
    metrics = ServeMetrics(str(group.metrics_dir) if group is not None else None)
    service = PredictionService(settings, metrics, model, group=group, generation=generation)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await service.start()
        try:
            yield
        finally:
            await service.stop()
            if group is not None:
                mark_process_dead(str(group.metrics_dir), os.getpid())

    app = ServeAPI(
        title="visionops prediction service",
        version=__version__,
        description=(
            "Image classification with ONNX Runtime: micro-batched predictions, a "
            "prediction log, Prometheus metrics and a drawing page at `/`. Every error "
            'answers `{"error": {"code", "message"}}`.'
        ),
        lifespan=lifespan,
    )
    app.state.service = service
    app.router.routes.insert(0, PREDICT_ROUTE)  # first: matched before any other route
    app.include_router(router)
    from visionops.monitor.api import install_monitoring

    install_monitoring(app, service)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    _install_error_handlers(app)
    _install_openapi(app)
    # Added last = outermost: the context middleware sees (and ids, times, counts) every
    # response, including the body limit's 413. POST /v1/predict is answered in front of
    # all of it by the same logic in one layer (ServeAPI, visionops.serve.hotpath).
    app.add_middleware(BodySizeLimitMiddleware, max_bytes=settings.serve.max_body_bytes)
    app.add_middleware(RequestContextMiddleware, metrics=metrics)
    return app


# The worker processes of `--workers N` read their settings from this variable (JSON).
WORKER_ENV = "VISIONOPS_SERVE_WORKER"


def create_worker_app() -> FastAPI:
    """The app of one worker process of ``visionops serve --workers N`` (uvicorn factory).

    Settings come from :data:`WORKER_ENV`, written by :func:`run_server`; the model is
    the one the run folder names now (a worker restarted after a reload serves the
    reloaded model).
    """
    from visionops.config import ServeParams
    from visionops.serve.model import load_model

    doc = json.loads(os.environ[WORKER_ENV])
    logging.basicConfig(level=doc["log_level"], format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger(ACCESS_LOGGER).setLevel(
        logging.INFO if doc["access_log"] else logging.WARNING
    )
    settings = ServeSettings(
        model_uri=doc["model_uri"],
        serve=ServeParams(**doc["serve"]),
        admin_token=doc["admin_token"],
        predlog_url=doc["predlog_url"],
        threads=doc["threads"],
        isolate_registry=True,
    )
    group = WorkerGroup(Path(doc["run_dir"]))
    state = group.current()
    model = load_model(state.model, threads=settings.threads)
    return create_app(settings, model=model, group=group, generation=state.generation)


def run_server(
    model_uri: str | None = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    params_file: str | Path = "params.yaml",
    overrides: Sequence[str] = (),
    threads: int | None = None,
    workers: int = 1,
    access_log: bool = False,
) -> None:
    """Load the model (failing fast on a bad URI) and serve it with uvicorn until stopped.

    ``workers`` > 1 runs that many processes on one port
    (:class:`~visionops.serve.supervisor.Supervisor`: one ``SO_REUSEPORT`` socket per
    worker; uvicorn's supervisor where the platform lacks it), each
    with ``threads`` (default: usable cores / workers) ONNX Runtime threads. Registry
    URIs are resolved in a child process, so no server process keeps MLflow loaded.
    SIGINT/SIGTERM shut down gracefully: in-flight requests finish, queued predictions
    are scored and every worker's prediction-log rows are written before it exits.
    ``access_log``: one INFO line per request (method, path, status, time, request id);
    off by default, it costs about a tenth of the CPU of a small prediction.
    Raises :class:`~visionops.errors.ConfigError` for ``workers`` < 1.
    """
    import uvicorn

    from visionops.serve.model import default_threads, load_model, resolve_model_uri
    from visionops.serve.supervisor import Supervisor, reuse_port_supported

    if workers < 1:
        raise ConfigError(f"--workers must be at least 1 (got {workers})")
    access = logging.getLogger(ACCESS_LOGGER)
    access.setLevel(logging.INFO if access_log else logging.WARNING)
    settings = ServeSettings.from_environment(model_uri, params_file, overrides, threads=threads)
    settings = dataclasses.replace(
        settings,
        isolate_registry=True,
        threads=threads or max(1, default_threads() // workers),
    )
    resolved = resolve_model_uri(settings.model_uri, isolated=True)
    model = load_model(resolved, threads=settings.threads)  # fails fast on a broken model
    log.info(
        "serving %s (%s) from %s on http://%s:%d with %d worker(s)",
        model.name,
        f"version {model.version}" if model.version else f"sha256 {model.digest}",
        settings.model_uri,
        host,
        port,
        workers,
    )
    common: dict[str, Any] = {
        "host": host,
        "port": port,
        "log_config": None,  # keep the CLI's logging configuration
        "access_log": False,  # RequestContextMiddleware logs each request with its id
        "timeout_graceful_shutdown": 30,
    }
    if workers == 1:
        uvicorn.run(create_app(settings, model=model), **common)
        return
    del model  # each worker loads its own
    if settings.predlog_url:
        ensure_predlog_table(settings.predlog_url)  # once, before N workers race to
    with tempfile.TemporaryDirectory(prefix="visionops-serve-") as tmp:
        group = WorkerGroup.create(Path(tmp), resolved)
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(group.metrics_dir)
        os.environ[WORKER_ENV] = json.dumps(
            {
                "model_uri": settings.model_uri,
                "serve": settings.serve.model_dump(),
                "admin_token": settings.admin_token,
                "predlog_url": settings.predlog_url,
                "threads": settings.threads,
                "run_dir": tmp,
                "log_level": logging.getLogger().getEffectiveLevel(),
                "access_log": access_log,
            }
        )
        app = "visionops.serve.app:create_worker_app"
        if reuse_port_supported():  # each worker on its own socket: an even share each
            config = {"app": app, "factory": True, **common}
            Supervisor(host, port, workers, config, graceful_seconds=40.0).run()
        else:
            uvicorn.run(app, factory=True, workers=workers, **common)


__all__ = ["ServeSettings", "create_app", "create_worker_app", "run_server"]
