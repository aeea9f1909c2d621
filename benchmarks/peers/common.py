"""What every peer server of the serving benchmark shares: the model and the product's
own decode + preprocess (``visionops.data.transforms``), so only the framework differs.

Runs in the benchmark's separate virtualenv (``benchmarks/.venv-peers``): NumPy, Pillow
and ONNX Runtime at the product's pins, plus the framework; ``visionops`` is imported
from ``src/`` (its transforms need nothing else).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from visionops.data.transforms import PreprocessSpec, decode_image, image_to_array, normalize

MAX_PIXELS = 16_000_000


class OnnxClassifier:
    """The exported model folder (``PEER_MODEL_DIR``): bytes of images in, labels out."""

    def __init__(self, folder: str | None = None, threads: int | None = None) -> None:
        path = Path(folder or os.environ["PEER_MODEL_DIR"])
        meta = json.loads((path / "metadata.json").read_text())
        self.spec = PreprocessSpec.from_dict(meta["preprocess"])
        self.classes = list(meta["classes"])
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads or int(os.environ.get("PEER_THREADS", "1"))
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(str(path / "model.onnx"), opts)

    def pixels(self, data: bytes) -> np.ndarray:
        return image_to_array(decode_image(data, MAX_PIXELS), self.spec)

    def predict(self, pixels: list[np.ndarray]) -> list[dict[str, Any]]:
        x = normalize(np.stack(pixels), self.spec)
        probs = self.session.run(["probabilities"], {"input": x})[0]
        return [
            {
                "label": self.classes[int(p.argmax())],
                "probabilities": dict(zip(self.classes, p.tolist(), strict=True)),
            }
            for p in probs
        ]
