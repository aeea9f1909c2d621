"""The benchmark's model on LitServe: multipart ``files`` in, the same JSON shape out.

LitServe pickles each decoded request to its inference worker process, and a parsed
multipart form (Starlette ``UploadFile`` objects) cannot be pickled; so an ASGI
middleware in the API process turns the multipart body into ``{"files": [base64, ...]}``
before LitServe's route reads it. Same bodies on the wire as every other server.

    PEER_MODEL_DIR=... python benchmarks/peers/litserve_app.py PORT WORKERS
"""

from __future__ import annotations

import base64
import sys
from typing import Any

import litserve as ls
import orjson
from common import OnnxClassifier
from python_multipart.multipart import MultipartParser, parse_options_header


def multipart_files(body: bytes, content_type: str) -> list[bytes]:
    """The raw parts of a multipart body (the benchmark sends only ``files`` parts)."""
    _, opts = parse_options_header(content_type)
    parts: list[list[bytes]] = []
    callbacks: Any = {
        "on_part_begin": lambda: parts.append([]),
        "on_part_data": lambda d, s, e: parts[-1].append(d[s:e]),
    }
    parser = MultipartParser(opts[b"boundary"], callbacks)
    parser.write(body)
    parser.finalize()
    return [b"".join(p) for p in parts]


class MultipartToJson:
    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        headers = dict(scope.get("headers", []))
        ctype = headers.get(b"content-type", b"").decode()
        if scope["type"] != "http" or not ctype.startswith("multipart/form-data"):
            await self.app(scope, receive, send)
            return
        body, more = b"", True
        while more:
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
        files = [base64.b64encode(f).decode() for f in multipart_files(body, ctype)]
        payload = orjson.dumps({"files": files})
        headers[b"content-type"] = b"application/json"
        headers[b"content-length"] = str(len(payload)).encode()
        scope = {**scope, "headers": list(headers.items())}
        sent = False

        async def new_receive() -> Any:
            nonlocal sent
            if sent:
                return await receive()
            sent = True
            return {"type": "http.request", "body": payload, "more_body": False}

        await self.app(scope, new_receive, send)


class ClassifierAPI(ls.LitAPI):
    def setup(self, device: str) -> None:
        self.model = OnnxClassifier()

    def decode_request(self, request: dict) -> list[bytes]:  # type: ignore[override,type-arg]
        return [base64.b64decode(f) for f in request["files"]]

    def predict(self, data: list[bytes]) -> list[dict[str, Any]]:
        return self.model.predict([self.model.pixels(d) for d in data])

    def encode_response(self, output: list[dict[str, Any]]) -> dict[str, Any]:
        return {"predictions": output}


if __name__ == "__main__":
    port, workers = int(sys.argv[1]), int(sys.argv[2])
    server = ls.LitServer(
        ClassifierAPI(),
        accelerator="cpu",
        workers_per_device=workers,
        middlewares=[MultipartToJson],
    )
    server.run(port=port, generate_client_file=False)
