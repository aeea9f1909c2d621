"""MLflow tracking, model registry and the promotion gate: the only module that imports mlflow.

Tracking
    One *parent* run per pipeline execution and one nested run per stage
    (:func:`stage_run`). The parent comes from ``VISIONOPS_PARENT_RUN_ID`` (set by
    ``visionops pipeline run`` for the DVC stages), else from
    ``layout.state_dir/parent_run.json`` while that run is still RUNNING, else a new parent
    is started and recorded there. The report stage ends it.

Registry
    :func:`run_register` logs the exported folder as a pyfunc model written *from code*
    (the model's Python source travels with it, nothing is pickled), registers a version
    and points the alias ``challenger`` at it. :func:`resolve_served_model` turns a
    registry URI back into a local folder with ``model.onnx`` + ``metadata.json``.

Gate
    :func:`run_gate` moves ``champion`` to the challenger only when it is not worse:
    accuracy within ``gate.accuracy_tolerance``, McNemar's test not significant in the
    champion's favour, p95 latency at batch 1 within budget, ONNX parity held at export,
    test ECE within ``gate.max_ece`` (the checks themselves: :mod:`visionops.gate_checks`).
    :func:`promote` (optionally forced) and :func:`rollback` move the alias by hand; a
    registered-model tag keeps the champion history that rollback walks back.

Where the tracking store lives comes from :func:`visionops.config.load_settings`
(``MLFLOW_TRACKING_URI``; default ``sqlite:///<root>/mlflow.db``), so a server or
PostgreSQL needs no code change. Heavy imports (mlflow, scipy, onnxruntime) happen inside
functions: importing this module is cheap and never touches a store.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlparse

import numpy as np

from visionops.config import Settings, load_settings
from visionops.errors import DataError, RegistryError, VisionOpsError
from visionops.gate_checks import GateCheck, calibration_check, mcnemar
from visionops.stages import missing_input

if TYPE_CHECKING:
    from mlflow import MlflowClient

    from visionops.config import Params
    from visionops.layout import Layout

log = logging.getLogger(__name__)

PARENT_ENV = "VISIONOPS_PARENT_RUN_ID"
CHALLENGER = "challenger"
CHAMPION = "champion"
#: Registered-model tag: JSON list of the versions that were champion, oldest first.
HISTORY_TAG = "visionops.champion_history"
HISTORY_LIMIT = 100
PARENT_STATE_FILE = "parent_run.json"
MODEL_FILE = "model.onnx"
METADATA_FILE = "metadata.json"
#: Name of the exported folder inside the logged pyfunc model's artifacts.
EXPORTED_ARTIFACT = "exported"

# --------------------------------------------------------------------------- connection


def display_uri(uri: str) -> str:
    """A tracking URI fit for messages: credentials removed."""
    return re.sub(r"//[^/@]+@", "//***@", uri)


def _artifact_location(settings: Settings) -> str | None:
    """Artifact root for new experiments; a tracking *server* picks its own unless told."""
    remote = settings.tracking_uri.split(":", 1)[0] in {"http", "https", "databricks"}
    if remote and not os.environ.get("VISIONOPS_ARTIFACT_ROOT"):
        return None
    return settings.artifact_root


def _client(settings: Settings) -> MlflowClient:
    """An MlflowClient on the configured store; also points mlflow's fluent API there.

    The model registry follows the tracking store unless ``MLFLOW_REGISTRY_URI`` says
    otherwise (MLflow's own rule).
    """
    import mlflow
    from mlflow import MlflowClient

    mlflow.set_tracking_uri(settings.tracking_uri)
    return MlflowClient(tracking_uri=settings.tracking_uri)


def _connect(layout: Layout) -> tuple[MlflowClient, Settings]:
    settings = load_settings(layout.root)
    return _client(settings), settings


def _not_found(exc: Exception) -> bool:
    from mlflow.exceptions import MlflowException

    return isinstance(exc, MlflowException) and exc.error_code in {
        "RESOURCE_DOES_NOT_EXIST",
        "NOT_FOUND",
    }


def _experiment_id(client: MlflowClient, name: str, settings: Settings) -> str:
    """The experiment's id, creating it (with our artifact root) when missing."""
    from mlflow.exceptions import MlflowException

    exp = client.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage != "active":
            raise RegistryError(
                f"MLflow experiment '{name}' is deleted in {display_uri(settings.tracking_uri)}: "
                "restore it (`mlflow experiments restore`) or set registry.experiment"
            )
        return str(exp.experiment_id)
    try:
        return str(client.create_experiment(name, artifact_location=_artifact_location(settings)))
    except MlflowException:
        # Another process created it between our lookup and the create.
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return str(exp.experiment_id)


# --------------------------------------------------------------------------- params


def _param_value(value: Any) -> str:
    if value is None or isinstance(value, list | dict | bool):
        return json.dumps(value)
    return str(value)


def flatten_params(params: Params) -> dict[str, str]:
    """``{"train.epochs": "6", ...}``: every param as a dotted key and a string."""
    out: dict[str, str] = {}

    def walk(prefix: str, node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                walk(f"{prefix}.{key}" if prefix else str(key), value)
        else:
            out[prefix] = _param_value(node)

    from visionops.stages import all_params

    params = all_params(params)
    walk("", params.model_dump(mode="json"))
    out["model_name"] = params.model_name()
    return out


def stage_params(stage: str, params: Params) -> dict[str, str]:
    """The flattened params stage ``stage`` (``train-cnn`` counts as ``train``) depends on."""
    from visionops.stages import COMMAND_PARAMS

    prefixes = COMMAND_PARAMS.get(stage.split("-", 1)[0], ())
    return {
        k: v
        for k, v in flatten_params(params).items()
        if any(k == p or k.startswith(p + ".") for p in prefixes)
    }


# --------------------------------------------------------------------------- runs


class StageTracker:
    """Logging handle for one stage's nested run (see :func:`stage_run`)."""

    def __init__(self, client: MlflowClient, run_id: str, stage: str, parent_run_id: str) -> None:
        self._client = client
        self.run_id = run_id
        self.stage = stage
        self.parent_run_id = parent_run_id

    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        """Log the numeric entries of ``metrics`` (others are skipped).

        Without ``step``, an ``epoch`` entry is used as the step, so per-epoch callbacks
        make proper curves.
        """
        from mlflow.entities import Metric

        if step is None and isinstance(metrics.get("epoch"), int):
            step = int(metrics["epoch"])
        now = int(time.time() * 1000)
        items = [
            Metric(str(k), float(v), now, step or 0)
            for k, v in metrics.items()
            if isinstance(v, int | float | np.number)
        ]
        if items:
            self._client.log_batch(self.run_id, metrics=items)

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Log params; nested mappings become dotted keys."""
        _log_params(self._client, self.run_id, params)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        p = Path(path)
        if not p.exists():
            raise DataError(f"cannot log {p} to MLflow: file not found")
        self._client.log_artifact(self.run_id, str(p), artifact_path)

    def log_artifacts(self, directory: str | Path, artifact_path: str | None = None) -> None:
        d = Path(directory)
        if not d.is_dir():
            raise DataError(f"cannot log {d} to MLflow: folder not found")
        self._client.log_artifacts(self.run_id, str(d), artifact_path)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        from mlflow.entities import RunTag

        items = [RunTag(str(k), str(v)) for k, v in tags.items()]
        if items:
            self._client.log_batch(self.run_id, tags=items)

    def log_parent_artifact(self, path: str | Path) -> None:
        """Attach a file to the pipeline's parent run (the report does this)."""
        p = Path(path)
        if not p.exists():
            raise DataError(f"cannot log {p} to MLflow: file not found")
        self._client.log_artifact(self.parent_run_id, str(p))


def _log_params(client: MlflowClient, run_id: str, params: Mapping[str, Any]) -> None:
    from mlflow.entities import Param
    from mlflow.exceptions import MlflowException

    flat: dict[str, str] = {}

    def walk(prefix: str, node: Any) -> None:
        if isinstance(node, Mapping):
            for key, value in node.items():
                walk(f"{prefix}.{key}" if prefix else str(key), value)
        else:
            flat[prefix] = node if isinstance(node, str) else _param_value(node)

    walk("", params)
    items = [Param(k, v[:6000]) for k, v in flat.items()]
    for i in range(0, len(items), 100):
        try:
            client.log_batch(run_id, params=items[i : i + 100])
        except MlflowException as exc:
            # Params are immutable in MLflow; a re-run with other values must not crash.
            log.warning("could not log params on run %s: %s", run_id, exc)


def _parent_state_path(layout: Layout) -> Path:
    return layout.state_dir / PARENT_STATE_FILE


def _read_parent_state(layout: Layout) -> dict[str, Any] | None:
    path = _parent_state_path(layout)
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return state if isinstance(state, dict) and isinstance(state.get("run_id"), str) else None


def _active_run(client: MlflowClient, run_id: str) -> Any | None:
    """The run if it exists, is not deleted and is still RUNNING."""
    try:
        run = client.get_run(run_id)
    except Exception as exc:
        if _not_found(exc):
            return None
        raise
    if run.info.status == "RUNNING" and run.info.lifecycle_stage == "active":
        return run
    return None


def _current_parent(client: MlflowClient, settings: Settings, layout: Layout) -> Any | None:
    """The pipeline's parent run: from the environment, else the recorded RUNNING one."""
    env_id = os.environ.get(PARENT_ENV)
    if env_id:
        try:
            return client.get_run(env_id)
        except Exception as exc:
            if _not_found(exc):
                raise RegistryError(
                    f"{PARENT_ENV}={env_id}: no such MLflow run in "
                    f"{display_uri(settings.tracking_uri)}"
                ) from None
            raise
    state = _read_parent_state(layout)
    if state is None or state.get("tracking_uri") != settings.tracking_uri:
        return None
    return _active_run(client, state["run_id"])


def _start_parent(client: MlflowClient, settings: Settings, params: Params, layout: Layout) -> Any:
    from visionops.artifacts import git_sha

    experiment_id = _experiment_id(client, params.registry.experiment, settings)
    tags = {"visionops.kind": "pipeline", "visionops.model_name": params.model_name()}
    sha = git_sha(layout.root)
    if sha:
        tags["mlflow.source.git.commit"] = sha
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    run = client.create_run(experiment_id, run_name=f"pipeline-{stamp}", tags=tags)
    path = _parent_state_path(layout)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {
        "run_id": run.info.run_id,
        "experiment_id": experiment_id,
        "tracking_uri": settings.tracking_uri,
        "started": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    path.write_text(json.dumps(state, indent=2) + "\n")
    log.info("started pipeline run %s", run.info.run_id)
    return run


def _load_params_for(layout: Layout) -> Params:
    from visionops.config import Params, load_params

    path = layout.root / "params.yaml"
    return load_params(path) if path.is_file() else Params()


def start_pipeline_run(layout: Layout, params: Params | None = None) -> str:
    """Start a new parent run for one pipeline execution, record it, return its id.

    A parent left RUNNING by an interrupted pipeline is marked KILLED first. ``params``
    default to ``<root>/params.yaml``; they are logged on the parent.
    """
    params = params or _load_params_for(layout)
    client, settings = _connect(layout)
    state = _read_parent_state(layout)
    if state and state.get("tracking_uri") == settings.tracking_uri:
        stale = _active_run(client, state["run_id"])
        if stale is not None:
            log.warning("marking unfinished pipeline run %s as KILLED", state["run_id"])
            client.set_terminated(state["run_id"], "KILLED")
    run = _start_parent(client, settings, params, layout)
    _log_params(client, run.info.run_id, flatten_params(params))
    return str(run.info.run_id)


def end_pipeline_run(
    layout: Layout, status: str = "FINISHED", run_id: str | None = None
) -> str | None:
    """End the pipeline's parent run if it is still RUNNING; return its id (None: none)."""
    if status not in {"FINISHED", "FAILED", "KILLED"}:
        raise VisionOpsError(f"run status must be FINISHED, FAILED or KILLED (got {status!r})")
    client, settings = _connect(layout)
    if run_id is None:
        run_id = os.environ.get(PARENT_ENV) or None
    if run_id is None:
        state = _read_parent_state(layout)
        if state is None or state.get("tracking_uri") != settings.tracking_uri:
            return None
        run_id = str(state["run_id"])
    if _active_run(client, run_id) is None:
        return None
    client.set_terminated(run_id, status)
    log.info("pipeline run %s ended: %s", run_id, status)
    return run_id


@contextmanager
def stage_run(stage: str, params: Params, layout: Layout) -> Iterator[StageTracker]:
    """A nested MLflow run for one stage under the pipeline's parent run.

    Logs the flattened params on the parent once and the stage's own params on the
    nested run. If the body raises, the nested run is marked FAILED (KILLED on Ctrl-C)
    with the error as a tag, and the exception propagates.
    """
    from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

    client, settings = _connect(layout)
    parent = _current_parent(client, settings, layout)
    if parent is None:
        parent = _start_parent(client, settings, params, layout)
    parent_id = str(parent.info.run_id)
    if not parent.data.params:
        _log_params(client, parent_id, flatten_params(params))
    run = client.create_run(
        str(parent.info.experiment_id),
        run_name=stage,
        tags={MLFLOW_PARENT_RUN_ID: parent_id, "visionops.stage": stage},
    )
    tracker = StageTracker(client, str(run.info.run_id), stage, parent_id)
    tracker.log_params(stage_params(stage, params))
    with _ended(client, tracker):
        yield tracker


@contextmanager
def tuning_run(
    study: str, params: Params, layout: Layout, run_id: str | None = None
) -> Iterator[StageTracker]:
    """The parent run of a tuning study; each trial is a :func:`nested_run` under it.

    ``run_id`` (recorded in the Optuna study by the first worker) resumes that run, so
    workers on several machines sharing one tracking store log their trials under one
    parent; when it is not in this store, a new parent ``tune-<study>`` is started with
    the params logged. Ends FINISHED, or FAILED (KILLED on Ctrl-C) if the body raises.
    """
    client, settings = _connect(layout)
    run = None
    if run_id:
        try:
            run = client.get_run(run_id)
        except Exception as exc:
            if not _not_found(exc):
                raise
        if run is not None and run.info.lifecycle_stage != "active":
            run = None
    if run is None:
        experiment_id = _experiment_id(client, params.registry.experiment, settings)
        tags = {
            "visionops.kind": "tune",
            "visionops.study": study,
            "visionops.model_name": params.model_name(),
        }
        run = client.create_run(experiment_id, run_name=f"tune-{study}", tags=tags)
        _log_params(client, run.info.run_id, flatten_params(params))
    else:
        client.update_run(run.info.run_id, status="RUNNING")
    parent_id = str(run.info.run_id)
    tracker = StageTracker(client, parent_id, "tune", parent_id)
    with _ended(client, tracker):
        yield tracker


@contextmanager
def nested_run(
    parent: StageTracker,
    name: str,
    tags: Mapping[str, Any] | None = None,
    finished_on: tuple[type[BaseException], ...] = (),
) -> Iterator[StageTracker]:
    """A run nested under ``parent`` (a tuning trial under its study's run).

    Ends FINISHED, or FAILED (KILLED on Ctrl-C) if the body raises -- except for the
    exception types in ``finished_on`` (a pruned trial), which end it FINISHED and
    propagate.
    """
    from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

    client = parent._client
    experiment_id = client.get_run(parent.run_id).info.experiment_id
    all_tags = {MLFLOW_PARENT_RUN_ID: parent.run_id, "visionops.stage": name}
    all_tags.update({str(k): str(v) for k, v in (tags or {}).items()})
    run = client.create_run(str(experiment_id), run_name=name, tags=all_tags)
    tracker = StageTracker(client, str(run.info.run_id), name, parent.run_id)
    with _ended(client, tracker, finished_on):
        yield tracker


@contextmanager
def _ended(
    client: MlflowClient, tracker: StageTracker, finished_on: tuple[type[BaseException], ...] = ()
) -> Iterator[None]:
    """Terminate ``tracker``'s run when the block ends: FINISHED, FAILED or KILLED."""
    try:
        yield
    except finished_on:
        client.set_terminated(tracker.run_id, "FINISHED")
        raise
    except BaseException as exc:
        status = "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED"
        try:
            tracker.set_tags({"visionops.error": f"{type(exc).__name__}: {exc}"[:5000]})
            client.set_terminated(tracker.run_id, status)
        except Exception as log_exc:  # the body's own error matters more
            log.warning("could not mark run %s %s: %s", tracker.run_id, status, log_exc)
        raise
    client.set_terminated(tracker.run_id, "FINISHED")


# --------------------------------------------------------------------------- registering

# The pyfunc model, logged *from code*: MLflow stores this source beside the artifacts and
# executes it on load, so `mlflow models serve` needs no visionops and nothing is pickled.
_PYFUNC_SOURCE = '''\
"""visionops ONNX image classifier as an MLflow pyfunc model (models from code).

Input: float32 (N, C, H, W) already normalised with metadata.json's "preprocess" (exactly
what the ONNX graph takes); rows of C*H*W values are reshaped. Output: probabilities
(N, K), columns in the order of metadata.json's "classes".
"""

import json
import os

import mlflow
import numpy as np


class OnnxImageClassifier(mlflow.pyfunc.PythonModel):
    def load_context(self, context):
        import onnxruntime as ort

        folder = context.artifacts["exported"]
        with open(os.path.join(folder, "metadata.json")) as f:
            self.metadata = json.load(f)
        spec = self.metadata["preprocess"]
        size = int(spec["image_size"])
        self.shape = (int(spec["channels"]), size, size)
        self.input_name = self.metadata.get("input_name", "input")
        self.session = ort.InferenceSession(
            os.path.join(folder, "model.onnx"), providers=["CPUExecutionProvider"]
        )

    def predict(self, context, model_input: np.ndarray, params=None):
        x = np.asarray(model_input, dtype=np.float32).reshape((-1, *self.shape))
        (probabilities,) = self.session.run(["probabilities"], {self.input_name: x})
        return probabilities


mlflow.models.set_model(OnnxImageClassifier())
'''


@dataclass(frozen=True)
class RegisterResult:
    name: str
    version: str
    run_id: str
    model_uri: str
    aliases: tuple[str, ...] = (CHALLENGER,)

    def summary(self) -> dict[str, float]:
        return {"registered_version": float(self.version)}

    def describe(self) -> str:
        return f"{self.name} version {self.version} as '{CHALLENGER}' ({self.model_uri})"


def _serving_requirements() -> list[str]:
    """Pinned requirements of the pyfunc model; explicit, so MLflow does not infer them."""
    from importlib.metadata import PackageNotFoundError, version

    reqs = []
    for pkg in ("mlflow", "onnxruntime", "numpy"):
        try:
            reqs.append(f"{pkg}=={version(pkg)}")
        except PackageNotFoundError:
            reqs.append(pkg)
    return reqs


def _signature(metadata: dict[str, Any]) -> Any:
    from mlflow.models.signature import ModelSignature
    from mlflow.types.schema import Schema, TensorSpec

    spec = metadata["preprocess"]
    size, channels = int(spec["image_size"]), int(spec["channels"])
    f32 = np.dtype(np.float32)
    return ModelSignature(
        inputs=Schema([TensorSpec(f32, (-1, channels, size, size))]),
        outputs=Schema([TensorSpec(f32, (-1, len(metadata["classes"])))]),
    )


def _input_example(metadata: dict[str, Any]) -> np.ndarray:
    spec = metadata["preprocess"]
    size, channels = int(spec["image_size"]), int(spec["channels"])
    return np.zeros((1, channels, size, size), dtype=np.float32)


def _read_exported(folder: Path) -> dict[str, Any]:
    """metadata.json of an exported folder after checking both files are there."""
    from visionops.artifacts import read_json

    if not (folder / MODEL_FILE).is_file():
        raise DataError(missing_input(folder / MODEL_FILE, "visionops export"))
    metadata = read_json(folder / METADATA_FILE, "visionops export")
    for key in ("classes", "preprocess"):
        if key not in metadata:
            raise DataError(f"{folder / METADATA_FILE}: missing '{key}'")
    return metadata


def _ensure_registered_model(client: MlflowClient, name: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
        return
    except MlflowException as exc:
        if not _not_found(exc):
            raise
    try:
        client.create_registered_model(
            name,
            description="Image classifier trained by the visionops pipeline. Aliases: "
            "'challenger' = last registered, 'champion' = served (moved by the gate).",
        )
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise


def run_register(params: Params, layout: Layout) -> RegisterResult:
    """Register ``layout.export_dir`` as a new version of ``params.model_name()``.

    The version gets the alias ``challenger`` and tags (git sha, architecture, test
    accuracy, data source); ``layout.registration_json`` records it for the gate.
    """
    import mlflow

    export_dir = layout.export_dir
    metadata = _read_exported(export_dir)
    name = params.model_name()
    with stage_run("register", params, layout) as tracker:
        client = tracker._client
        tracker.log_artifacts(export_dir, EXPORTED_ARTIFACT)
        with tempfile.TemporaryDirectory(prefix="visionops-pyfunc-") as tmp:
            code = Path(tmp) / "onnx_image_classifier.py"
            code.write_text(_PYFUNC_SOURCE)
            # log_model needs an active fluent run; resuming the stage's run provides it.
            with mlflow.start_run(run_id=tracker.run_id):
                info = mlflow.pyfunc.log_model(
                    name="model",
                    python_model=str(code),
                    artifacts={EXPORTED_ARTIFACT: str(export_dir)},
                    signature=_signature(metadata),
                    # Also proves the logged model loads and predicts, and documents the
                    # request format for `mlflow models serve`.
                    input_example=_input_example(metadata),
                    pip_requirements=_serving_requirements(),
                )
        metrics = metadata.get("metrics") or {}
        tags = {
            "git_sha": metadata.get("git_sha") or "unknown",
            "architecture": metadata.get("architecture", "unknown"),
            "test_accuracy": metrics.get("accuracy", "unknown"),
            "data_source": params.data.source,
            "data_path": params.data.path,
            "classes": len(metadata["classes"]),
            "parity_max_abs_diff": metadata.get("parity_max_abs_diff", "unknown"),
        }
        _ensure_registered_model(client, name)
        mv = client.create_model_version(
            name,
            source=info.model_uri,
            run_id=tracker.run_id,
            tags={k: str(v) for k, v in tags.items()},
            model_id=info.model_id,
        )
        version = str(mv.version)
        client.set_registered_model_alias(name, CHALLENGER, version)
        result = RegisterResult(
            name=name, version=version, run_id=tracker.run_id, model_uri=f"models:/{name}/{version}"
        )
        tracker.set_tags({"registered_model": name, "registered_version": version})
        tracker.log_metrics(result.summary())
        layout.registration_json.parent.mkdir(parents=True, exist_ok=True)
        registration = {
            "name": name,
            "version": version,
            "run_id": tracker.run_id,
            "model_uri": result.model_uri,
        }
        layout.registration_json.write_text(json.dumps(registration, indent=2) + "\n")
    log.info("registered %s version %s", name, version)
    return result


# --------------------------------------------------------------------------- resolving


@dataclass(frozen=True)
class ServedModelRef:
    """A local folder holding ``model.onnx`` + ``metadata.json`` and where it came from."""

    path: Path
    name: str | None
    version: str | None
    alias: str | None

    def describe(self) -> str:
        where = f"{self.name} version {self.version}" if self.version else str(self.name)
        via = f" (alias '{self.alias}')" if self.alias else ""
        return f"{where}{via} at {self.path}"


def _check_model_folder(folder: Path, what: str) -> Path:
    missing = [f for f in (MODEL_FILE, METADATA_FILE) if not (folder / f).is_file()]
    if missing:
        raise RegistryError(
            f"{what}: {folder} lacks {' and '.join(missing)} "
            f"(a served model folder holds {MODEL_FILE} and {METADATA_FILE})"
        )
    return folder


def _find_model_folder(root: Path, what: str) -> Path:
    """The folder with model.onnx + metadata.json inside a downloaded pyfunc model."""
    for candidate in (root / "artifacts" / EXPORTED_ARTIFACT, root):
        if (candidate / MODEL_FILE).is_file() and (candidate / METADATA_FILE).is_file():
            return candidate
    for meta in sorted(root.rglob(METADATA_FILE)):
        if (meta.parent / MODEL_FILE).is_file():
            return meta.parent
    raise RegistryError(f"{what} holds no {MODEL_FILE} + {METADATA_FILE} (not a visionops model?)")


def _local_path(uri: str) -> Path | None:
    parsed = urlparse(uri)
    if parsed.scheme == "file":
        return Path(unquote(parsed.path))
    if parsed.scheme == "" or (len(parsed.scheme) == 1 and uri[1:3] in {":\\", ":/"}):
        return Path(uri)
    return None


def _version_folder(
    client: MlflowClient, settings: Settings, name: str, version: str, cache_dir: Path | None
) -> Path:
    """A local folder with the files of model ``name`` version ``version``."""
    import mlflow

    what = f"models:/{name}/{version}"
    uri = client.get_model_version_download_uri(name, version)
    local = _local_path(uri)
    if local is not None and local.is_dir():
        return _find_model_folder(local, what)
    # Remote artifact store: download once per (store, model, version); versions are
    # immutable, so a complete earlier download is reused.
    key = hashlib.sha256(f"{settings.tracking_uri}|{name}|{version}".encode()).hexdigest()[:16]
    base = cache_dir or Path(tempfile.gettempdir()) / "visionops-models"
    target = base / f"{re.sub(r'[^A-Za-z0-9_.-]', '_', name)}-v{version}-{key}"
    if not target.is_dir():
        base.mkdir(parents=True, exist_ok=True)
        partial = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=base))
        try:
            mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(partial))
            partial.rename(target)
        except OSError:
            if not target.is_dir():  # else a concurrent download finished first: fine
                raise
        except Exception as exc:  # MLflow raises its own types for unreachable stores
            raise RegistryError(f"cannot download {what} from {display_uri(uri)}: {exc}") from None
        finally:
            shutil.rmtree(partial, ignore_errors=True)
    return _find_model_folder(target, what)


def _registered_model(client: MlflowClient, settings: Settings, name: str) -> Any:
    try:
        return client.get_registered_model(name)
    except Exception as exc:
        if _not_found(exc):
            raise RegistryError(
                f"no registered model '{name}' in {display_uri(settings.tracking_uri)} "
                "(run the pipeline (`dvc repro`), or set MLFLOW_TRACKING_URI to the right store)"
            ) from None
        raise


def _model_version(client: MlflowClient, settings: Settings, name: str, version: str) -> Any:
    try:
        return client.get_model_version(name, version)
    except Exception as exc:
        if _not_found(exc) or "INVALID_PARAMETER_VALUE" in str(getattr(exc, "error_code", "")):
            known = sorted(
                (mv.version for mv in client.search_model_versions(f"name='{name}'")), key=int
            )
            raise RegistryError(
                f"model '{name}' has no version {version!r} (versions: "
                f"{', '.join(map(str, known)) or 'none'})"
            ) from None
        raise


def _alias_version(client: MlflowClient, name: str, alias: str) -> str | None:
    """The version ``alias`` points at, or None (also when the model does not exist)."""
    try:
        rm = client.get_registered_model(name)
    except Exception as exc:
        if _not_found(exc):
            return None
        raise
    version = (rm.aliases or {}).get(alias)
    return None if version is None else str(version)


def _check_store_exists(settings: Settings) -> None:
    """A default SQLite store that does not exist yet would be created empty: refuse."""
    uri = settings.tracking_uri
    if uri.startswith("sqlite:///"):
        path = Path(uri[len("sqlite:///") :])
        if not path.is_file():
            raise RegistryError(
                f"MLflow tracking store {path} does not exist: run the pipeline "
                "(`dvc repro`) first or set MLFLOW_TRACKING_URI"
            )


def resolve_served_model(
    uri: str | Path, root: Path | None = None, cache_dir: Path | None = None
) -> ServedModelRef:
    """Turn ``models:/NAME@ALIAS``, ``models:/NAME/VERSION`` or a folder into a local folder.

    The tracking store comes from :func:`~visionops.config.load_settings` (``root``
    defaults to the working directory). Registry files on a local artifact store are used
    in place; remote ones are downloaded once into ``cache_dir`` (default: the system
    temporary directory). Raises :class:`RegistryError` with the reason.
    """
    text = str(uri)
    if not text.startswith("models:/"):
        folder = Path(text).expanduser()
        if not folder.is_dir():
            raise RegistryError(f"model folder not found: {folder}")
        folder = _check_model_folder(folder, "model folder")
        name = None
        try:
            meta = json.loads((folder / METADATA_FILE).read_text())
            name = meta.get("name") if isinstance(meta, dict) else None
        except (OSError, ValueError):
            pass  # serving validates metadata itself and reports it properly
        return ServedModelRef(path=folder.resolve(), name=name, version=None, alias=None)

    body = text[len("models:/") :]
    alias: str | None = None
    version: str | None = None
    if "@" in body and "/" not in body:
        name, alias = body.split("@", 1)
    elif body.count("/") == 1 and "@" not in body:
        name, version = body.split("/", 1)
        if not version.isdigit():
            raise RegistryError(f"{text}: version must be a number (or use models:/NAME@ALIAS)")
    else:
        raise RegistryError(f"{text}: expected models:/NAME@ALIAS or models:/NAME/VERSION")
    if not name or (alias is not None and not alias):
        raise RegistryError(f"{text}: expected models:/NAME@ALIAS or models:/NAME/VERSION")

    settings = load_settings(root)
    _check_store_exists(settings)
    client = _client(settings)
    rm = _registered_model(client, settings, name)
    if alias is not None:
        aliases = rm.aliases or {}
        if alias not in aliases:
            known = ", ".join(sorted(aliases)) or "none"
            raise RegistryError(f"model '{name}' has no alias '{alias}' (aliases: {known})")
        version = str(aliases[alias])
    assert version is not None
    _model_version(client, settings, name, version)
    folder = _version_folder(client, settings, name, version, cache_dir)
    return ServedModelRef(path=folder, name=name, version=version, alias=alias)


# --------------------------------------------------------------------------- gate


@dataclass
class GateDecision:
    """Whether ``champion`` moved to the challenger, and why.

    ``layout.gate_json`` (a DVC metrics file) gets :meth:`headline`, numbers and
    booleans; ``layout.gate_report`` gets :meth:`to_dict`, the whole decision.
    """

    model_name: str
    challenger_version: str
    champion_version_before: str | None
    promoted: bool = False
    forced: bool = False
    challenger_accuracy: float | None = None
    champion_accuracy: float | None = None
    mcnemar_p_value: float | None = None
    mcnemar_method: str | None = None
    discordant_champion_only: int | None = None
    discordant_challenger_only: int | None = None
    latency_p95_ms: float | None = None
    parity_max_abs_diff: float | None = None
    test_ece: float | None = None
    n_test: int | None = None
    reasons: list[str] = field(default_factory=list)
    checks: list[GateCheck] = field(default_factory=list)

    @property
    def champion_version_after(self) -> str | None:
        return self.challenger_version if self.promoted else self.champion_version_before

    def to_dict(self) -> dict[str, Any]:
        """The decision as metrics-friendly JSON (numbers where possible)."""

        def num(v: str | None) -> int | None:
            return None if v is None else int(v)

        return {
            "model_name": self.model_name,
            "promoted": self.promoted,
            "forced": self.forced,
            "challenger_version": num(self.challenger_version),
            "champion_version_before": num(self.champion_version_before),
            "champion_version_after": num(self.champion_version_after),
            "challenger_accuracy": self.challenger_accuracy,
            "champion_accuracy": self.champion_accuracy,
            "mcnemar_p_value": self.mcnemar_p_value,
            "mcnemar_method": self.mcnemar_method,
            "discordant_champion_only": self.discordant_champion_only,
            "discordant_challenger_only": self.discordant_challenger_only,
            "latency_p95_ms": self.latency_p95_ms,
            "parity_max_abs_diff": self.parity_max_abs_diff,
            "test_ece": self.test_ece,
            "n_test": self.n_test,
            "reasons": list(self.reasons),
            "checks": {c.name: c.to_dict() for c in self.checks},
        }

    def headline(self) -> dict[str, Any]:
        """Numbers and booleans for ``dvc metrics show``: no names, reasons or checks."""
        full = self.to_dict()
        keys = (
            "promoted",
            "forced",
            "challenger_version",
            "champion_version_after",
            "challenger_accuracy",
            "champion_accuracy",
            "mcnemar_p_value",
            "latency_p95_ms",
            "parity_max_abs_diff",
            "test_ece",
        )
        return {k: full[k] for k in keys}

    def summary(self) -> dict[str, float]:
        out = {"promoted": float(self.promoted)}
        for key in ("challenger_accuracy", "champion_accuracy", "mcnemar_p_value"):
            value = getattr(self, key)
            if value is not None:
                out[key] = float(value)
        if self.latency_p95_ms is not None:
            out["latency_p95_ms"] = float(self.latency_p95_ms)
        if self.test_ece is not None:
            out["test_ece"] = float(self.test_ece)
        return out

    def tags(self) -> dict[str, str]:
        """The decision as MLflow tags (``gate.*``) for the version and its run."""

        def text(v: Any) -> str:
            return "none" if v is None else str(v)

        return {
            "gate.promoted": str(self.promoted).lower(),
            "gate.forced": str(self.forced).lower(),
            "gate.champion_version_before": text(self.champion_version_before),
            "gate.challenger_accuracy": text(self.challenger_accuracy),
            "gate.champion_accuracy": text(self.champion_accuracy),
            "gate.mcnemar_p_value": text(self.mcnemar_p_value),
            "gate.latency_p95_ms": text(self.latency_p95_ms),
            "gate.test_ece": text(self.test_ece),
            "gate.reasons": "; ".join(self.reasons)[:5000],
            "gate.decided_at": datetime.now(UTC).isoformat(timespec="seconds"),
        }

    def describe(self) -> str:
        if self.promoted:
            head = f"{self.model_name} version {self.challenger_version} is now '{CHAMPION}'"
            if self.champion_version_before == self.challenger_version:
                head = f"{self.model_name} version {self.challenger_version} stays '{CHAMPION}'"
        else:
            kept = self.champion_version_before
            head = (
                f"{self.model_name} version {self.challenger_version} NOT promoted; "
                f"'{CHAMPION}' stays version {kept}"
            )
        return f"{head}: {'; '.join(self.reasons)}"


@dataclass
class _Evaluated:
    folder: Path
    metadata: dict[str, Any]
    correct: np.ndarray
    probabilities: np.ndarray
    session: Any
    x: np.ndarray

    @property
    def accuracy(self) -> float:
        return float(self.correct.mean()) if self.correct.size else 0.0


def _evaluate_folder(
    folder: Path, x_test: np.ndarray, y_test: np.ndarray, classes: list[str], label: str
) -> _Evaluated:
    """Accuracy of one exported model on the test split, with its own preprocessing."""
    from visionops.artifacts import open_session, predict_probabilities, read_json
    from visionops.data.transforms import PreprocessSpec, normalize

    metadata = read_json(folder / METADATA_FILE, "visionops export")
    model_classes = [str(c) for c in metadata.get("classes", [])]
    if model_classes != classes:
        raise _Incomparable(
            f"{label} predicts classes {model_classes[:12]}, the test split has {classes[:12]}"
        )
    try:
        spec = PreprocessSpec.from_dict(metadata["preprocess"])
        x = normalize(x_test, spec)
    except (KeyError, DataError) as exc:
        raise _Incomparable(f"{label} cannot take the test images ({exc})") from None
    session = open_session(folder / MODEL_FILE)
    probs = predict_probabilities(session, x)
    correct = np.argmax(probs, axis=1) == y_test
    return _Evaluated(
        folder=folder,
        metadata=metadata,
        correct=correct,
        probabilities=probs,
        session=session,
        x=x,
    )


class _Incomparable(VisionOpsError):
    """Two models cannot be compared on this test split."""


def _test_split(layout: Layout) -> tuple[np.ndarray, np.ndarray, list[str]]:
    from visionops.artifacts import load_split, read_json

    meta = read_json(layout.prepared_meta, "visionops prepare")
    x, y = load_split(layout.split_npz("test"))
    if len(x) == 0:
        raise DataError(f"{layout.split_npz('test')}: the test split is empty")
    return x, y, [str(c) for c in meta.get("classes", [])]


def _decide(
    params: Params,
    layout: Layout,
    client: MlflowClient,
    settings: Settings,
    name: str,
    version: str,
) -> GateDecision:
    """Run the gate's checks for ``version`` against the current champion (no side effects)."""
    from visionops.artifacts import latency_ms

    gate = params.gate
    champion = _alias_version(client, name, CHAMPION)
    decision = GateDecision(
        model_name=name, challenger_version=version, champion_version_before=champion
    )
    x_test, y_test, classes = _test_split(layout)
    decision.n_test = len(y_test)

    challenger_folder = _version_folder(client, settings, name, version, None)
    try:
        challenger = _evaluate_folder(challenger_folder, x_test, y_test, classes, "the challenger")
    except _Incomparable as exc:
        decision.checks.append(GateCheck("comparable", False, None, None, str(exc)))
        decision.reasons.append(str(exc))
        return decision
    decision.challenger_accuracy = challenger.accuracy

    raw_parity = challenger.metadata.get("parity_max_abs_diff")
    parity = float(raw_parity) if isinstance(raw_parity, int | float) else None
    parity_ok = parity is not None and parity <= gate.parity_atol
    decision.parity_max_abs_diff = parity
    if parity is None:
        parity_detail = "metadata.json records no ONNX parity check (re-export the model)"
    else:
        parity_detail = f"ONNX parity at export {parity:.2g} " + (
            f"<= {gate.parity_atol:g}"
            if parity_ok
            else f"exceeds gate.parity_atol {gate.parity_atol:g}"
        )
    decision.checks.append(
        GateCheck("onnx_parity", parity_ok, parity, gate.parity_atol, parity_detail)
    )
    _, p95 = latency_ms(challenger.session, challenger.x[:1])
    decision.latency_p95_ms = p95
    latency_ok = p95 <= gate.latency_budget_ms
    decision.checks.append(
        GateCheck(
            "latency",
            latency_ok,
            p95,
            gate.latency_budget_ms,
            f"p95 latency {p95:.2f} ms at batch 1 "
            + ("<=" if latency_ok else "exceeds the budget of")
            + f" {gate.latency_budget_ms:g} ms",
        )
    )
    calibration = calibration_check(
        challenger.probabilities, y_test, gate.max_ece, params.evaluate.calibration_bins
    )
    decision.test_ece = calibration.value
    decision.checks.append(calibration)

    if champion is None:
        # Something beats nothing: serving needs a champion, so the first model is promoted;
        # the checks above are still recorded.
        decision.promoted = True
        decision.reasons.append("no champion yet")
        decision.reasons += [f"warning: {c.detail}" for c in decision.checks if not c.passed]
        return decision
    if champion == version:
        decision.promoted = True
        decision.reasons.append(f"version {version} is already the champion")
        return decision

    champion_folder = _version_folder(client, settings, name, champion, None)
    try:
        current = _evaluate_folder(
            champion_folder, x_test, y_test, classes, f"the champion (version {champion})"
        )
    except _Incomparable as exc:
        detail = f"{exc}; promote with --force if the task changed on purpose"
        decision.checks.append(GateCheck("comparable", False, None, None, detail))
        decision.reasons.append(detail)
        return decision
    decision.champion_accuracy = current.accuracy

    floor = current.accuracy - gate.accuracy_tolerance
    # A hair of slack so equal accuracies never fail on float rounding.
    accuracy_ok = challenger.accuracy >= floor - 1e-12
    decision.checks.append(
        GateCheck(
            "accuracy",
            accuracy_ok,
            challenger.accuracy,
            floor,
            f"accuracy {challenger.accuracy:.4f} "
            + (">=" if accuracy_ok else "is below")
            + f" champion {current.accuracy:.4f} - tolerance {gate.accuracy_tolerance:g}",
        )
    )
    test = mcnemar(current.correct, challenger.correct)
    decision.mcnemar_p_value = test.p_value
    decision.mcnemar_method = test.method
    decision.discordant_champion_only = test.champion_only
    decision.discordant_challenger_only = test.challenger_only
    champion_better = (
        test.champion_only > test.challenger_only and test.p_value < gate.mcnemar_alpha
    )
    decision.checks.append(
        GateCheck(
            "mcnemar",
            not champion_better,
            test.p_value,
            gate.mcnemar_alpha,
            f"McNemar ({test.method}) p={test.p_value:.4g}: champion alone right on "
            f"{test.champion_only}, challenger alone right on {test.challenger_only} images; "
            + (
                f"champion significantly better at alpha {gate.mcnemar_alpha:g}"
                if champion_better
                else "champion not significantly better"
            ),
        )
    )
    decision.promoted = all(c.passed for c in decision.checks)
    failed = [c.detail for c in decision.checks if not c.passed]
    decision.reasons = failed if failed else [c.detail for c in decision.checks]
    return decision


def _champion_history(client: MlflowClient, name: str) -> list[str]:
    rm = client.get_registered_model(name)
    raw = (rm.tags or {}).get(HISTORY_TAG)
    try:
        history = json.loads(raw) if raw else []
    except ValueError:
        history = []
    return [str(v) for v in history] if isinstance(history, list) else []


def _set_champion(client: MlflowClient, name: str, version: str) -> None:
    """Point ``champion`` at ``version`` and append it to the champion history."""
    history = _champion_history(client, name)
    current = _alias_version(client, name, CHAMPION)
    # A champion moved outside visionops (UI, API) still counts as a previous champion.
    if current is not None and (not history or history[-1] != current):
        history.append(current)
    if not history or history[-1] != version:
        history.append(version)
    client.set_registered_model_alias(name, CHAMPION, version)
    client.set_registered_model_tag(name, HISTORY_TAG, json.dumps(history[-HISTORY_LIMIT:]))


def _record(client: MlflowClient, name: str, decision: GateDecision) -> None:
    """Write the decision as tags on the challenger version and on its register run."""
    tags = decision.tags()
    for key, value in tags.items():
        client.set_model_version_tag(name, decision.challenger_version, key, value)
    run_id = client.get_model_version(name, decision.challenger_version).run_id
    if run_id:
        from mlflow.entities import RunTag

        client.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()])


def _apply(client: MlflowClient, decision: GateDecision) -> None:
    if decision.promoted and decision.champion_version_before != decision.challenger_version:
        _set_champion(client, decision.model_name, decision.challenger_version)
        log.info("%s: champion -> version %s", decision.model_name, decision.challenger_version)
    _record(client, decision.model_name, decision)


def run_gate(params: Params, layout: Layout) -> GateDecision:
    """Promote the registered challenger to ``champion`` only if it is not worse.

    Rejection is a normal outcome, not an error: the decision is written to
    ``layout.gate_json``, tagged on the version and its run, and returned.
    """
    from visionops.artifacts import read_json

    registration = read_json(layout.registration_json, "visionops register")
    try:
        name, version = str(registration["name"]), str(registration["version"])
    except KeyError as exc:
        raise DataError(f"{layout.registration_json}: missing {exc}") from None
    with stage_run("gate", params, layout) as tracker:
        client, settings = tracker._client, load_settings(layout.root)
        _model_version(client, settings, name, version)
        decision = _decide(params, layout, client, settings, name, version)
        _apply(client, decision)
        for path, content in (
            (layout.gate_json, decision.headline()),
            (layout.gate_report, decision.to_dict()),
        ):
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(content, indent=2) + "\n")
        tracker.log_metrics(decision.summary())
        tracker.set_tags(decision.tags())
        tracker.log_artifact(layout.gate_report)
    return decision


def _registration_version(layout: Layout, name: str) -> str | None:
    path = layout.registration_json
    if not path.is_file():
        return None
    try:
        reg = json.loads(path.read_text())
    except ValueError:
        return None
    if isinstance(reg, dict) and reg.get("name") == name and reg.get("version") is not None:
        return str(reg["version"])
    return None


def promote(
    params: Params, layout: Layout, version: str | None = None, force: bool = False
) -> GateDecision:
    """Move ``champion`` to ``version`` (default: the ``challenger``).

    Without ``force`` the gate's checks decide; with it the alias moves regardless (the
    decision records that it was forced).
    """
    client, settings = _connect(layout)
    _check_store_exists(settings)
    name = params.model_name()
    _registered_model(client, settings, name)
    if version is None:
        version = _alias_version(client, name, CHALLENGER) or _registration_version(layout, name)
        if version is None:
            raise RegistryError(f"model '{name}' has no '{CHALLENGER}': pass --version")
    version = str(version)
    _model_version(client, settings, name, version)
    if force:
        decision = GateDecision(
            model_name=name,
            challenger_version=version,
            champion_version_before=_alias_version(client, name, CHAMPION),
            promoted=True,
            forced=True,
            reasons=["forced by the operator (gate skipped)"],
            checks=[GateCheck("forced", True, None, None, "gate skipped with --force")],
        )
    else:
        decision = _decide(params, layout, client, settings, name, version)
    _apply(client, decision)
    return decision


@dataclass(frozen=True)
class RollbackResult:
    name: str
    from_version: str
    to_version: str

    def describe(self) -> str:
        return (
            f"{self.name}: '{CHAMPION}' rolled back from version {self.from_version} "
            f"to version {self.to_version}"
        )


def rollback(params: Params, layout: Layout) -> RollbackResult:
    """Give ``champion`` back to the previous champion (from the champion history)."""
    client, settings = _connect(layout)
    _check_store_exists(settings)
    name = params.model_name()
    _registered_model(client, settings, name)
    current = _alias_version(client, name, CHAMPION)
    if current is None:
        raise RegistryError(f"model '{name}' has no '{CHAMPION}': nothing to roll back")
    history = _champion_history(client, name)
    while history and history[-1] == current:
        history.pop()
    # Skip versions deleted since they were champion.
    existing = {str(mv.version) for mv in client.search_model_versions(f"name='{name}'")}
    while history and history[-1] not in existing:
        history.pop()
    if not history:
        raise RegistryError(
            f"model '{name}': version {current} is the only champion so far, "
            "there is no previous champion to roll back to"
        )
    target = history[-1]
    client.set_registered_model_alias(name, CHAMPION, target)
    client.set_registered_model_tag(name, HISTORY_TAG, json.dumps(history))
    client.set_model_version_tag(name, current, "rolled_back_at", datetime.now(UTC).isoformat())
    log.info("%s: champion rolled back %s -> %s", name, current, target)
    return RollbackResult(name=name, from_version=current, to_version=target)
