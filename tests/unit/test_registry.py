"""Tracking (one parent, nested stage runs), registration, aliases, resolving, rollback.

Every test has its own SQLite MLflow store and artifact folder under ``tmp_path``. Models
are tiny hand-written ONNX graphs (no training), so each registration costs little.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from linear_onnx import save_linear_classifier
from mlflow import MlflowClient
from onnx import numpy_helper

from visionops import registry
from visionops.config import params_from_dict
from visionops.errors import DataError, RegistryError
from visionops.layout import Layout

NAME = "tiny-model"
SIZE, K = 8, 3


@pytest.fixture
def layout(tmp_path: Path, store: str) -> Layout:
    return Layout(tmp_path)


def _params(**sections: dict):
    raw = {"registry": {"model_name": NAME}, **sections}
    return params_from_dict(raw)


def _write_exported(folder: Path, weights: np.ndarray, bias: np.ndarray, accuracy: float) -> None:
    """A linear softmax classifier over the flattened image, in the exported-folder format."""
    folder.mkdir(parents=True, exist_ok=True)
    save_linear_classifier(folder / "model.onnx", weights, bias, SIZE)
    meta = {
        "name": NAME,
        "architecture": "linear",
        "classes": ["a", "b", "c"],
        "preprocess": {
            "image_size": SIZE,
            "channels": 1,
            "mean": [0.0],
            "std": [1.0],
            "invert": "never",
            "center": False,
            "digit_box": 8,
        },
        "input_name": "input",
        "outputs": ["probabilities", "embedding"],
        "metrics": {"accuracy": accuracy},
        "parity_max_abs_diff": 0.0,
        "opset": 18,
        "created": "2024-01-01T00:00:00+00:00",
        "git_sha": "abc123",
    }
    (folder / "metadata.json").write_text(json.dumps(meta))


def _export(layout: Layout, scale: float = 1.0, accuracy: float = 0.9) -> None:
    rng = np.random.default_rng(int(scale * 100))
    weights = rng.normal(size=(SIZE * SIZE, K)) * scale
    _write_exported(layout.export_dir, weights, np.zeros(K), accuracy)


def _register(layout: Layout, scale: float = 1.0, accuracy: float = 0.9):
    _export(layout, scale, accuracy)
    return registry.run_register(_params(), layout)


# --------------------------------------------------------------------------- tracking


def test_stage_runs_nest_under_one_parent(layout: Layout, store: str) -> None:
    params = _params(train={"epochs": 3})
    with registry.stage_run("prepare", params, layout) as first:
        first.log_metrics({"n_train": 90, "note": "ignored"})
    with registry.stage_run("train-mlp", params, layout) as second:
        second.log_metrics({"val_accuracy": 0.5, "epoch": 1})
        second.log_metrics({"val_accuracy": 0.75, "epoch": 2})

    client = MlflowClient(store)
    assert first.parent_run_id == second.parent_run_id
    parent = client.get_run(first.parent_run_id)
    assert "mlflow.parentRunId" not in parent.data.tags
    assert parent.info.status == "RUNNING"  # the report stage ends it
    assert parent.data.params["train.epochs"] == "3"
    assert parent.data.params["model_name"] == NAME
    state = json.loads((layout.state_dir / "parent_run.json").read_text())
    assert state["run_id"] == first.parent_run_id

    prepare = client.get_run(first.run_id)
    train = client.get_run(second.run_id)
    for run, name in ((prepare, "prepare"), (train, "train-mlp")):
        assert run.info.run_name == name
        assert run.info.status == "FINISHED"
        assert run.data.tags["mlflow.parentRunId"] == first.parent_run_id
    assert prepare.data.metrics == {"n_train": 90.0}
    # Each stage logs the params it depends on, not all of them.
    assert train.data.params["train.epochs"] == "3"
    assert "data.source" not in train.data.params
    assert "train.epochs" not in prepare.data.params
    history = client.get_metric_history(second.run_id, "val_accuracy")
    assert [(m.step, m.value) for m in history] == [(1, 0.5), (2, 0.75)]
    exp = client.get_experiment_by_name("visionops")
    assert exp is not None
    assert parent.info.experiment_id == exp.experiment_id
    assert exp.artifact_location == (layout.root / "mlartifacts").as_uri()


def test_failing_stage_is_marked_failed_and_reraises(layout: Layout, store: str) -> None:
    with (
        pytest.raises(ValueError, match="boom"),
        registry.stage_run("validate", _params(), layout) as tracker,
    ):
        raise ValueError("boom")
    client = MlflowClient(store)
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FAILED"
    assert run.data.tags["visionops.error"] == "ValueError: boom"
    assert client.get_run(tracker.parent_run_id).info.status == "RUNNING"


def test_pipeline_parent_from_env_then_a_new_parent_once_it_ended(
    layout: Layout, store: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    params = _params()
    parent_id = registry.start_pipeline_run(layout, params)
    monkeypatch.setenv("VISIONOPS_PARENT_RUN_ID", parent_id)
    with registry.stage_run("ingest", params, layout) as tracker:
        pass
    assert tracker.parent_run_id == parent_id
    monkeypatch.delenv("VISIONOPS_PARENT_RUN_ID")

    assert registry.end_pipeline_run(layout, "FINISHED") == parent_id
    client = MlflowClient(store)
    assert client.get_run(parent_id).info.status == "FINISHED"
    assert registry.end_pipeline_run(layout, "FINISHED") is None  # already ended

    with registry.stage_run("ingest", params, layout) as later:
        pass
    assert later.parent_run_id != parent_id
    assert client.get_run(later.parent_run_id).info.status == "RUNNING"


def test_unknown_parent_in_env_is_a_clear_error(
    layout: Layout, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("VISIONOPS_PARENT_RUN_ID", "0123456789abcdef")
    with (
        pytest.raises(RegistryError, match="VISIONOPS_PARENT_RUN_ID=0123456789abcdef"),
        registry.stage_run("ingest", _params(), layout),
    ):
        pass


# --------------------------------------------------------------------------- registering


def test_register_creates_versions_with_the_challenger_alias(layout: Layout, store: str) -> None:
    first = _register(layout, accuracy=0.91)
    assert (first.name, first.version) == (NAME, "1")
    client = MlflowClient(store)
    mv = client.get_model_version_by_alias(NAME, "challenger")
    assert str(mv.version) == "1"  # MLflow returns int or str depending on the call
    assert mv.run_id == first.run_id
    assert mv.tags["architecture"] == "linear"
    assert mv.tags["test_accuracy"] == "0.91"
    assert mv.tags["git_sha"] == "abc123"
    assert mv.tags["data_source"] == "mnist"
    registration = json.loads(layout.registration_json.read_text())
    assert registration == {
        "name": NAME,
        "version": "1",
        "run_id": first.run_id,
        "model_uri": f"models:/{NAME}/1",
    }
    run = client.get_run(first.run_id)
    assert run.info.run_name == "register"
    assert run.info.status == "FINISHED"
    assert run.data.tags["mlflow.parentRunId"]
    artifacts = {a.path for a in client.list_artifacts(first.run_id, "exported")}
    assert artifacts == {"exported/model.onnx", "exported/metadata.json"}

    second = _register(layout, scale=2.0)
    assert second.version == "2"
    assert str(client.get_model_version_by_alias(NAME, "challenger").version) == "2"
    assert "version 2" in second.describe()


def test_registered_pyfunc_model_predicts_like_the_onnx_file(layout: Layout) -> None:
    import mlflow
    import onnxruntime as ort

    _register(layout)
    x = np.random.default_rng(0).random((4, 1, SIZE, SIZE)).astype(np.float32)
    session = ort.InferenceSession(str(layout.export_dir / "model.onnx"))
    want = session.run(["probabilities"], {"input": x})[0]
    model = mlflow.pyfunc.load_model(f"models:/{NAME}/1")
    got = model.predict(x)
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-6)


def test_register_without_export_names_the_file(layout: Layout) -> None:
    with pytest.raises(DataError, match=r"exported/model\.onnx not found"):
        registry.run_register(_params(), layout)


# --------------------------------------------------------------------------- resolving


def test_resolve_alias_version_and_folder(layout: Layout) -> None:
    _register(layout, scale=1.0)
    _register(layout, scale=2.0)
    by_alias = registry.resolve_served_model(f"models:/{NAME}@challenger")
    assert (by_alias.name, by_alias.version, by_alias.alias) == (NAME, "2", "challenger")
    by_version = registry.resolve_served_model(f"models:/{NAME}/1")
    assert (by_version.version, by_version.alias) == ("1", None)
    for ref, scale in ((by_alias, 2.0), (by_version, 1.0)):
        assert (ref.path / "metadata.json").is_file()
        weights = numpy_helper.to_array(
            next(i for i in onnx.load(ref.path / "model.onnx").graph.initializer if i.name == "W")
        )
        rng = np.random.default_rng(int(scale * 100))
        np.testing.assert_allclose(weights, rng.normal(size=(SIZE * SIZE, K)) * scale, rtol=1e-6)

    folder = registry.resolve_served_model(str(layout.export_dir))
    assert folder.path == layout.export_dir.resolve()
    assert (folder.name, folder.version, folder.alias) == (NAME, None, None)


def test_resolve_without_a_store_does_not_create_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    missing = tmp_path / "nowhere" / "mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{missing}")
    with pytest.raises(RegistryError, match=r"nowhere/mlflow\.db does not exist"):
        registry.resolve_served_model(f"models:/{NAME}@champion")
    assert not missing.exists()


def test_resolve_errors_are_clear(layout: Layout, tmp_path: Path) -> None:
    _register(layout)
    cases = {
        "models:/nope@champion": "no registered model 'nope'",
        f"models:/{NAME}@champion": "has no alias 'champion' \\(aliases: challenger\\)",
        f"models:/{NAME}/7": "has no version '7' \\(versions: 1\\)",
        f"models:/{NAME}/latest": "version must be a number",
        f"models:/{NAME}": "expected models:/NAME@ALIAS",
        str(tmp_path / "missing"): "model folder not found",
    }
    for uri, message in cases.items():
        with pytest.raises(RegistryError, match=message):
            registry.resolve_served_model(uri)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "model.onnx").write_bytes(b"x")
    with pytest.raises(RegistryError, match=r"lacks metadata\.json"):
        registry.resolve_served_model(str(empty))


def test_resolving_does_not_import_torch(layout: Layout, store: str) -> None:
    _register(layout)
    code = (
        "import sys, json\n"
        "from visionops.registry import resolve_served_model\n"
        f"ref = resolve_served_model('models:/{NAME}@challenger')\n"
        "print(json.dumps({'path': str(ref.path), 'torch': 'torch' in sys.modules}))\n"
    )
    env = {**os.environ, "MLFLOW_TRACKING_URI": store, "MLFLOW_DISABLE_TELEMETRY": "true"}
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=layout.root,
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["torch"] is False
    assert (Path(out["path"]) / "model.onnx").is_file()


# --------------------------------------------------------------------------- promote / rollback


def test_forced_promotion_and_rollback(layout: Layout, store: str) -> None:
    params = _params()
    client = MlflowClient(store)
    _register(layout, scale=1.0)
    with pytest.raises(RegistryError, match="no 'champion'"):
        registry.rollback(params, layout)

    first = registry.promote(params, layout, version="1", force=True)
    assert first.promoted and first.forced
    assert first.champion_version_before is None
    assert str(client.get_model_version_by_alias(NAME, "champion").version) == "1"
    with pytest.raises(RegistryError, match="no previous champion"):
        registry.rollback(params, layout)

    _register(layout, scale=2.0)
    _register(layout, scale=3.0)
    second = registry.promote(params, layout, force=True)  # default: the challenger
    assert (second.challenger_version, second.champion_version_before) == ("3", "1")
    assert str(client.get_model_version_by_alias(NAME, "champion").version) == "3"
    assert client.get_model_version(NAME, "3").tags["gate.forced"] == "true"
    registry.promote(params, layout, version="2", force=True)
    assert str(client.get_model_version_by_alias(NAME, "champion").version) == "2"

    back = registry.rollback(params, layout)
    assert (back.from_version, back.to_version) == ("2", "3")
    assert str(client.get_model_version_by_alias(NAME, "champion").version) == "3"
    assert "to version 3" in back.describe()
    back = registry.rollback(params, layout)
    assert (back.from_version, back.to_version) == ("3", "1")
    with pytest.raises(RegistryError, match="no previous champion"):
        registry.rollback(params, layout)
    assert str(client.get_model_version_by_alias(NAME, "champion").version) == "1"


def test_promote_unknown_version_is_a_clear_error(layout: Layout) -> None:
    _register(layout)
    with pytest.raises(RegistryError, match="has no version '9'"):
        registry.promote(_params(), layout, version="9", force=True)
    with pytest.raises(RegistryError, match="no registered model 'other'"):
        registry.promote(_params(registry={"model_name": "other"}), layout, force=True)


# --------------------------------------------------------------------------- report


def test_report_writes_the_summary_and_ends_the_parent_run(layout: Layout, store: str) -> None:
    from visionops.report import run_report

    params = _params(train={"models": ["mlp", "cnn"]})
    reg = _register(layout)
    layout.comparison_json.parent.mkdir(parents=True, exist_ok=True)
    layout.comparison_json.write_text(json.dumps({"best_model": "cnn", "models": ["mlp", "cnn"]}))
    layout.eval_metrics("mlp").parent.mkdir(parents=True, exist_ok=True)
    layout.eval_metrics("mlp").write_text(json.dumps({"accuracy": 0.9512, "macro_f1": 0.95}))
    with pytest.raises(DataError, match=r"reports/gate\.json not found"):
        run_report(params, layout)
    gate = {
        "promoted": False,
        "challenger_version": 1,
        "champion_version_before": 4,
        "reasons": ["accuracy 0.9000 is below champion 0.9900 - tolerance 0.001"],
        "checks": {"accuracy": {"passed": False, "value": 0.9, "threshold": 0.989}},
    }
    layout.gate_report.write_text(json.dumps(gate))
    with pytest.raises(DataError, match=r"metrics/eval/cnn\.json not found"):
        run_report(params, layout)
    layout.eval_metrics("cnn").write_text(json.dumps({"accuracy": 0.9876, "macro_f1": 0.98}))

    result = run_report(params, layout)

    text = (layout.reports_dir / "summary.md").read_text()
    assert result.path == layout.reports_dir / "summary.md"
    assert "| mlp | 0.9512 | 0.9500 |  |" in text
    assert "| cnn | 0.9876 | 0.9800 | ✔ |" in text
    assert "Selected for export: **cnn**" in text
    assert f"Registered **{NAME}** version **1**" in text
    assert "**Not promoted**" in text and "remains version 4" in text
    assert "- accuracy 0.9000 is below champion 0.9900 - tolerance 0.001" in text
    assert f"mlflow ui --backend-store-uri {store}" in text
    assert result.best_accuracy == 0.9876
    assert "NOT promoted, champion stays version 4" in result.describe()

    client = MlflowClient(store)
    parent = client.get_run(reg_parent := str(result.parent_run_id))
    assert parent.info.status == "FINISHED"
    assert [a.path for a in client.list_artifacts(reg_parent)] == ["summary.md"]
    assert client.get_run(reg.run_id).data.tags["mlflow.parentRunId"] == reg_parent


@pytest.mark.postgres
def test_tracking_and_registry_on_postgres(
    postgres_database: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """MLFLOW_TRACKING_URI pointing at PostgreSQL: same code, same behaviour."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", postgres_database)
    monkeypatch.setenv("VISIONOPS_ARTIFACT_ROOT", (tmp_path / "artifacts").as_uri())
    monkeypatch.delenv("VISIONOPS_PARENT_RUN_ID", raising=False)
    monkeypatch.chdir(tmp_path)
    layout = Layout(tmp_path)
    params = _params()

    with registry.stage_run("ingest", params, layout) as tracker:
        tracker.log_metrics({"images": 42.0})
    result = _register(layout)
    assert str(result.version) == "1"
    registry.promote(params, layout, version="1", force=True)
    _register(layout, scale=2.0)
    registry.promote(params, layout, force=True)

    client = MlflowClient(postgres_database)
    assert client.get_registered_model(NAME).name == NAME
    assert str(client.get_model_version_by_alias(NAME, "champion").version) == "2"
    back = registry.rollback(params, layout)
    assert (back.from_version, back.to_version) == ("2", "1")
    ref = registry.resolve_served_model(f"models:/{NAME}@champion")
    assert str(ref.version) == "1"
    assert (ref.path / "model.onnx").is_file()

    runs = client.search_runs(
        [client.get_experiment_by_name("visionops").experiment_id], max_results=100
    )
    ingest = [r for r in runs if r.info.run_name == "ingest"]
    assert len(ingest) == 1 and ingest[0].data.metrics["images"] == 42.0
    assert "mlflow.parentRunId" in ingest[0].data.tags
