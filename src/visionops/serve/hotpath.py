"""``POST /v1/predict`` as a plain ASGI endpoint in front of the FastAPI app.

The prediction route is the server's one hot path. Through FastAPI a request passes nine
ASGI layers before the route's code runs (server-error, request-context and body-limit
middleware, exception handling, FastAPI's exit stack, body limit and telemetry layers,
routing, request/response wrapping), each an ``async`` call with its own ``send``
wrapper; py-spy put them at a sixth of a small prediction's CPU on the serving
benchmark (``benchmarks/bench_serve.py``). :class:`PredictEndpoint` does the same work in
one function: the request id and security headers, the body limit (the same 413 with
its bounded discard), the route's work (:func:`visionops.serve.routes.predict_answer`),
the error mapping of the app's exception handlers, the request metrics and the access
log.

Every other request goes to the FastAPI app, which keeps its own ``/v1/predict`` route
(mounted under a root path, or when the fast path is off, it answers), and a test holds
the two answers equal.
"""

from __future__ import annotations

import logging
import time
from urllib.parse import parse_qsl

import orjson
from starlette.types import ASGIApp, Receive, Scope, Send

from visionops.errors import VisionOpsError
from visionops.serve.inputs import ApiError
from visionops.serve.metrics import ServeMetrics
from visionops.serve.middleware import (
    begin_request,
    internal_error_body,
    record_request,
    refuse_too_large,
    send_json_bytes,
)
from visionops.serve.routes import PREDICT_ROUTE, predict_answer
from visionops.serve.schemas import error_body
from visionops.serve.service import PredictionService

log = logging.getLogger(__name__)

PREDICT_PATH = "/v1/predict"


class _TooLarge(Exception):
    def __init__(self, body_ended: bool) -> None:
        self.body_ended = body_ended


class PredictEndpoint:
    """ASGI: ``POST /v1/predict`` answered here, anything else passed to ``app``.

    ``max_body_bytes``: the body limit (``serve.max_body_bytes``), by Content-Length and
    by counting the streamed bytes.
    """

    def __init__(
        self, app: ASGIApp, service: PredictionService, metrics: ServeMetrics, max_body_bytes: int
    ) -> None:
        self.app = app
        self.service = service
        self.metrics = metrics
        self.max_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] != "http"
            or scope["path"] != PREDICT_PATH
            or scope["method"] != "POST"
            or scope.get("root_path")
        ):
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        request_id, send_with_context = begin_request(scope, send)
        scope["route"] = PREDICT_ROUTE  # the metrics' route label, as FastAPI's routing sets

        try:
            try:
                content_type, query = self._request_head(scope)
                body = await self._read_body(receive)
                answer = await predict_answer(self.service, body, content_type, query, request_id)
                await send_json_bytes(send_with_context, 200, answer, [])
            except _TooLarge as exc:
                await refuse_too_large(
                    scope, receive, send_with_context, self.max_bytes, exc.body_ended
                )
            except ApiError as exc:
                headers = [(k.lower().encode(), v.encode()) for k, v in (exc.headers or {}).items()]
                await _respond_error(send_with_context, exc.status, exc.code, exc.message, headers)
            except VisionOpsError as exc:  # caused by the input: say what, as a 400
                await _respond_error(send_with_context, 400, "bad_request", str(exc), [])
        except Exception:
            log.exception("unhandled error on POST %s (request %s)", PREDICT_PATH, request_id)
            if not send_with_context.started:
                body = orjson.dumps(internal_error_body(request_id))
                await send_json_bytes(send_with_context, 500, body, [])
        finally:
            elapsed = time.perf_counter() - start
            record_request(self.metrics, scope, send_with_context.status, elapsed, request_id)

    def _request_head(self, scope: Scope) -> tuple[str, str | None]:
        """Content type and the ``return_input`` query value (None when absent);
        raises :class:`_TooLarge` on a declared Content-Length over the limit and
        :class:`ApiError` 400 on an invalid one."""
        content_type = ""
        declared = None
        for key, value in scope["headers"]:
            k = key.lower()
            if k == b"content-type":
                content_type = value.decode("latin-1")
            elif k == b"content-length":
                declared = value
        if declared is not None:
            try:
                too_big = int(declared) > self.max_bytes
            except ValueError:
                raise ApiError(400, "bad_request", "invalid Content-Length header") from None
            if too_big:
                raise _TooLarge(body_ended=False)
        query = None
        if scope.get("query_string"):
            params = dict(parse_qsl(scope["query_string"].decode("latin-1"), True))
            query = params.get("return_input")
        return content_type, query

    async def _read_body(self, receive: Receive) -> bytes:
        """The whole request body; :class:`_TooLarge` once it passes the limit."""
        chunks: list[bytes] = []
        received = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                raise ApiError(400, "bad_request", "the client disconnected before the body")
            chunk = message.get("body", b"")
            received += len(chunk)
            more = bool(message.get("more_body", False))
            if received > self.max_bytes:
                raise _TooLarge(body_ended=not more)
            if chunk:
                chunks.append(chunk)
            if not more:
                return chunks[0] if len(chunks) == 1 else b"".join(chunks)


async def _respond_error(
    send: Send, status: int, code: str, message: str, headers: list[tuple[bytes, bytes]]
) -> None:
    await send_json_bytes(send, status, orjson.dumps(error_body(code, message)), headers)
