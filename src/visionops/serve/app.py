"""The FastAPI app factory and the server entry point behind ``visionops serve``.

``create_app(settings)`` builds a self-contained app: its own metrics registry, its own
prediction log and micro-batcher, started and drained by the lifespan. Nothing happens
at import time, so tests can build several apps in one process.
"""

from __future__ import annotations

import logging
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

from visionops import __version__
from visionops.errors import VisionOpsError
from visionops.serve.inputs import ApiError
from visionops.serve.metrics import ServeMetrics
from visionops.serve.middleware import BodySizeLimitMiddleware, RequestContextMiddleware
from visionops.serve.model import LoadedModel
from visionops.serve.routes import STATIC_DIR, router
from visionops.serve.schemas import PredictRequest, error_body
from visionops.serve.service import PredictionService, ServeSettings

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
    async def api_error(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, ApiError)
        return JSONResponse(error_body(exc.code, exc.message), exc.status, headers=exc.headers)

    async def http_error(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        code = _HTTP_CODES.get(exc.status_code, f"http_{exc.status_code}")
        return JSONResponse(error_body(code, str(exc.detail)), exc.status_code, headers=exc.headers)

    async def validation_error(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        where = ".".join(str(p) for p in first.get("loc", ())) or "request"
        return JSONResponse(error_body("invalid_request", f"{where}: {first['msg']}"), 422)

    async def project_error(_: Request, exc: Exception) -> JSONResponse:
        # A VisionOpsError reaching here was caused by input; say what, as a 400.
        return JSONResponse(error_body("bad_request", str(exc)), 400)

    app.add_exception_handler(ApiError, api_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(VisionOpsError, project_error)


def _install_openapi(app: FastAPI) -> None:
    """Add ``PredictRequest`` to the schema: /v1/predict reads its body by hand."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        schema = get_openapi(
            title=app.title, version=app.version, description=app.description, routes=app.routes
        )
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        components["PredictRequest"] = PredictRequest.model_json_schema(
            ref_template="#/components/schemas/{model}"
        )
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


def create_app(settings: ServeSettings, model: LoadedModel | None = None) -> FastAPI:
    """A ready-to-run app; ``model`` is served at once, otherwise loaded in the background.

    Without ``model`` the app starts answering at once: /healthz is 200 and /readyz 503
    until ``settings.model_uri`` is loaded.
    """
    metrics = ServeMetrics()
    service = PredictionService(settings, metrics, model)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await service.start()
        try:
            yield
        finally:
            await service.stop()

    app = FastAPI(
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
    app.include_router(router)
    from visionops.monitor.api import install_monitoring

    install_monitoring(app, service)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    _install_error_handlers(app)
    _install_openapi(app)
    # Added last = outermost: the context middleware sees (and ids, times, counts) every
    # response, including the body limit's 413.
    app.add_middleware(BodySizeLimitMiddleware, max_bytes=settings.serve.max_body_bytes)
    app.add_middleware(RequestContextMiddleware, metrics=metrics)
    return app


def run_server(
    model_uri: str | None = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    params_file: str | Path = "params.yaml",
    overrides: Sequence[str] = (),
    threads: int | None = None,
) -> None:
    """Load the model (failing fast on a bad URI) and serve it with uvicorn until stopped.

    SIGINT/SIGTERM shut down gracefully: in-flight requests finish, queued predictions
    are scored and the prediction log is drained before the process exits.
    """
    import uvicorn

    from visionops.serve.model import load_from_uri

    settings = ServeSettings.from_environment(model_uri, params_file, overrides, threads=threads)
    model = load_from_uri(settings.model_uri, threads=settings.threads)
    app = create_app(settings, model=model)
    log.info(
        "serving %s (%s) from %s on http://%s:%d",
        model.name,
        f"version {model.version}" if model.version else f"sha256 {model.digest}",
        settings.model_uri,
        host,
        port,
    )
    uvicorn.run(
        app,
        host=host,
        port=port,
        log_config=None,  # keep the CLI's logging configuration
        access_log=False,  # RequestContextMiddleware logs each request with its id
        timeout_graceful_shutdown=30,
    )


__all__ = ["ServeSettings", "create_app", "run_server"]
