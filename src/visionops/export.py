"""Export the selected model to ONNX and prove the export computes what torch computes.

The exported folder (``layout.export_dir``) is everything serving needs and nothing it
must not need: ``model.onnx`` (input ``input`` float32 ``(N, C, H, W)``, already
normalised, dynamic ``N``; outputs ``probabilities`` — softmax in the graph — and
``embedding``) and ``metadata.json`` (classes, preprocessing, metrics, parity).

torch is imported inside the functions that need it. The torch-free helpers it shares
with the promotion gate and the reports (reading artifacts, ONNX Runtime sessions,
batched prediction, latency) live in :mod:`visionops.artifacts`.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import warnings
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from visionops.artifacts import (
    INPUT_NAME,
    OUTPUT_NAMES,
    git_sha,
    latency_ms,
    load_split,
    numeric_metrics,
    open_session,
    read_json,
)
from visionops.errors import DataError, ModelError
from visionops.stages import missing_input

if TYPE_CHECKING:
    from torch import nn

    from visionops.config import Params
    from visionops.data.transforms import PreprocessSpec
    from visionops.layout import Layout
    from visionops.ood import OodDetector

log = logging.getLogger(__name__)

OPSET = 18
MODEL_FILE = "model.onnx"
METADATA_FILE = "metadata.json"
#: Test images used for the torch/ONNX Runtime parity check.
PARITY_SAMPLES = 64


@dataclass(frozen=True)
class ExportResult:
    """What the export stage produced and how faithful the ONNX graph is."""

    model: str
    architecture: str
    onnx_path: Path
    metadata_path: Path
    parity_max_abs_diff: float
    latency_p50_ms: float
    latency_p95_ms: float
    onnx_bytes: int
    exporter: str
    opset: int = OPSET

    def summary(self) -> dict[str, float]:
        return {
            "parity_max_abs_diff": self.parity_max_abs_diff,
            "onnx_latency_p50_ms": self.latency_p50_ms,
            "onnx_latency_p95_ms": self.latency_p95_ms,
            "onnx_size_mb": self.onnx_bytes / 1e6,
        }

    def describe(self) -> str:
        return (
            f"{self.model} ({self.architecture}) to {self.onnx_path} "
            f"[{self.onnx_bytes / 1e6:.2f} MB, opset {self.opset}]: "
            f"parity max |diff| {self.parity_max_abs_diff:.2e}, "
            f"ONNX Runtime p95 {self.latency_p95_ms:.2f} ms at batch 1"
        )


# --------------------------------------------------------------------------- torch side


def export_module(model: nn.Module, temperature: float = 1.0) -> nn.Module:
    """Wrap a zoo model so one graph returns ``(softmax(logits / T) probabilities, embedding)``.

    Uses the zoo contract ``forward(x) == head(forward_features(x))``: the head is
    applied to the embedding so the features are computed once. ``temperature`` is the
    fitted temperature scaling (:mod:`visionops.calibration`; 1.0 = none), a constant in
    the graph, so serving applies it without knowing of it.
    """
    import torch

    if not (math.isfinite(temperature) and temperature > 0):
        raise ModelError(f"temperature must be a positive number, got {temperature}")

    class ProbabilitiesAndEmbedding(torch.nn.Module):
        def __init__(self, inner: Any, t: float) -> None:
            super().__init__()
            self.inner = inner
            self.register_buffer("inv_temperature", torch.tensor(1.0 / t, dtype=torch.float32))

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            features = self.inner.forward_features(x)
            head = getattr(self.inner, "head", None)
            logits = head(features) if callable(head) else self.inner(x)
            return torch.softmax(logits * self.inv_temperature, dim=1), features

    return ProbabilitiesAndEmbedding(model, temperature).eval()


def validation_logits(model: nn.Module, x: np.ndarray, batch_size: int = 500) -> np.ndarray:
    """Logits (N, K) float64 of ``model`` on normalised ``x`` (N, C, H, W), in batches."""
    import torch

    out = []
    model.eval()
    with torch.no_grad():
        for i in range(0, len(x), batch_size):
            out.append(model(torch.from_numpy(x[i : i + batch_size])).double().numpy())
    return np.concatenate(out) if out else np.zeros((0, 0))


def export_onnx(module: nn.Module, example: np.ndarray, path: Path, opset: int = OPSET) -> str:
    """Write ``module`` (see :func:`export_module`) as one self-contained ONNX file.

    The torch.export-based exporter is used with a dynamic batch dimension; the legacy
    TorchScript exporter is the fallback for models it cannot trace. Returns the name of
    the exporter that succeeded.
    """
    import torch

    x = torch.from_numpy(np.ascontiguousarray(example, dtype=np.float32))
    if x.shape[0] < 2:
        # torch.export specialises a dimension of size 1; an example batch of 2 keeps N free.
        x = torch.cat([x, x])
    # The exporter logs one warning per missing torchvision op, its optimiser narrates
    # every pass, and torch warns about its own internals: none of it is actionable here.
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "onnxscript", "onnx_ir")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING if lg.name != "torch.onnx" else logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            return _export_with_fallback(module, x, path, opset)
    finally:
        for lg, lvl in zip(loggers, levels, strict=True):
            lg.setLevel(lvl)


def _export_with_fallback(module: nn.Module, x: Any, path: Path, opset: int) -> str:
    import torch

    try:
        torch.onnx.export(
            module,
            (x,),
            str(path),
            dynamo=True,
            dynamic_shapes=({0: torch.export.Dim("batch")},),
            opset_version=opset,
            external_data=False,
            verbose=False,
            input_names=[INPUT_NAME],
            output_names=list(OUTPUT_NAMES),
        )
        return "torch.export"
    except Exception as exc:  # the exporter raises many types; the fallback decides
        log.warning("torch.export-based ONNX export failed (%s); using the legacy one", exc)
    try:
        torch.onnx.export(
            module,
            (x,),
            str(path),
            dynamo=False,
            opset_version=opset,
            dynamic_axes={n: {0: "batch"} for n in (INPUT_NAME, *OUTPUT_NAMES)},
            input_names=[INPUT_NAME],
            output_names=list(OUTPUT_NAMES),
        )
    except Exception as exc:
        raise ModelError(f"ONNX export to {path} failed: {exc}") from exc
    return "torchscript"


def check_parity(onnx_path: Path, module: nn.Module, x: np.ndarray, atol: float) -> float:
    """Max |ONNX Runtime - torch| of the probabilities on ``x``; ModelError above ``atol``.

    Embeddings are compared too, relative to their scale (they are unbounded activations).
    """
    import torch

    session = open_session(onnx_path)
    got_probs, got_emb = session.run(list(OUTPUT_NAMES), {INPUT_NAME: x})
    with torch.no_grad():
        want_probs, want_emb = (t.numpy() for t in module(torch.from_numpy(x)))
    if got_probs.shape != want_probs.shape or got_emb.shape != want_emb.shape:
        raise ModelError(
            f"{onnx_path}: ONNX output shapes {got_probs.shape}, {got_emb.shape} differ from "
            f"torch's {want_probs.shape}, {want_emb.shape}"
        )
    diff = float(np.max(np.abs(got_probs - want_probs))) if got_probs.size else 0.0
    emb_scale = max(1.0, float(np.max(np.abs(want_emb)))) if want_emb.size else 1.0
    emb_diff = float(np.max(np.abs(got_emb - want_emb))) / emb_scale if want_emb.size else 0.0
    if not np.isfinite(diff) or diff > atol:
        raise ModelError(
            f"{onnx_path}: ONNX Runtime and torch disagree: max |probability diff| {diff:.3g} "
            f"> gate.parity_atol {atol:g} on {len(x)} test images"
        )
    if not np.isfinite(emb_diff) or emb_diff > atol:
        raise ModelError(
            f"{onnx_path}: ONNX Runtime and torch embeddings disagree: relative max |diff| "
            f"{emb_diff:.3g} > gate.parity_atol {atol:g} on {len(x)} test images"
        )
    return diff


def _split_originals(path: Path, n: int) -> tuple[np.ndarray, np.ndarray] | None:
    """A prepared split's ``size`` (int64 ``(N, 2)`` width, height of each picture before
    preprocessing) and ``format`` (``(N,)`` file format names); image folders only, None
    for a split without them (MNIST, CIFAR-10). Raises :class:`DataError` for arrays that
    do not match the split's ``n`` images."""
    from visionops.data.ingest import read_npz

    with np.load(path, allow_pickle=False) as npz:
        if "size" not in npz.files or "format" not in npz.files:
            return None
    arrays = read_npz(path, ("size", "format"))
    sizes, formats = arrays["size"], arrays["format"]
    if sizes.shape != (n, 2) or formats.shape != (n,):
        raise DataError(
            f"{path}: 'size' is {sizes.shape} and 'format' {formats.shape}, expected ({n}, 2) "
            f"and ({n},); rerun prepare"
        )
    return sizes, formats


def run_export(params: Params, layout: Layout) -> ExportResult:
    """Export the best model of ``layout.comparison_json`` to ``layout.export_dir``."""
    import torch

    from visionops.data.transforms import PreprocessSpec, normalize
    from visionops.models.zoo import load_trained

    comparison = read_json(layout.comparison_json, "visionops compare")
    best = comparison.get("best_model")
    if not isinstance(best, str) or not best:
        raise DataError(f"{layout.comparison_json}: no 'best_model' (got {best!r})")
    model_dir = layout.model_dir(best)
    for required in (model_dir / "model.pt", model_dir / "config.json"):
        if not required.is_file():
            raise ModelError(missing_input(required))
    metrics = read_json(layout.eval_metrics(best), f"visionops evaluate {best}")

    torch.manual_seed(params.seed)
    model, config = load_trained(model_dir)
    if "preprocess" in config:
        spec = PreprocessSpec.from_dict(config["preprocess"])
    else:
        spec = PreprocessSpec.from_meta(read_json(layout.prepared_meta, "visionops prepare"))
    classes = config.get("classes")
    if not isinstance(classes, list) or not classes:
        raise ModelError(f"{model_dir / 'config.json'}: no 'classes' list")
    x_test, _ = load_split(layout.split_npz("test"))
    if len(x_test) == 0:
        raise DataError(f"{layout.split_npz('test')}: the test split is empty")
    x = normalize(x_test[:PARITY_SAMPLES], spec)
    x_val, y_val = load_split(layout.split_npz("val"))

    calibration: dict[str, Any] = {"method": "none", "temperature": 1.0}
    if params.export.temperature_scaling:
        from visionops.calibration import fit_temperature

        if len(x_val) == 0:
            raise DataError(
                f"{layout.split_npz('val')}: the validation split is empty; temperature "
                "scaling needs it (set export.temperature_scaling: false to skip it)"
            )
        fit = fit_temperature(
            validation_logits(model, normalize(x_val, spec)),
            y_val,
            params.evaluate.calibration_bins,
        )
        calibration = fit.to_dict()
        log.info(
            "temperature scaling: T = %.3f, validation ECE %.4f -> %.4f",
            fit.temperature,
            fit.ece_before,
            fit.ece_after,
        )

    module = export_module(model, float(calibration["temperature"]))
    # Build the folder beside the real one and swap it in only when parity holds, so a
    # failed export never leaves a half-written model where serving looks for one.
    staging = layout.export_dir.with_name(layout.export_dir.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        onnx_path = staging / MODEL_FILE
        exporter = export_onnx(module, x[:2], onnx_path)
        parity = check_parity(onnx_path, module, x, params.gate.parity_atol)
        p50, p95 = latency_ms(open_session(onnx_path), x[:1])
        architecture = str(config.get("architecture", best))
        metadata = {
            "name": params.model_name(),
            "architecture": architecture,
            "classes": [str(c) for c in classes],
            "preprocess": spec.to_dict(),
            "input_name": INPUT_NAME,
            "outputs": list(OUTPUT_NAMES),
            "metrics": numeric_metrics(metrics),
            "parity_max_abs_diff": parity,
            "calibration": calibration,
            "opset": OPSET,
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
            "git_sha": git_sha(layout.root),
        }
        (staging / METADATA_FILE).write_text(json.dumps(metadata, indent=2) + "\n")
        # Monitoring: what this model sees and says on the validation split, stored with
        # it (registration logs the whole folder, so it travels with every version).
        from visionops.monitor.reference import build_reference_profile

        originals = _split_originals(layout.split_npz("val"), len(x_val))
        # The OOD detector first: the reference records its scores' per-class quantiles.
        detector = calibrate_ood(staging, layout, spec, x_val, params)
        metadata["ood"] = detector.to_metadata()
        reference = build_reference_profile(
            staging,
            x_val,
            spec,
            y_val,
            classes=[str(c) for c in classes],
            seed=params.seed,
            original_sizes=originals[0] if originals else None,
            original_formats=[str(f) for f in originals[1]] if originals else None,
            ood_detector=detector,
        )
        log.info("reference profile: %s", reference.describe())
        (staging / METADATA_FILE).write_text(json.dumps(metadata, indent=2) + "\n")
        shutil.rmtree(layout.export_dir, ignore_errors=True)
        staging.rename(layout.export_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)

    onnx_final = layout.export_dir / MODEL_FILE
    log.info("exported %s with %s, parity %.2e", best, exporter, parity)
    return ExportResult(
        model=best,
        architecture=architecture,
        onnx_path=onnx_final,
        metadata_path=layout.export_dir / METADATA_FILE,
        parity_max_abs_diff=parity,
        latency_p50_ms=p50,
        latency_p95_ms=p95,
        onnx_bytes=onnx_final.stat().st_size,
        exporter=exporter,
    )


def calibrate_ood(
    folder: Path, layout: Layout, spec: PreprocessSpec, x_val: np.ndarray, params: Params
) -> OodDetector:
    """Calibrate the out-of-distribution test of the model in ``folder`` and save its bank.

    The bank is a seeded sample of ``ood.bank_size`` training-split embeddings; the
    threshold is set on the whole validation split (other images than the bank's) so that
    ``ood.false_rejection_rate`` of it is rejected; with ``ood.dims`` the distances are
    taken in the bank's top principal directions. Writes ``folder/ood_bank.npy`` (and
    ``ood_projection.npy``).
    """
    from visionops.monitor.reference import score_images
    from visionops.ood import calibrate

    x_train, _ = load_split(layout.split_npz("train"))
    if len(x_train) == 0:
        raise DataError(f"{layout.split_npz('train')}: the training split is empty")
    rng = np.random.default_rng(params.seed)
    size = min(len(x_train), params.ood.bank_size)
    pick = np.sort(rng.choice(len(x_train), size=size, replace=False))
    session = open_session(folder / MODEL_FILE)
    _, bank = score_images(session, x_train[pick], spec)
    _, val = score_images(session, x_val, spec)
    detector = calibrate(
        bank,
        val,
        params.ood.false_rejection_rate,
        k=min(params.ood.k, len(bank)),
        # Ink is a single-channel notion (ink bright on black); colour images have none.
        min_ink_pixels=params.ood.min_ink_pixels if spec.channels == 1 else 0,
        val_pixels=x_val if spec.channels == 1 else None,
        dims=params.ood.dims,
    )
    detector.save_bank(folder)
    log.info(
        "OOD: k=%d nearest of %d training embeddings, threshold %.4f rejects %.2f%% of %d "
        "validation images",
        detector.k,
        len(bank),
        detector.threshold,
        100 * detector.calibration["rejected_share"],
        len(val),
    )
    return detector
