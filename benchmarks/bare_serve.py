"""The bare-bones reference server of the serving benchmark: the core work and nothing else.

Starlette on uvicorn; per request: parse the multipart body, decode + preprocess every
file with the product's own functions (``visionops.data.transforms``: the code the
product serves with, so this tracks any change to it), one ONNX Runtime call, an orjson
answer. No batching across requests, no prediction log, no metrics, no request ids.
What visionops does beyond this is what its serving machinery costs.

Each of ``--workers`` processes listens on its own ``SO_REUSEPORT`` socket, as the
workers of ``visionops serve`` do (written out here: nothing of the product's serving
code is used).

    python benchmarks/bare_serve.py MODEL_DIR --port 8000 [--workers N]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import signal
import socket
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import orjson
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from visionops.data.transforms import PreprocessSpec, decode_image, image_to_array, normalize

MAX_PIXELS = 16_000_000


def create_app() -> Starlette:
    folder = Path(os.environ["BARE_MODEL_DIR"])
    meta = json.loads((folder / "metadata.json").read_text())
    spec, classes = PreprocessSpec.from_dict(meta["preprocess"]), meta["classes"]
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = int(os.environ.get("BARE_THREADS", "1"))
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(str(folder / "model.onnx"), opts)

    async def predict(request: Request) -> Response:
        async with request.form() as form:
            data = [await f.read() for f in form.getlist("files")]  # type: ignore[union-attr]
        pixels = [image_to_array(decode_image(d, MAX_PIXELS), spec) for d in data]
        probs = session.run(["probabilities"], {"input": normalize(np.stack(pixels), spec)})[0]
        out = [
            {
                "label": classes[int(p.argmax())],
                "probabilities": dict(zip(classes, p.tolist(), strict=True)),
            }
            for p in probs
        ]
        return Response(orjson.dumps({"predictions": out}), media_type="application/json")

    async def ready(_: Request) -> Response:
        return Response(b"ok")

    return Starlette(routes=[Route("/predict", predict, methods=["POST"]), Route("/ready", ready)])


def _serve(port: int) -> None:
    """One worker: its own ``SO_REUSEPORT`` socket on ``port``, one uvicorn server on it."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen(2048)
    sys.path.insert(0, str(Path(__file__).parent))
    config = uvicorn.Config(
        "bare_serve:create_app", factory=True, access_log=False, log_level="warning"
    )
    uvicorn.Server(config).run(sockets=[sock])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model_dir")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--workers", type=int, default=1)
    args = ap.parse_args()
    cores = len(os.sched_getaffinity(0))
    os.environ["BARE_MODEL_DIR"] = args.model_dir
    os.environ["BARE_THREADS"] = str(max(1, cores // args.workers))
    # Each worker binds the port itself (SO_REUSEPORT: the kernel spreads connections
    # over the sockets), as visionops serve does: with one shared socket the worker that
    # wakes first can take every waiting connection and leave the other idle.
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_serve, args=(args.port,)) for _ in range(args.workers)]
    for proc in procs:
        proc.start()

    def stop(*_: object) -> None:
        for proc in procs:
            if proc.pid is not None:
                os.kill(proc.pid, signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    for proc in procs:
        proc.join()


if __name__ == "__main__":
    main()
