"""Helpers for the serving tests: a tiny real ONNX model folder and image bytes.

The model is built with torch right here (not with the project's zoo/export), so the
serving tests do not depend on the training side: a conv + linear network on 28×28×1
with 10 classes, exported with ``torch.onnx.export`` to the contract of
``docs/development.md`` (input ``input`` (N, C, H, W), outputs ``probabilities`` and
``embedding``, dynamic batch) with its ``metadata.json``.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
from PIL import Image, ImageDraw

from visionops.data.transforms import PreprocessSpec

CLASSES = [str(i) for i in range(10)]
SPEC = PreprocessSpec(
    image_size=28, channels=1, mean=(0.1307,), std=(0.3081,), invert="auto", center=True
)


def build_tiny_model(
    folder: Path,
    seed: int = 0,
    name: str = "tiny-mnist",
    classes: list[str] | None = None,
    spec: PreprocessSpec = SPEC,
    width: int = 4,
    sharpen: float = 12.0,
    accuracy: float = 0.1,
) -> Path:
    """Write ``model.onnx`` + ``metadata.json`` of a small random-weight CNN to ``folder``.

    ``spec`` gives the input (channels, image_size) and travels in the metadata; ``width``
    is the number of conv filters; ``sharpen`` scales the logits (a random network is
    unsure of everything; sharpening spreads confidences out)."""
    import torch
    from torch import nn

    names: list[str] = classes or CLASSES

    class Tiny(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            side = (spec.image_size - 3) // 2 + 1
            self.conv = nn.Conv2d(spec.channels, width, 3, stride=2)
            self.fc = nn.Linear(width * side * side, 16)
            self.head = nn.Linear(16, len(names))

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            emb = torch.relu(self.fc(torch.relu(self.conv(x)).flatten(1)))
            return torch.softmax(sharpen * self.head(emb), dim=1), emb

    torch.manual_seed(seed)
    model = Tiny().eval()
    folder.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (torch.zeros(2, spec.channels, spec.image_size, spec.image_size),),
            str(folder / "model.onnx"),
            input_names=["input"],
            output_names=["probabilities", "embedding"],
            dynamic_axes={
                "input": {0: "batch"},
                "probabilities": {0: "batch"},
                "embedding": {0: "batch"},
            },
            opset_version=17,
            dynamo=False,
        )
    meta = {
        "name": name,
        "architecture": "tiny-cnn",
        "classes": names,
        "preprocess": spec.to_dict(),
        "input_name": "input",
        "outputs": ["probabilities", "embedding"],
        "metrics": {"accuracy": accuracy, "macro_f1": accuracy},
        "parity_max_abs_diff": 0.0,
        "opset": 17,
        "created": "2024-01-01T00:00:00+00:00",
        "git_sha": "test",
    }
    (folder / "metadata.json").write_text(json.dumps(meta, indent=2))
    return folder


def encode(img: Image.Image, fmt: str = "PNG", **kwargs: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def stroke_image(kind: str = "one", size: int = 140, dark_on_light: bool = False) -> Image.Image:
    """A hand-drawn-looking digit: ``one`` (vertical bar), ``zero`` (ring) or ``seven``."""
    bg, fg = (255, 0) if dark_on_light else (0, 255)
    img = Image.new("L", (size, size), bg)
    d = ImageDraw.Draw(img)
    w = max(2, size // 10)
    s = size
    if kind == "one":
        d.line([(s * 0.5, s * 0.15), (s * 0.5, s * 0.85)], fill=fg, width=w)
    elif kind == "zero":
        d.ellipse([s * 0.28, s * 0.15, s * 0.72, s * 0.85], outline=fg, width=w)
    elif kind == "seven":
        d.line([(s * 0.25, s * 0.2), (s * 0.75, s * 0.2), (s * 0.4, s * 0.85)], fill=fg, width=w)
    else:
        raise ValueError(kind)
    return img


def digit_png(kind: str = "one", **kwargs: object) -> bytes:
    return encode(stroke_image(kind, **kwargs))  # type: ignore[arg-type]


def unit_instance(kind: str = "one", size: int = 28) -> list[list[float]]:
    """An H×W list of floats in [0, 1], 1 = ink (the JSON ``instances`` format)."""
    a = np.asarray(stroke_image(kind, size=size), dtype=np.float64) / 255.0
    return a.round(4).tolist()


# --------------------------------------------------------------------------- real servers


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class ServerProcess:
    """``run_server`` in its own interpreter, as ``visionops serve`` runs it."""

    proc: subprocess.Popen[str]
    url: str
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, timeout: float = 60) -> int:
        """SIGTERM (graceful: in-flight requests finish, the log drains) and wait."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"server ignored SIGTERM:\n{self.log()[-3000:]}") from None


@contextlib.contextmanager
def server_process(
    model_uri: Path | str,
    workdir: Path,
    env: dict[str, str] | None = None,
    threads: int = 1,
    workers: int = 1,
) -> Iterator[ServerProcess]:
    """Start a real uvicorn server on 127.0.0.1 on a free port; stop it gracefully."""
    port = free_port()
    script = (
        "import logging; logging.basicConfig(level='INFO');"
        "from visionops.serve.app import run_server;"
        f"run_server(model_uri={str(model_uri)!r}, host='127.0.0.1', port={port},"
        f" threads={threads}, workers={workers})"
    )
    log_path = workdir / f"server-{port}.log"
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    with log_path.open("w") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-c", script],
            cwd=workdir,
            env=full_env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            text=True,
        )
    server = ServerProcess(proc=proc, url=f"http://127.0.0.1:{port}", log_path=log_path)
    try:
        for _ in range(600):  # up to ~60 s on a loaded machine
            if proc.poll() is not None:
                raise AssertionError(f"server exited early:\n{server.log()[-3000:]}")
            try:
                if httpx.get(f"{server.url}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        else:
            raise AssertionError(f"server never became ready:\n{server.log()[-3000:]}")
        yield server
    finally:
        if proc.poll() is None:
            server.stop()
