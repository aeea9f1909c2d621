"""`visionops serve --workers N`: one port, several processes, one service.

A real server with two worker processes: a reload answered by one worker reaches the
other (each worker's ``visionops_model_info`` series shows the new digest), and the
workers' metrics are summed by whichever answers ``/metrics``.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from serve_fixtures import build_tiny_model, digit_png, server_process

from conftest import ADMIN_TOKEN


def model_info_by_worker(metrics: str) -> dict[str, tuple[str, float]]:
    """pid -> (digest, value) of the series that are 1 (the model each worker serves)."""
    out = {}
    for family in text_string_to_metric_families(metrics):
        for s in family.samples:
            if s.name == "visionops_model_info" and s.value == 1:
                out[s.labels["pid"]] = (s.labels["digest"], s.value)
    return out


@pytest.mark.slow
def test_reload_reaches_every_worker(tiny_model_dir: Path, tmp_path: Path) -> None:
    served = tmp_path / "served"
    shutil.copytree(tiny_model_dir, served)
    other = build_tiny_model(tmp_path / "other", seed=7)
    env = {
        "VISIONOPS_PREDLOG_URL": f"sqlite:///{tmp_path / 'p.db'}",
        "VISIONOPS_ADMIN_TOKEN": ADMIN_TOKEN,
    }
    with server_process(served, tmp_path, env=env, workers=2) as server:
        before = httpx.get(f"{server.url}/v1/model").json()["digest"]
        # Each new connection may land on either worker: ask until both answered.
        for _ in range(50):
            r = httpx.post(
                f"{server.url}/v1/predict",
                files=[("files", ("a.png", digit_png(), "image/png"))],
            )
            assert r.status_code == 200
        workers = model_info_by_worker(httpx.get(f"{server.url}/metrics").text)
        assert len(workers) == 2 and {d for d, _ in workers.values()} == {before}

        for name in ("model.onnx", "metadata.json"):  # a new model in the served folder
            shutil.copy(other / name, served / name)
        r = httpx.post(
            f"{server.url}/v1/admin/reload",
            headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
            timeout=60,
        )
        assert r.status_code == 200, r.text
        assert r.json()["changed"] is True and r.json()["workers"] == 2

        workers = model_info_by_worker(httpx.get(f"{server.url}/metrics").text)
        after = {d for d, _ in workers.values()}
        assert len(workers) == 2 and after != {before} and len(after) == 1
        for _ in range(20):  # whichever worker answers, it serves the new model
            assert httpx.get(f"{server.url}/v1/model").json()["digest"] in after
    assert "Traceback" not in server.log(), server.log()[-3000:]
