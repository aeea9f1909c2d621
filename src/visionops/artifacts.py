"""Reading pipeline artifacts and running exported ONNX graphs, without torch.

Shared by the export stage, the promotion gate and the reports: the JSON files and
prepared ``.npz`` splits the stages write, the commit the project is at, and ONNX Runtime
sessions, batched probabilities and latency of an exported ``model.onnx`` (input
``input``, outputs ``probabilities`` and ``embedding``). Nothing here imports torch,
MLflow or another stage, so every stage can import it without import cycles.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Any

import numpy as np

from visionops.errors import DataError, ModelError, VisionOpsError
from visionops.stages import missing_input

INPUT_NAME = "input"
OUTPUT_NAMES = ("probabilities", "embedding")
LATENCY_RUNS = 50


# --------------------------------------------------------------------------- artifacts


def read_json(path: Path, produced_by: str) -> dict[str, Any]:
    """A JSON object from ``path``; a missing or malformed file names itself."""
    if not path.is_file():
        raise DataError(missing_input(path, produced_by))
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: not readable JSON ({exc})") from None
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def read_array(path: Path, error: type[VisionOpsError], named_by: str, what: str) -> np.ndarray:
    """The array in the ``.npy`` file at ``path``, read without unpickling anything.

    Raises ``error`` with "PATH not found (NAMED_BY)" for a missing file and
    "PATH: unreadable WHAT (reason)" for any other failure; shape and dtype are the
    caller's to check.
    """
    try:
        return np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise error(f"{path} not found ({named_by})") from None
    except (OSError, ValueError) as exc:
        raise error(f"{path}: unreadable {what} ({exc})") from None


def load_split(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """``x`` (uint8 N,H,W,C) and ``y`` (int64) of a prepared split."""
    from visionops.data.ingest import read_npz

    if not path.is_file():
        raise DataError(missing_input(path))
    arrays = read_npz(path, ("x", "y"))
    return arrays["x"], arrays["y"].astype(np.int64)


def numeric_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """The top-level numbers of an evaluation metrics file (booleans excluded)."""
    return {
        k: float(v)
        for k, v in metrics.items()
        if isinstance(v, int | float) and not isinstance(v, bool)
    }


def git_sha(root: Path) -> str | None:
    """The commit the project is at, or None outside git / before the first commit."""
    try:
        proc = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    sha = proc.stdout.strip()
    return sha if proc.returncode == 0 and sha else None


# --------------------------------------------------------------------------- ONNX Runtime


def open_session(path: Path, threads: int = 0) -> Any:
    """An ONNX Runtime CPU session; ``threads=0`` lets ONNX Runtime choose."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.log_severity_level = 3
    try:
        return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    except Exception as exc:  # ORT raises its own exception types for unreadable graphs
        raise ModelError(f"{path}: ONNX Runtime cannot load the model ({exc})") from None


def predict_probabilities(session: Any, x: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """``probabilities`` for normalised ``x`` (N, C, H, W), in batches."""
    chunks = [
        session.run([OUTPUT_NAMES[0]], {INPUT_NAME: x[i : i + batch_size]})[0]
        for i in range(0, len(x), batch_size)
    ]
    if not chunks:
        return np.zeros((0, 0), dtype=np.float32)
    return np.concatenate(chunks).astype(np.float32, copy=False)


def latency_ms(
    session: Any, x1: np.ndarray, runs: int = LATENCY_RUNS, warmup: int = 5
) -> tuple[float, float]:
    """(p50, p95) wall time in milliseconds of one ``session.run`` on the batch ``x1``."""
    feed = {INPUT_NAME: np.ascontiguousarray(x1, dtype=np.float32)}
    for _ in range(warmup):
        session.run(None, feed)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        session.run(None, feed)
        times.append((time.perf_counter() - start) * 1000.0)
    p50, p95 = np.percentile(times, [50, 95])
    return float(p50), float(p95)
