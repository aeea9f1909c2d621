"""Pure ASGI middleware: request ids, metrics, the catch-all error and the body limit.

Pure ASGI (not ``BaseHTTPMiddleware``) so the body limit can count bytes as they stream
in, and a too-large upload is refused before it is buffered.
"""

from __future__ import annotations

import json
import logging
import re
import time
import uuid
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from visionops.serve.metrics import ServeMetrics, method_label, status_label
from visionops.serve.schemas import error_body

log = logging.getLogger(__name__)
ACCESS_LOGGER = "visionops.serve.access"
access_log = logging.getLogger(ACCESS_LOGGER)

REQUEST_ID_HEADER = "x-request-id"
INVALID_LENGTH = "invalid Content-Length header"
_CLIENT_ID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")


class BodyTooLargeError(Exception):
    """The request body exceeds the configured limit (raised while streaming it).

    ``body_ended``: the client has sent its whole body (nothing is left to discard).
    """

    def __init__(self, limit: int, body_ended: bool = False) -> None:
        super().__init__(f"request body exceeds the limit of {limit} bytes")
        self.limit = limit
        self.body_ended = body_ended


def declared_too_large(scope: Scope, max_bytes: int) -> bool:
    """Whether the request's Content-Length declares more than ``max_bytes`` (False when
    it declares none); ValueError when the header is not a number."""
    declared = request_header(scope, "content-length")
    return declared is not None and int(declared) > max_bytes


async def send_json(send: Send, status: int, body: dict[str, Any], headers: list[Any]) -> None:
    """Answer ``body`` as JSON with ``status`` and the extra ``headers``."""
    await send_json_bytes(send, status, json.dumps(body).encode(), headers)


async def send_json_bytes(send: Send, status: int, payload: bytes, headers: list[Any]) -> None:
    """Answer the already encoded JSON ``payload`` with ``status`` and ``headers``."""
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(payload)).encode()),
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": payload})


def request_id_of(scope: Scope) -> str:
    """The id the context middleware gave this request ('-' outside a request)."""
    return str(scope.get("state", {}).get("request_id", "-"))


def new_request_id(scope: Scope) -> str:
    """The client's ``X-Request-ID`` when it is a safe token, else a fresh uuid4 hex."""
    incoming = request_header(scope, REQUEST_ID_HEADER)
    return incoming if incoming and _CLIENT_ID.match(incoming) else uuid.uuid4().hex


def context_headers(request_id: str) -> list[tuple[bytes, bytes]]:
    """The headers every response carries: its request id and ``nosniff``."""
    return [(b"x-request-id", request_id.encode()), (b"x-content-type-options", b"nosniff")]


class ContextSend:
    """An ASGI ``send`` that adds the request's context headers to the response and
    remembers its status (500 until a response starts)."""

    def __init__(self, send: Send, request_id: str) -> None:
        self._send = send
        self._extra = context_headers(request_id)
        self.status = 500
        self.started = False

    async def __call__(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.started = True
            self.status = int(message["status"])
            message = {**message, "headers": [*message.get("headers", []), *self._extra]}
        await self._send(message)


def begin_request(scope: Scope, send: Send) -> tuple[str, ContextSend]:
    """Give the request its id (in ``scope["state"]``) and a ``send`` adding its headers."""
    request_id = new_request_id(scope)
    scope.setdefault("state", {})["request_id"] = request_id
    return request_id, ContextSend(send, request_id)


def record_request(
    metrics: ServeMetrics, scope: Scope, status: int, elapsed: float, request_id: str
) -> None:
    """Count and time one answered request (route template, method, status labels) and
    write its access-log line when ``--access-log`` is on. ``elapsed`` in seconds."""
    labels = (_route_label(scope), method_label(scope["method"]), status_label(status))
    metrics.child(metrics.requests, *labels).inc()
    metrics.child(metrics.latency, *labels).observe(elapsed)
    if access_log.isEnabledFor(logging.INFO):  # off unless --access-log
        access_log.info(
            "%s %s %d %.1fms request_id=%s",
            scope["method"],
            scope["path"],
            status,
            elapsed * 1000,
            request_id,
        )


class RequestContextMiddleware:
    """Outermost layer: request id header, security headers, metrics and the catch-all.

    Any exception that escapes the app becomes a logged 500 with a JSON body (and the
    request id, to find the log line) instead of a dropped connection.
    """

    def __init__(self, app: ASGIApp, metrics: ServeMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        request_id, send_wrapper = begin_request(scope, send)
        try:
            await self.app(scope, receive, send_wrapper)
        except Exception:
            log.exception(
                "unhandled error on %s %s (request %s)", scope["method"], scope["path"], request_id
            )
            if not send_wrapper.started:
                await send_json(send_wrapper, 500, internal_error_body(request_id), [])
        finally:
            elapsed = time.perf_counter() - start
            record_request(self.metrics, scope, send_wrapper.status, elapsed, request_id)


def internal_error_body(request_id: str) -> dict[str, Any]:
    """The 500 answer's body: it names the request id, to find the logged traceback."""
    return error_body("internal_error", f"unexpected server error; request id {request_id}")


class BodySizeLimitMiddleware:
    """413 for bodies over ``max_bytes``: by Content-Length, and by counting streamed bytes."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        try:
            too_big = declared_too_large(scope, self.max_bytes)
        except ValueError:
            await send_json(send, 400, error_body("bad_request", INVALID_LENGTH), [])
            return
        if too_big:
            await refuse_too_large(scope, receive, send, self.max_bytes)
            return

        received = 0
        started = False
        body_ended = False

        async def counting_receive() -> Message:
            nonlocal received, body_ended
            message = await receive()
            body_ended = message["type"] != "http.request" or not message.get("more_body")
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise BodyTooLargeError(self.max_bytes)
            return message

        async def send_wrapper(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counting_receive, send_wrapper)
        except BodyTooLargeError:
            if started:
                raise
            await refuse_too_large(scope, receive, send, self.max_bytes, body_ended)


async def refuse_too_large(
    scope: Scope, receive: Receive, send: Send, max_bytes: int, body_ended: bool = False
) -> None:
    """Answer 413 so that every client reads it, then close the connection.

    A client that sends its whole body before reading (Python's urllib) would get a
    connection reset if the server closed with unread bytes in the socket, so the rest
    of the body is read and discarded first, up to :func:`discard_limit` bytes. A client
    that asked ``Expect: 100-continue`` has sent nothing yet and is answered at once.
    ``send`` is expected to add the request-context headers.
    """
    expect = (request_header(scope, "expect") or "").lower()
    if expect != "100-continue" and not body_ended:
        await _discard_body(receive, discard_limit(max_bytes))
    message = f"request body exceeds the limit of {max_bytes} bytes (serve.max_body_bytes)"
    await send_json(
        send, 413, error_body("payload_too_large", message), [(b"connection", b"close")]
    )


def discard_limit(max_bytes: int) -> int:
    """Most bytes of a refused body read (and thrown away) before closing."""
    return max(4 * max_bytes, DISCARD_MIN_BYTES)


# Read and thrown away, at least, before a 413 closes the connection (see refuse_too_large).
DISCARD_MIN_BYTES = 16 * 1024 * 1024


async def _discard_body(receive: Receive, limit: int) -> bool:
    """Read the rest of the request body, up to ``limit`` bytes; True when it ended."""
    seen = 0
    while seen <= limit:
        message = await receive()
        if message["type"] != "http.request":
            return False
        seen += len(message.get("body", b""))
        if not message.get("more_body", False):
            return True
    return False


def request_header(scope: Scope, name: str) -> str | None:
    """The value of header ``name`` (lower case) of the request, or None."""
    key = name.encode()
    for k, v in scope.get("headers", []):
        if k.lower() == key:
            return str(v.decode("latin-1"))
    return None


def _route_label(scope: Scope) -> str:
    # The route *template* (/v1/predict), never the raw path: unknown paths would
    # otherwise create one time series each.
    route = scope.get("route")
    path = getattr(route, "path", None)
    return str(path) if path else "unmatched"
