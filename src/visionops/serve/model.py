"""The served model: an ONNX Runtime session plus the metadata that travels with it.

Loading validates everything a request will rely on (files, metadata, input and output
names, output shapes, a warm-up run), so a broken model is refused at load time — at
start-up or on an admin reload — instead of failing requests later. No torch here.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from visionops.data.transforms import PreprocessSpec, normalize
from visionops.errors import ModelError, RegistryError
from visionops.ood import (
    BANK_FILE,
    MIN_INK_PIXELS,
    OodDetector,
    PixelScreen,
    l2_normalise,
    screen_pixels,
)

log = logging.getLogger(__name__)

MODEL_FILE = "model.onnx"
METADATA_FILE = "metadata.json"
OUTPUTS = ("probabilities", "embedding")


@dataclass(frozen=True)
class ResolvedModel:
    """A local folder holding model.onnx + metadata.json, and where it came from."""

    path: Path
    name: str | None
    version: str | None
    alias: str | None


def default_threads() -> int:
    """CPU cores this process may use (respects affinity masks / container cpusets)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def resolve_model_uri(uri: str, isolated: bool = False) -> ResolvedModel:
    """Turn ``models:/NAME@ALIAS``, ``models:/NAME/VERSION`` or a folder into a folder.

    Registry URIs go through :func:`visionops.registry.resolve_served_model`, which
    imports MLflow. With ``isolated`` that happens in a short-lived child process
    (``python -m visionops.serve.resolve``; about a second), so MLflow never stays
    resident in a serving process; anything else is a folder path. Raises
    :class:`~visionops.errors.RegistryError` with the registry's reason.
    """
    if not uri.startswith("models:/"):
        return ResolvedModel(path=Path(uri), name=None, version=None, alias=None)
    if isolated:
        return _resolve_in_child(uri)
    from visionops import registry

    ref = registry.resolve_served_model(uri)
    version = getattr(ref, "version", None)
    return ResolvedModel(
        path=Path(ref.path),
        name=getattr(ref, "name", None),
        version=None if version is None else str(version),
        alias=getattr(ref, "alias", None),
    )


def _resolve_in_child(uri: str) -> ResolvedModel:
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-m", "visionops.serve.resolve", uri],
        capture_output=True,
        text=True,
        timeout=300,
    )
    if proc.returncode != 0:
        lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
        raise RegistryError(
            lines[-1] if lines else f"cannot resolve {uri} (exit {proc.returncode})"
        )
    d = json.loads(proc.stdout.strip().splitlines()[-1])
    return ResolvedModel(
        path=Path(d["path"]), name=d["name"], version=d["version"], alias=d["alias"]
    )


class Scores(NamedTuple):
    """What one model call says about a batch of N model inputs, row by row."""

    probabilities: np.ndarray  # float32 (N, K)
    embeddings: np.ndarray  # float32 (N, D)
    ood_scores: np.ndarray | None  # float64 (N,); None: the model has no OOD calibration
    screen: PixelScreen  # the pixel tests of visionops.ood, bool (N,) each

    def rows(self, start: int, stop: int) -> Scores:
        """Rows ``start:stop`` of every field."""
        return Scores(
            self.probabilities[start:stop],
            self.embeddings[start:stop],
            None if self.ood_scores is None else self.ood_scores[start:stop],
            PixelScreen(self.screen.no_ink[start:stop], self.screen.no_strokes[start:stop]),
        )

    @staticmethod
    def concatenate(parts: Sequence[Scores]) -> Scores:
        """The rows of ``parts``, in order, as one :class:`Scores`."""
        if len(parts) == 1:
            return parts[0]
        ood = [p.ood_scores for p in parts]
        return Scores(
            np.concatenate([p.probabilities for p in parts]),
            np.concatenate([p.embeddings for p in parts]),
            None if any(s is None for s in ood) else np.concatenate(ood),  # type: ignore[arg-type]
            PixelScreen(
                np.concatenate([p.screen.no_ink for p in parts]),
                np.concatenate([p.screen.no_strokes for p in parts]),
            ),
        )


@dataclass(frozen=True, eq=False)
class LoadedModel:
    """One loaded, validated model. Immutable: a reload builds a new one and swaps it."""

    name: str
    version: str | None
    alias: str | None
    path: Path
    metadata: dict[str, Any]
    spec: PreprocessSpec
    classes: tuple[str, ...]
    input_name: str
    embedding_dim: int
    digest: str
    session: Any = field(repr=False)
    loaded_at: float = field(default_factory=time.time)
    #: The calibrated OOD test of ``metadata.json`` (``None``: the export predates it).
    ood: OodDetector | None = field(default=None, repr=False)
    #: ONNX Runtime session of ``ood.knn_onnx()`` (None: no OOD test, or score in NumPy).
    ood_session: Any = field(default=None, repr=False)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one model input."""
        return (self.spec.channels, self.spec.image_size, self.spec.image_size)

    @property
    def min_ink_pixels(self) -> int:
        """Ink pixels an input needs not to be ``no_ink``; 0 (never) for colour models."""
        if self.ood is not None:
            return self.ood.min_ink_pixels
        return MIN_INK_PIXELS if self.spec.channels == 1 else 0

    def run(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Probabilities ``(N, K)`` and embeddings ``(N, D)`` for normalised ``(N, C, H, W)``."""
        probs, emb = self.session.run(list(OUTPUTS), {self.input_name: x})
        return np.asarray(probs, dtype=np.float32), np.asarray(emb, dtype=np.float32)

    def score_pixels(self, pixels: np.ndarray) -> Scores:
        """Everything one batch needs, for model-sized uint8 images ``(N, H, W, C)``:
        normalised once, screened by the pixel tests once, one :meth:`infer` call."""
        min_edge = self.ood.min_edge_density if self.ood is not None else 0.0
        screen = screen_pixels(pixels, self.min_ink_pixels, min_edge)
        probs, emb, ood = self.infer(normalize(pixels, self.spec))
        return Scores(probs, emb, ood, screen)

    def infer(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """:meth:`run` plus the OOD score float64 ``(N,)`` of the batch (None: uncalibrated)."""
        probs, emb = self.run(x)
        if self.ood is None:
            return probs, emb, None
        if self.ood_session is None:
            return probs, emb, self.ood.score(emb)
        return probs, emb, self.ood.score_from_graph(l2_normalise(emb), self.ood_session)


def _session(model_bytes: bytes, path: Path, threads: int) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    # One request batch at a time: use every core inside an operator, none across them.
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    # Idle ORT threads sleep instead of spinning: a serving process is idle between
    # requests, and spinning threads would take the CPU from the event loop and from
    # the other workers (measured: 5 ms of CPU per request at concurrency 1 with it).
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        return ort.InferenceSession(model_bytes, opts, providers=["CPUExecutionProvider"])
    except Exception as exc:  # ORT raises its own exception types for invalid graphs
        raise ModelError(f"{path}: ONNX Runtime cannot load the model ({exc})") from None


def _read_metadata(path: Path) -> dict[str, Any]:
    try:
        meta = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelError(f"{path}: unreadable metadata ({exc})") from None
    if not isinstance(meta, dict):
        raise ModelError(f"{path}: metadata must be a JSON object")
    classes = meta.get("classes")
    if (
        not isinstance(classes, list)
        or not classes
        or not all(isinstance(c, str) for c in classes)
        or len(set(classes)) != len(classes)
    ):
        raise ModelError(f"{path}: 'classes' must be a non-empty list of distinct names")
    if not isinstance(meta.get("preprocess"), dict):
        raise ModelError(f"{path}: 'preprocess' must be an object (PreprocessSpec.to_dict())")
    return meta


def load_model(source: ResolvedModel, threads: int | None = None) -> LoadedModel:
    """Load and validate the model folder ``source.path``; raise :class:`ModelError`."""
    folder = source.path
    onnx_path, meta_path = folder / MODEL_FILE, folder / METADATA_FILE
    if not folder.is_dir():
        raise ModelError(f"model folder not found: {folder}")
    for p in (onnx_path, meta_path):
        if not p.is_file():
            raise ModelError(
                f"{folder}: missing {p.name} (expected {MODEL_FILE} + {METADATA_FILE})"
            )
    meta = _read_metadata(meta_path)
    try:
        spec = PreprocessSpec.from_dict(meta["preprocess"])
    except Exception as exc:  # from_dict validates types; any failure means bad metadata
        raise ModelError(f"{meta_path}: invalid 'preprocess' ({exc})") from None
    model_bytes = onnx_path.read_bytes()
    session = _session(model_bytes, onnx_path, threads or default_threads())

    input_name = str(meta.get("input_name") or "input")
    inputs = {i.name for i in session.get_inputs()}
    outputs = {o.name for o in session.get_outputs()}
    if input_name not in inputs:
        raise ModelError(f"{onnx_path}: no input named '{input_name}' (has {sorted(inputs)})")
    missing = [o for o in OUTPUTS if o not in outputs]
    if missing:
        raise ModelError(f"{onnx_path}: missing output(s) {missing} (has {sorted(outputs)})")

    classes = tuple(meta["classes"])
    model = LoadedModel(
        name=str(source.name or meta.get("name") or folder.name),
        version=source.version,
        alias=source.alias,
        path=folder,
        metadata=meta,
        spec=spec,
        classes=classes,
        input_name=input_name,
        embedding_dim=0,
        digest=hashlib.sha256(model_bytes).hexdigest()[:16],
        session=session,
    )
    # Warm-up run: proves the graph accepts the metadata's input size and answers with
    # one probability per class, so requests never meet a shape error.
    try:
        probs, emb = model.run(np.zeros((2, *model.input_shape), dtype=np.float32))
    except Exception as exc:
        raise ModelError(
            f"{onnx_path}: test inference on a {model.input_shape} input failed ({exc})"
        ) from None
    if probs.shape != (2, len(classes)):
        raise ModelError(
            f"{onnx_path}: 'probabilities' has shape {probs.shape[1:]}, "
            f"expected ({len(classes)},) for {len(classes)} classes"
        )
    if emb.ndim != 2 or emb.shape[0] != 2:
        raise ModelError(f"{onnx_path}: 'embedding' must be (N, D), got {emb.shape}")
    if not np.all(np.isfinite(probs)) or not np.allclose(probs.sum(axis=1), 1.0, atol=1e-3):
        raise ModelError(f"{onnx_path}: 'probabilities' are not a softmax (rows must sum to 1)")
    ood, ood_session = None, None
    if "ood" in meta:
        ood = OodDetector.load(folder, meta)
        if ood.dim != emb.shape[1]:
            raise ModelError(
                f"{folder / BANK_FILE}: OOD bank rows have {ood.dim} values, "
                f"the model's embedding {emb.shape[1]}"
            )
        # The bank product in ONNX Runtime: twice as fast as NumPy's on small batches.
        try:
            graph = ood.knn_onnx()
        except ImportError:  # an install without the onnx package: same scores, slower
            log.warning("the onnx package is missing: the OOD score runs in NumPy")
        else:
            ood_session = _session(graph, folder / BANK_FILE, threads or default_threads())
    else:
        log.warning("%s has no 'ood' entry: no out-of-distribution rejection", meta_path)
    log.info("loaded model %s version %s from %s", model.name, model.version, folder)
    return replace(model, embedding_dim=int(emb.shape[1]), ood=ood, ood_session=ood_session)


def load_from_uri(uri: str, threads: int | None = None, isolated: bool = False) -> LoadedModel:
    """Resolve ``uri`` (registry alias/version or folder) and load it.

    ``isolated``: resolve registry URIs in a child process (:func:`resolve_model_uri`).
    """
    return load_model(resolve_model_uri(uri, isolated=isolated), threads=threads)
