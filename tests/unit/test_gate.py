"""The promotion gate: McNemar's test, and champion/challenger decisions on real ONNX models.

Models are hand-written linear ONNX classifiers on a synthetic test split whose accuracy
is known exactly: class k lights up rows 2k..2k+1 of an 8x8 image, so a "template" model
is 100 % right, a model biased to class 0 is right on one third, and a model blind to
class 2 is right on two thirds.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from linear_onnx import save_linear_classifier
from mlflow import MlflowClient

from visionops import registry
from visionops.config import params_from_dict
from visionops.errors import DataError
from visionops.gate_checks import mcnemar, mcnemar_p_value
from visionops.layout import Layout

NAME = "gate-model"
SIZE, K, PER_CLASS = 8, 3, 20
CLASSES = ["a", "b", "c"]
SPEC = {
    "image_size": SIZE,
    "channels": 1,
    "mean": [0.0],
    "std": [1.0],
    "invert": "never",
    "center": False,
    "digit_box": 8,
}


# --------------------------------------------------------------------------- McNemar


def test_exact_mcnemar_matches_a_hand_computation() -> None:
    # b=10, c=2: 2 * P(X <= 2), X ~ Bin(12, 1/2) = 2 * (1 + 12 + 66) / 4096.
    p, method = mcnemar_p_value(10, 2)
    assert method == "exact"
    assert p == pytest.approx(2 * 79 / 4096, rel=1e-12)
    assert mcnemar_p_value(2, 10) == (p, "exact")  # symmetric
    # b=3, c=3 gives 2 * P(X <= 3) > 1: capped at 1.
    assert mcnemar_p_value(3, 3) == (1.0, "exact")
    assert mcnemar_p_value(0, 0) == (1.0, "none")
    # b + c = 24 is still exact: 2 * P(X <= 0), X ~ Bin(24, 1/2).
    assert mcnemar_p_value(24, 0) == (pytest.approx(2 * 0.5**24), "exact")


def test_chi_square_mcnemar_matches_a_hand_computation() -> None:
    # b=30, c=15: (|30 - 15| - 1)^2 / 45 = 196 / 45; chi2(1) survival = erfc(sqrt(x / 2)).
    p, method = mcnemar_p_value(30, 15)
    assert method == "chi2"
    assert p == pytest.approx(math.erfc(math.sqrt(196 / 45 / 2)), rel=1e-9)
    assert p == pytest.approx(0.03689, abs=1e-4)
    p25, method25 = mcnemar_p_value(13, 12)  # b + c = 25 switches to chi-square
    assert method25 == "chi2"
    assert p25 == pytest.approx(1.0)  # (|1| - 1)^2 = 0
    with pytest.raises(ValueError):
        mcnemar_p_value(-1, 3)


def test_mcnemar_counts_discordant_pairs() -> None:
    champion = np.array([1, 1, 1, 0, 0, 1, 0, 1], dtype=bool)
    challenger = np.array([1, 0, 0, 1, 0, 0, 0, 1], dtype=bool)
    result = mcnemar(champion, challenger)
    assert (result.champion_only, result.challenger_only) == (3, 1)
    assert result.p_value == pytest.approx(2 * (1 + 4) / 16)  # 2 * P(X <= 1), Bin(4, 1/2)
    assert result.method == "exact"
    with pytest.raises(ValueError, match="paired"):
        mcnemar(champion, challenger[:3])


# --------------------------------------------------------------------------- fixtures


@pytest.fixture
def layout(tmp_path: Path, store: str) -> Layout:
    layout = Layout(tmp_path)
    layout.prepared_dir.mkdir(parents=True)
    y = np.repeat(np.arange(K), PER_CLASS).astype(np.int64)
    x = np.zeros((len(y), SIZE, SIZE, 1), dtype=np.uint8)
    for i, k in enumerate(y):
        x[i, 2 * k : 2 * k + 2, :, 0] = 255
    np.savez(layout.split_npz("test"), x=x, y=y)
    meta = {"classes": CLASSES, "image_size": SIZE, "channels": 1, "mean": [0.0], "std": [1.0]}
    layout.prepared_meta.write_text(json.dumps(meta))
    return layout


@pytest.fixture
def client(layout: Layout) -> MlflowClient:
    return MlflowClient(f"sqlite:///{layout.root / 'mlflow.db'}")


def _params(**gate: float):
    defaults = {"latency_budget_ms": 1e6}  # timing never decides a test
    return params_from_dict({"registry": {"model_name": NAME}, "gate": {**defaults, **gate}})


def _templates() -> np.ndarray:
    w = np.zeros((SIZE, SIZE, K), dtype=np.float32)
    for k in range(K):
        w[2 * k : 2 * k + 2, :, k] = 1.0
    return w.reshape(SIZE * SIZE, K)


def _weights(kind: str) -> tuple[np.ndarray, np.ndarray]:
    w, b = _templates(), np.zeros(K, dtype=np.float32)
    if kind == "biased":  # always class 0: accuracy 1/3
        w[:] = 0.0
        b[0] = 1.0
    elif kind == "blind-c":  # class 2 looks like class 0: accuracy 2/3
        w[:, 2] = 0.0
        b[0] = 0.1
    return w, b


def _register(layout: Layout, kind: str, parity: float = 0.0):
    """Write an exported folder for model ``kind`` and register it as the challenger."""
    folder = layout.export_dir
    folder.mkdir(parents=True, exist_ok=True)
    w, b = _weights(kind)
    save_linear_classifier(folder / "model.onnx", w, b, SIZE, name=kind)
    meta = {
        "name": NAME,
        "architecture": kind,
        "classes": CLASSES,
        "preprocess": SPEC,
        "input_name": "input",
        "outputs": ["probabilities", "embedding"],
        "metrics": {"accuracy": 0.5},
        "parity_max_abs_diff": parity,
        "opset": 18,
        "created": "2024-01-01T00:00:00+00:00",
        "git_sha": None,
    }
    (folder / "metadata.json").write_text(json.dumps(meta))
    return registry.run_register(_params(), layout)


def _champion(client: MlflowClient) -> str | None:
    aliases = client.get_registered_model(NAME).aliases
    return None if "champion" not in aliases else str(aliases["champion"])


# --------------------------------------------------------------------------- decisions


def test_first_model_is_promoted_because_there_is_no_champion(
    layout: Layout, client: MlflowClient
) -> None:
    reg = _register(layout, "biased")
    decision = registry.run_gate(_params(), layout)

    assert decision.promoted is True
    # Promoted because nothing else can serve, but the failed checks are on record: a
    # constant 58 % confidence for a model right on a third of the images.
    assert decision.reasons[0] == "no champion yet"
    assert [r for r in decision.reasons[1:] if "test ECE" in r and "gate.max_ece" in r]
    assert decision.test_ece == pytest.approx(0.576 - 1 / 3, abs=0.01)
    assert _champion(client) == "1"
    gate = json.loads(layout.gate_report.read_text())
    assert gate["promoted"] is True
    assert gate["challenger_version"] == 1
    assert gate["champion_version_before"] is None
    assert gate["challenger_accuracy"] == pytest.approx(1 / 3)
    assert gate["champion_accuracy"] is None
    assert gate["latency_p95_ms"] > 0
    assert gate["checks"]["onnx_parity"]["passed"] is True
    assert gate["checks"]["latency"]["passed"] is True
    # The DVC metrics file: numbers and booleans only, no names, reasons or details.
    headline = json.loads(layout.gate_json.read_text())
    assert headline["promoted"] is True and headline["challenger_version"] == 1
    assert all(v is None or isinstance(v, bool | int | float) for v in headline.values())
    mv = client.get_model_version(NAME, "1")
    assert mv.tags["gate.promoted"] == "true"
    assert client.get_run(reg.run_id).data.tags["gate.promoted"] == "true"
    experiment = client.get_experiment_by_name("visionops")
    assert experiment is not None
    gate_runs = client.search_runs(
        [experiment.experiment_id],
        filter_string="attributes.run_name = 'gate'",
    )
    assert len(gate_runs) == 1
    assert gate_runs[0].data.metrics["challenger_accuracy"] == pytest.approx(1 / 3)
    assert "is now 'champion'" in decision.describe()


def test_better_challenger_is_promoted(layout: Layout, client: MlflowClient) -> None:
    _register(layout, "biased")
    registry.run_gate(_params(), layout)
    _register(layout, "template")
    decision = registry.run_gate(_params(), layout)

    assert decision.promoted is True
    assert decision.challenger_accuracy == 1.0
    assert decision.champion_accuracy == pytest.approx(1 / 3)
    assert (decision.discordant_champion_only, decision.discordant_challenger_only) == (0, 40)
    assert _champion(client) == "2"
    gate = json.loads(layout.gate_report.read_text())
    assert gate["champion_version_before"] == 1
    assert gate["champion_version_after"] == 2
    assert all(check["passed"] for check in gate["checks"].values())
    assert set(gate["checks"]) == {"onnx_parity", "latency", "calibration", "accuracy", "mcnemar"}


def test_worse_challenger_is_not_promoted_and_the_gate_says_why(
    layout: Layout, client: MlflowClient
) -> None:
    _register(layout, "template")
    registry.run_gate(_params(), layout)
    reg = _register(layout, "biased")
    decision = registry.run_gate(_params(), layout)  # a rejection is not an error

    assert decision.promoted is False
    assert _champion(client) == "1"
    assert str(client.get_model_version_by_alias(NAME, "challenger").version) == "2"
    gate = json.loads(layout.gate_report.read_text())
    assert gate["promoted"] is False
    assert gate["challenger_accuracy"] == pytest.approx(1 / 3)
    assert gate["champion_accuracy"] == 1.0
    assert gate["checks"]["accuracy"]["passed"] is False
    assert gate["checks"]["mcnemar"]["passed"] is False
    assert gate["mcnemar_p_value"] < 1e-6
    assert any("accuracy 0.3333 is below champion 1.0000" in r for r in gate["reasons"])
    assert client.get_model_version(NAME, "2").tags["gate.promoted"] == "false"
    assert client.get_run(reg.run_id).data.tags["gate.promoted"] == "false"
    assert "NOT promoted" in decision.describe()


def test_equal_challenger_is_promoted(layout: Layout, client: MlflowClient) -> None:
    _register(layout, "template")
    registry.run_gate(_params(), layout)
    _register(layout, "template")
    decision = registry.run_gate(_params(), layout)

    assert decision.promoted is True
    assert decision.challenger_accuracy == decision.champion_accuracy == 1.0
    assert decision.mcnemar_p_value == 1.0
    assert _champion(client) == "2"


def test_mcnemar_rejects_even_within_the_accuracy_tolerance(
    layout: Layout, client: MlflowClient
) -> None:
    _register(layout, "template")
    registry.run_gate(_params(), layout)
    _register(layout, "blind-c")
    decision = registry.run_gate(_params(accuracy_tolerance=0.5), layout)

    checks = {c.name: c for c in decision.checks}
    assert checks["accuracy"].passed is True  # 2/3 >= 1 - 0.5
    assert checks["mcnemar"].passed is False  # 20 discordant pairs, all for the champion
    assert decision.mcnemar_method == "exact"
    assert decision.mcnemar_p_value == pytest.approx(2 * 0.5**20)
    assert decision.promoted is False
    assert _champion(client) == "1"


def test_latency_over_budget_rejects(layout: Layout, client: MlflowClient) -> None:
    _register(layout, "template")
    registry.run_gate(_params(), layout)
    _register(layout, "template")
    decision = registry.run_gate(_params(latency_budget_ms=1e-9), layout)

    assert decision.promoted is False
    assert [c.name for c in decision.checks if not c.passed] == ["latency"]
    assert "exceeds the budget" in decision.reasons[0]
    assert _champion(client) == "1"


def test_broken_parity_at_export_rejects(layout: Layout, client: MlflowClient) -> None:
    _register(layout, "template")
    registry.run_gate(_params(), layout)
    _register(layout, "template", parity=0.01)
    decision = registry.run_gate(_params(), layout)

    assert decision.promoted is False
    assert [c.name for c in decision.checks if not c.passed] == ["onnx_parity"]
    assert _champion(client) == "1"


def test_promote_without_force_runs_the_gate(layout: Layout, client: MlflowClient) -> None:
    _register(layout, "template")
    registry.run_gate(_params(), layout)
    _register(layout, "biased")
    refused = registry.promote(_params(), layout)
    assert refused.promoted is False and refused.forced is False
    assert _champion(client) == "1"
    forced = registry.promote(_params(), layout, force=True)
    assert forced.promoted is True and forced.forced is True
    assert _champion(client) == "2"
    back = registry.rollback(_params(), layout)
    assert back.to_version == "1"
    assert _champion(client) == "1"


def test_gate_without_registration_names_the_file(layout: Layout) -> None:
    with pytest.raises(DataError, match=r"registration\.json not found"):
        registry.run_gate(_params(), layout)
