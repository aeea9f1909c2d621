"""Calibration is kept: temperature scaling at export, and a gate that refuses miscalibration.

A CNN trained with label smoothing 0.1 is under-confident (its top-1 probabilities sit
well below its accuracy). Exported with temperature scaling, its test ECE comes back
under ``gate.max_ece`` and the gate promotes it; the same model exported without it
stays over the budget and the gate refuses it, with the reason in gate.json and on the
registry version. Real MNIST, a 3,000-image slice, two epochs.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from visionops import registry
from visionops.config import params_from_dict
from visionops.layout import Layout

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
NAME = "calibrated-mnist"
MAX_ECE = 0.03


def _params(temperature_scaling: bool):
    return params_from_dict(
        {
            "data": {
                "path": str(REPO / "data" / "raw" / "mnist"),
                "limit": 3000,
                "test_limit": 2000,
            },
            "train": {
                "models": ["cnn"],
                "epochs": 2,
                "width": 8,
                "label_smoothing": 0.1,
                "augment": False,
            },
            "export": {"temperature_scaling": temperature_scaling},
            "registry": {"model_name": NAME},
            # Timing never decides a test.
            "gate": {"latency_budget_ms": 1e6, "max_ece": MAX_ECE},
        }
    )


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Layout:
    from visionops.data.ingest import run_ingest
    from visionops.data.prepare import run_prepare
    from visionops.data.validate import run_validate
    from visionops.evaluate import run_compare, run_evaluate
    from visionops.train import run_train

    layout = Layout(tmp_path_factory.mktemp("calibration"))
    params = _params(True)
    run_ingest(params, layout)
    run_validate(params, layout)
    run_prepare(params, layout)
    run_train(params, layout, "cnn", show_progress=False)
    run_evaluate(params, layout, "cnn")
    run_compare(params, layout)
    return layout


def _export_register_gate(layout: Layout, temperature_scaling: bool):
    from visionops.export import run_export

    params = _params(temperature_scaling)
    run_export(params, layout)
    meta = json.loads((layout.export_dir / "metadata.json").read_text())
    reg = registry.run_register(params, layout)
    return meta, reg, registry.run_gate(params, layout)


def test_temperature_scaling_rescues_a_label_smoothed_model_and_the_gate_refuses_one_without(
    trained: Layout, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mlflow import MlflowClient

    uri = f"sqlite:///{trained.root / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    monkeypatch.delenv("VISIONOPS_PARENT_RUN_ID", raising=False)
    monkeypatch.chdir(trained.root)
    uncalibrated_ece = json.loads(trained.eval_metrics("cnn").read_text())["ece"]
    assert uncalibrated_ece > MAX_ECE  # label smoothing: under-confident before export

    meta, _, decision = _export_register_gate(trained, temperature_scaling=True)
    cal = meta["calibration"]
    assert cal["method"] == "temperature scaling"
    assert cal["temperature"] < 1.0  # sharpening an under-confident model
    assert cal["val_ece_after"] < cal["val_ece_before"]
    assert cal["val_nll_after"] <= cal["val_nll_before"]
    assert decision.promoted and decision.test_ece is not None
    assert decision.test_ece <= MAX_ECE < uncalibrated_ece
    check = {c.name: c for c in decision.checks}["calibration"]
    assert check.passed and check.threshold == MAX_ECE
    # The reference profile was built from the calibrated graph: its confidences agree
    # with its accuracy (what monitoring's estimate relies on).
    ref = json.loads((trained.export_dir / "reference.json").read_text())
    assert abs(float(np.mean(ref["confidence"])) - ref["accuracy"]) < MAX_ECE

    meta, reg, refused = _export_register_gate(trained, temperature_scaling=False)
    assert meta["calibration"] == {"method": "none", "temperature": 1.0}
    assert not refused.promoted
    assert refused.test_ece is not None and refused.test_ece > MAX_ECE
    assert [r for r in refused.reasons if "test ECE" in r and "gate.max_ece" in r]
    # The same weights: accuracy and McNemar pass, only calibration fails.
    failed = [c.name for c in refused.checks if not c.passed]
    assert failed == ["calibration"]
    gate = json.loads(trained.gate_report.read_text())
    assert gate["promoted"] is False and gate["checks"]["calibration"]["passed"] is False
    client = MlflowClient(uri)
    tags = client.get_model_version(NAME, str(reg.version)).tags
    assert tags["gate.promoted"] == "false" and "test ECE" in tags["gate.reasons"]
    assert str(client.get_model_version_by_alias(NAME, "champion").version) == "1"
