"""Monitoring end to end: a real model and server, simulated traffic, the drift endpoint.

A small MLP is trained by the real stages on 3,000 MNIST images and exported with its
reference profile; `visionops serve` runs it; the simulator first sends unseen MNIST test
digits (the drift endpoint must say no drift), then scikit-learn's handwritten digits by
other writers (it must say drift), and `visionops monitor check` exits 0 then 1.
Everything is seeded, so the outcome does not vary between runs.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
WINDOW = 200


@pytest.fixture(scope="module")
def exported_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from visionops.config import load_params
    from visionops.data.ingest import run_ingest
    from visionops.data.prepare import run_prepare
    from visionops.data.validate import run_validate
    from visionops.evaluate import run_compare, run_evaluate
    from visionops.export import run_export
    from visionops.layout import Layout
    from visionops.train import run_train

    root = tmp_path_factory.mktemp("monitoring")
    params = load_params(
        REPO / "params.yaml",
        [
            f"data.path={REPO / 'data' / 'raw' / 'mnist'}",
            "data.limit=3000",
            "data.test_limit=500",
            "data.val_fraction=0.2",
            "train.models=[mlp]",
            "train.epochs=3",
            "train.min_steps=0",
            "train.width=16",
        ],
    )
    layout = Layout(root)
    run_ingest(params, layout)
    run_validate(params, layout)
    run_prepare(params, layout)
    run_train(params, layout, "mlp")
    run_evaluate(params, layout, "mlp")
    run_compare(params, layout)
    run_export(params, layout)
    assert (layout.export_dir / "reference.json").is_file()
    return layout.export_dir


@pytest.fixture(scope="module")
def server(exported_model: Path, tmp_path_factory: pytest.TempPathFactory):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    work = tmp_path_factory.mktemp("server")
    env = dict(os.environ, VISIONOPS_PREDLOG_URL=f"sqlite:///{work / 'predictions.db'}")
    proc = subprocess.Popen(
        [str(BIN / "visionops"), "serve", "--port", str(port),
         "--model-uri", str(exported_model)],
        cwd=work, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(240):
            if proc.poll() is not None:
                raise AssertionError(proc.stderr.read() if proc.stderr else "server exited")
            try:
                if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        yield url, env["VISIONOPS_PREDLOG_URL"], work
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _drift(url: str) -> dict:
    # The log is written in the background, in batches: wait until the window is full.
    for _ in range(100):
        response = httpx.get(f"{url}/v1/monitoring/drift", params={"window": WINDOW}, timeout=30)
        if response.status_code == 200 and response.json()["window"]["size"] >= WINDOW:
            break
        time.sleep(0.2)
    assert response.status_code == 200, response.text
    return response.json()


def _check(predlog_url: str, exported: Path, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "visionops"), "monitor", "check", "--window", str(WINDOW),
         "--reference", str(exported), "--predlog-url", predlog_url],
        cwd=cwd, capture_output=True, text=True, check=False,
    )  # fmt: skip


def test_drift_endpoint_flips_from_mnist_to_foreign_handwriting(server, exported_model) -> None:
    from visionops.monitor.simulate import simulate

    url, predlog_url, work = server
    before = httpx.get(f"{url}/v1/monitoring/drift", params={"window": WINDOW}, timeout=30)
    assert before.status_code == 422  # nothing logged yet: too few rows, said clearly
    assert "error" in before.json()

    sent = simulate(url, "mnist", WINDOW, batch=8, seed=1)
    assert sent.ok == WINDOW and sent.errors == 0
    calm = _drift(url)
    assert calm["window"]["size"] == WINDOW
    assert calm["drift_detected"] is False, [t for t in calm["tests"] if t["drift"]]
    assert calm["alarm"] is False, calm["alarm_reasons"]
    # The server logs each input's OOD score and the export profiled them per class.
    shift = calm["ood_score_shift"]
    assert shift["status"] == "ok" and shift["n"] == WINDOW, shift
    assert calm["estimated_accuracy"]["low"] <= calm["estimated_accuracy"]["high"]
    assert {t["name"] for t in calm["tests"]} >= {"confidence", "predicted_class"}
    assert _check(predlog_url, exported_model, work).returncode == 0

    sent = simulate(url, "foreign-digits", WINDOW, batch=8, seed=2)
    assert sent.ok == WINDOW
    storm = _drift(url)
    assert storm["drift_detected"] is True
    assert any(t["drift"] for t in storm["tests"])
    # Other writers the model reads worse: the alarm, not only a warning.
    assert storm["alarm"] is True and storm["alarm_reasons"], storm["estimated_accuracy"]
    assert storm["estimated_accuracy"]["value"] < calm["estimated_accuracy"]["value"]
    assert storm["ood_score_shift"]["rate"] > calm["ood_score_shift"]["rate"]
    check = _check(predlog_url, exported_model, work)
    assert check.returncode == 1, check.stdout + check.stderr

    metrics = httpx.get(f"{url}/metrics", timeout=10).text
    assert "visionops_drift_detected 1.0" in metrics
    assert "visionops_monitoring_alarm 1.0" in metrics
