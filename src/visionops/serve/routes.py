"""HTTP routes: parse the request, call the service, return a schema. Nothing else."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import FileResponse
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from visionops.serve.deps import ServiceDep, require_admin
from visionops.serve.inputs import FILES_FIELD, ApiError, model_inputs
from visionops.serve.schemas import (
    ErrorResponse,
    HealthResponse,
    InputSize,
    ModelInfo,
    PredictResponse,
    ReadyResponse,
    ReloadResponse,
)
from visionops.serve.service import PredictionService, model_ref

STATIC_DIR = Path(__file__).with_name("static")

# Security headers for the web page: everything it loads comes from this server.
PAGE_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; img-src 'self' data: blob:; script-src 'self'; "
        "style-src 'self'; connect-src 'self'; object-src 'none'; base-uri 'none'; "
        "frame-ancestors 'none'"
    ),
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}

_ERROR_DESCRIPTIONS = {
    400: "Not an image, a corrupt/truncated file or malformed JSON/multipart",
    401: "Missing or wrong bearer token",
    403: "Admin endpoints disabled (VISIONOPS_ADMIN_TOKEN unset)",
    409: "The new model was refused; the old one keeps serving",
    413: "Body over serve.max_body_bytes, too many files, or too many pixels",
    415: "Unsupported content type or image format",
    422: "Well-formed but wrong: missing field, wrong shape, NaN/Inf or out-of-range values",
    503: "No model loaded yet",
}


def _errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    return {c: {"model": ErrorResponse, "description": _ERROR_DESCRIPTIONS[c]} for c in codes}


PREDICT_BODY: dict[str, Any] = {
    "parameters": [
        {
            "name": "return_input",
            "in": "query",
            "required": False,
            "schema": {"type": "boolean", "default": False},
            "description": (
                "also return what the model saw: each prediction carries `input_png`, "
                "the preprocessed model-size input as a PNG data URL"
            ),
        }
    ],
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": [FILES_FIELD],
                    "properties": {
                        FILES_FIELD: {
                            "type": "array",
                            "items": {"type": "string", "format": "binary"},
                            "description": "one or more PNG/JPEG/BMP/GIF/WebP images",
                        }
                    },
                }
            },
            "application/json": {"schema": {"$ref": "#/components/schemas/PredictRequest"}},
        },
    },
}

router = APIRouter()


@router.get("/healthz", response_model=HealthResponse, tags=["operations"])
async def healthz() -> HealthResponse:
    """Liveness: the process answers."""
    return HealthResponse(status="ok")


@router.get("/readyz", response_model=ReadyResponse, responses=_errors(503), tags=["operations"])
async def readyz(service: ServiceDep) -> ReadyResponse:
    """Readiness: 200 once a model is loaded, 503 before (or if loading failed)."""
    model = service.require_model()
    return ReadyResponse(status="ready", model=model_ref(model))


# /v1/predict is served by a plain Starlette route (PREDICT_ROUTE, mounted first by
# create_app): it skips FastAPI's dependency and response-model machinery, a sizeable
# share of a small prediction's CPU. This router only documents it in OpenAPI.
predict_docs = APIRouter()


@predict_docs.post(
    "/v1/predict",
    response_model=PredictResponse,
    responses=_errors(400, 413, 415, 422, 503),
    openapi_extra=PREDICT_BODY,
    tags=["prediction"],
)
async def predict(request: Request) -> Response:
    """Classify images: multipart ``files`` (one or more) or JSON ``instances``.

    Predictions come back in input order. Images are decoded and preprocessed exactly
    as at training time (inversion of dark-on-light images, MNIST-style centring).
    """
    answer = await predict_answer(
        request.app.state.service,
        await request.body(),
        request.headers.get("content-type", ""),
        request.query_params.get("return_input"),
        request.state.request_id,
    )
    return Response(answer, media_type="application/json")


async def predict_answer(
    service: PredictionService,
    body: bytes,
    content_type: str,
    return_input: str | None,
    request_id: str,
) -> bytes:
    """The JSON answer of ``/v1/predict`` for a request body (the route's whole work).

    ``return_input``: the query parameter's value (None when absent). Raises
    :class:`ApiError` for client errors (503 before a model is loaded),
    :class:`~visionops.errors.VisionOpsError` for unreadable input (a 400) and
    :class:`~visionops.serve.batching.InferenceError` when the model fails (a 500).
    Shared by the FastAPI route and :mod:`visionops.serve.hotpath`.
    """
    want_input = flag("return_input", return_input)
    model = service.require_model()  # the same model preprocesses and scores this request
    pixels, sizes, formats = model_inputs(body, content_type, model.spec, service.settings.serve)
    return await service.predict(
        model,
        pixels,
        request_id,
        want_input,
        original_sizes=sizes,
        original_formats=formats,
    )


_TRUE = frozenset({"true", "1", "yes", "on"})
_FALSE = frozenset({"false", "0", "no", "off", ""})


def flag(name: str, value: str | None) -> bool:
    """A boolean query parameter's value (None: absent, false); 422 ``invalid_request``
    for anything but true/false, 1/0, yes/no, on/off (any case)."""
    if value is None:
        return False
    if value.lower() in _TRUE:
        return True
    if value.lower() in _FALSE:
        return False
    raise ApiError(422, "invalid_request", f"query parameter {name}={value!r} is not a boolean")


class _PlainRoute(Route):
    """A Starlette route that records itself in the scope, as FastAPI's routes do (the
    metrics label requests by ``scope["route"].path``)."""

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        scope["route"] = self
        await super().handle(scope, receive, send)


PREDICT_ROUTE = _PlainRoute("/v1/predict", predict, methods=["POST"], name="predict")


@router.get("/v1/model", response_model=ModelInfo, responses=_errors(503), tags=["prediction"])
async def model_info(service: ServiceDep) -> ModelInfo:
    """The served model: name, version, alias, classes, input size and its metrics."""
    model = service.require_model()
    meta = model.metadata
    metrics = meta.get("metrics")
    return ModelInfo(
        name=model.name,
        version=model.version,
        alias=model.alias,
        architecture=meta.get("architecture"),
        classes=list(model.classes),
        input_size=InputSize(
            channels=model.spec.channels, height=model.spec.image_size, width=model.spec.image_size
        ),
        preprocess=model.spec.to_dict(),
        metrics=metrics if isinstance(metrics, dict) else {},
        created=str(meta["created"]) if meta.get("created") else None,
        git_sha=str(meta["git_sha"]) if meta.get("git_sha") else None,
        digest=model.digest,
        confidence_threshold=service.settings.serve.confidence_threshold,
        ood=meta["ood"] if isinstance(meta.get("ood"), dict) else None,
    )


@router.post(
    "/v1/admin/reload",
    response_model=ReloadResponse,
    responses=_errors(401, 403, 409),
    dependencies=[Depends(require_admin)],
    tags=["admin"],
)
async def reload_model(service: ServiceDep) -> ReloadResponse:
    """Re-resolve the model URI (e.g. a moved ``champion`` alias) and swap atomically.

    A model that fails validation is refused with 409 and the old one keeps serving.
    """
    return await service.reload()


@router.get("/metrics", include_in_schema=True, tags=["operations"])
async def metrics(service: ServiceDep) -> Response:
    """Prometheus metrics of this process."""
    if service.predlog is not None:
        service.metrics.predlog_pending.set(service.predlog.pending)
    return Response(service.metrics.render(), media_type=service.metrics.content_type)


@router.get("/", include_in_schema=False)
async def index() -> FileResponse:
    """The web page: draw or upload a digit and see the prediction."""
    return FileResponse(STATIC_DIR / "index.html", media_type="text/html", headers=PAGE_HEADERS)
