"""The benchmark's model on BentoML: multipart ``files`` in, the same JSON shape out.

PEER_MODEL_DIR=... PEER_WORKERS=N bentoml serve bentoml_app:Classifier --port PORT
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import bentoml
from common import OnnxClassifier


@bentoml.service(workers=int(os.environ.get("PEER_WORKERS", "1")))
class Classifier:
    def __init__(self) -> None:
        self.model = OnnxClassifier()

    @bentoml.api
    def predict(self, files: list[Path]) -> dict[str, Any]:
        pixels = [self.model.pixels(Path(f).read_bytes()) for f in files]
        return {"predictions": self.model.predict(pixels)}
