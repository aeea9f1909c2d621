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
from visionops.serve.inputs import ApiError, client_error
from visionops.serve.metrics import ServeMetrics
from visionops.serve.middleware import (
    INVALID_LENGTH,
    BodyTooLargeError,
    begin_request,
    declared_too_large,
    internal_error_body,
    record_request,
    refuse_too_large,
    request_header,
    send_json_bytes,
)
from visionops.serve.routes import PREDICT_ROUTE, predict_answer
from visionops.serve.service import PredictionService

log = logging.getLogger(__name__)

PREDICT_PATH = PREDICT_ROUTE.path


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
            except BodyTooLargeError as exc:
                await refuse_too_large(
                    scope, receive, send_with_context, self.max_bytes, exc.body_ended
                )
            except (ApiError, VisionOpsError) as exc:  # the app's exception handlers' answer
                status, error, extra = client_error(exc)
                headers = [(k.lower().encode(), v.encode()) for k, v in (extra or {}).items()]
                await send_json_bytes(send_with_context, status, orjson.dumps(error), headers)
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
        raises :class:`BodyTooLargeError` on a declared Content-Length over the limit and
        :class:`ApiError` 400 on an invalid one."""
        try:
            too_big = declared_too_large(scope, self.max_bytes)
        except ValueError:
            raise ApiError(400, "bad_request", INVALID_LENGTH) from None
        if too_big:
            raise BodyTooLargeError(self.max_bytes)
        query = None
        if scope.get("query_string"):
            params = dict(parse_qsl(scope["query_string"].decode("latin-1"), True))
            query = params.get("return_input")
        return request_header(scope, "content-type") or "", query

    async def _read_body(self, receive: Receive) -> bytes:
        """The whole request body; :class:`BodyTooLargeError` once it passes the limit."""
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
                raise BodyTooLargeError(self.max_bytes, body_ended=not more)
            if chunk:
                chunks.append(chunk)
            if not more:
                return chunks[0] if len(chunks) == 1 else b"".join(chunks)
