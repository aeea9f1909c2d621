"""Closing the loop: logged, labelled predictions go back into training and through the gate.

A champion is trained on a slice of MNIST. Served traffic it handles badly (printed
digits) is logged by the server's prediction-log writer — with the model-sized input —
and labelled through the feedback store; `visionops feedback export` writes those inputs
as an image folder; with ``data.extra_path`` pointing at it, the next training run adds
them to its training split (and to nothing else), and the gate decides on the challenger.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from visionops import registry
from visionops.config import params_from_dict
from visionops.layout import Layout

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
NAME = "feedback-loop"
N_LOGGED, N_LABELLED = 60, 48


def _params(layout: Layout):
    return params_from_dict(
        {
            "data": {
                "path": str(REPO / "data" / "raw" / "mnist"),
                "limit": 600,
                "test_limit": 300,
                "extra_path": str(layout.root / "data" / "feedback"),
            },
            "train": {"models": ["cnn"], "epochs": 1, "width": 8, "augment": False},
            "registry": {"model_name": NAME},
            # Timing and calibration of a one-epoch model never decide this test.
            "gate": {"latency_budget_ms": 1e6, "max_ece": 1.0},
        }
    )


def _pipeline(layout: Layout):
    from visionops.data.ingest import run_ingest
    from visionops.data.prepare import run_prepare
    from visionops.data.validate import run_validate
    from visionops.evaluate import run_compare, run_evaluate
    from visionops.export import run_export
    from visionops.train import run_train

    params = _params(layout)
    run_ingest(params, layout)
    run_validate(params, layout)
    prepared = run_prepare(params, layout)
    run_train(params, layout, "cnn", show_progress=False)
    run_evaluate(params, layout, "cnn")
    run_compare(params, layout)
    run_export(params, layout)
    registry.run_register(params, layout)
    return prepared, registry.run_gate(params, layout)


def _log_and_label(url: str, classes: list[str]) -> dict[int, tuple[np.ndarray, str]]:
    """Log printed digits as the server would, label most of them; returns what was
    labelled: prediction row id -> (model-sized pixels, true label)."""
    import sqlalchemy as sa

    from visionops.monitor.feedback import record_feedback
    from visionops.monitor.simulate import scenario_images
    from visionops.serve.predlog import (
        PredictionLog,
        PredictionRecord,
        create_predlog_engine,
        predictions_table,
    )

    data = scenario_images("printed", N_LOGGED, seed=3)
    assert data.labels is not None
    writer = PredictionLog(url)
    writer.start()
    start = datetime(2025, 6, 1, tzinfo=UTC)
    writer.submit(
        PredictionRecord(
            created_at=start + timedelta(seconds=i),
            request_id=f"req-{i}",
            input_index=0,
            model_name=NAME,
            model_version="1",
            model_alias="champion",
            label=classes[(int(data.labels[i]) + 1) % 10],  # what a confused model said
            class_index=(int(data.labels[i]) + 1) % 10,
            confidence=0.6,
            accepted=False,
            probabilities={c: 0.1 for c in classes},
            embedding=[0.0] * 4,
            pixels=data.images[i][:, :, None],
        )
        for i in range(N_LOGGED)
    )
    writer.close()
    engine = create_predlog_engine(url)
    labelled: dict[int, tuple[np.ndarray, str]] = {}
    try:
        for i in range(N_LABELLED):
            record_feedback(engine, f"req-{i}", classes[int(data.labels[i])])
        with engine.connect() as conn:
            ids = dict(
                conn.execute(sa.select(predictions_table.c.request_id, predictions_table.c.id))
                .tuples()
                .all()
            )
    finally:
        engine.dispose()
    for i in range(N_LABELLED):
        labelled[int(ids[f"req-{i}"])] = (data.images[i], classes[int(data.labels[i])])
    return labelled


def test_labelled_logged_inputs_train_the_next_model_and_meet_the_gate(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    monkeypatch.delenv("VISIONOPS_PARENT_RUN_ID", raising=False)
    monkeypatch.chdir(tmp_path)
    layout = Layout(tmp_path)
    classes = [str(i) for i in range(10)]

    # 1. The champion, trained while data/feedback does not exist yet.
    first, first_gate = _pipeline(layout)
    assert first_gate.promoted and first_gate.challenger_version == "1"
    n_base = first.n_train

    # 2. Served traffic, logged with its inputs, and true labels for most of it.
    url = f"sqlite:///{tmp_path / 'predictions.db'}"
    labelled = _log_and_label(url, classes)

    # 3. `visionops feedback export` writes them as an image folder, byte-exact.
    out = layout.root / "data" / "feedback"
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    proc = subprocess.run(
        [str(BIN / "visionops"), "feedback", "export", "--out", str(out), "--predlog-url", url],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"{N_LABELLED} labelled input(s)" in proc.stdout
    files = sorted(out.glob("*/*.png"))
    assert len(files) == N_LABELLED  # the unlabelled rows stay out
    for pid, (pixels, label) in labelled.items():
        saved = np.asarray(Image.open(out / label / f"fb-{pid}.png"))
        np.testing.assert_array_equal(saved, pixels)

    # 4. The next run trains on them: in the training split, not in validation or test.
    second, gate = _pipeline(layout)
    meta = json.loads(layout.prepared_meta.read_text())
    assert meta["n_extra"] == N_LABELLED and second.n_train == n_base + N_LABELLED
    train = np.load(layout.split_npz("train"), allow_pickle=False)
    assert (train["index"] < 0).sum() == N_LABELLED
    extra_x = train["x"][train["index"] < 0]
    extra_y = train["y"][train["index"] < 0]
    # Ingest read them back through the serving preprocessing: the same kind of pixels.
    assert extra_x.shape[1:] == (28, 28, 1) and extra_x.max() == 255
    expected = sorted(int(label) for _, label in labelled.values())
    assert sorted(extra_y.tolist()) == expected
    for split in ("val", "test"):
        assert (np.load(layout.split_npz(split), allow_pickle=False)["index"] >= 0).all()
    trained = json.loads(layout.train_metrics("cnn").read_text())
    assert trained  # the training stage ran on the new split

    # 5. The gate judged the retrained challenger against the champion and said why.
    assert gate.challenger_version == "2" and gate.champion_version_before == "1"
    assert gate.reasons and {c.name for c in gate.checks} >= {"accuracy", "mcnemar"}
    decision = json.loads(layout.gate_report.read_text())
    assert decision["challenger_version"] == 2 and "promoted" in decision
