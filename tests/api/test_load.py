"""A bounded load test against a real uvicorn server in its own process.

32 concurrent clients for ``VISIONOPS_LOAD_SECONDS`` (default 10; e.g. 30 for
a longer run) against two worker processes (``--workers 2``) writing one SQLite
prediction log: no request may fail, the summed Prometheus counters match what the
clients saw, and after a graceful SIGTERM the prediction log holds exactly one row per
served prediction (no row lost, no "database is locked"). The request rate is printed for
information only — speed is measured by ``make bench``, never asserted here.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from serve_fixtures import digit_png, server_process

from visionops.serve.predlog import count_predictions

CONCURRENCY = 32


@dataclass
class LoadResult:
    requests: int = 0
    predictions: int = 0
    errors: list[str] = field(default_factory=list)
    seconds: float = 0.0


async def run_load(url: str, seconds: float, concurrency: int) -> LoadResult:
    bodies = [
        [("files", ("a.png", digit_png("zero"), "image/png"))],
        [("files", ("b.png", digit_png("one"), "image/png"))],
        [
            ("files", ("c.png", digit_png("seven"), "image/png")),
            ("files", ("d.png", digit_png("zero"), "image/png")),
        ],
    ]
    result = LoadResult()
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=30, limits=limits) as client:
        start = time.perf_counter()
        deadline = start + seconds

        async def worker(k: int) -> None:
            i = k
            while time.perf_counter() < deadline:
                files = bodies[i % len(bodies)]
                i += 1
                try:
                    r = await client.post("/v1/predict", files=files)
                except httpx.HTTPError as exc:
                    result.errors.append(f"{type(exc).__name__}: {exc}")
                    continue
                result.requests += 1
                if r.status_code != 200:
                    result.errors.append(f"{r.status_code}: {r.text[:200]}")
                    continue
                result.predictions += len(r.json()["predictions"])

        await asyncio.gather(*(worker(k) for k in range(concurrency)))
        result.seconds = time.perf_counter() - start
    return result


@pytest.mark.slow
def test_load_no_errors_and_every_prediction_logged(tiny_model_dir: Path, tmp_path: Path) -> None:
    seconds = float(os.environ.get("VISIONOPS_LOAD_SECONDS", "10"))
    url = f"sqlite:///{tmp_path / 'predictions.db'}"
    env = {"VISIONOPS_PREDLOG_URL": url}
    with server_process(tiny_model_dir, tmp_path, env=env, workers=2) as server:
        result = asyncio.run(run_load(server.url, seconds, CONCURRENCY))
        metrics = httpx.get(f"{server.url}/metrics").text
        # uvicorn re-raises SIGTERM after its graceful shutdown: exit 0 or -SIGTERM.
        assert server.stop() in (0, -signal.SIGTERM), server.log()[-3000:]
    assert "Application shutdown complete" in server.log()
    assert result.errors == [], result.errors[:5]
    assert result.requests > 0
    # SIGTERM is a graceful shutdown: every prediction made it to the log.
    assert count_predictions(url) == result.predictions
    assert "visionops_batch_size_bucket" in metrics
    assert "database is locked" not in server.log()
    # Both workers answered, and the counters summed over them match the clients.
    pids = {
        line.split("[")[-1].split("]")[0]
        for line in server.log().splitlines()
        if "Started server process" in line
    }
    assert len(pids) == 2, server.log()[-2000:]
    totals: dict[str, float] = {}
    for family in text_string_to_metric_families(metrics):
        for s in family.samples:
            if s.name == "visionops_http_requests_total" and s.labels["route"] == "/v1/predict":
                totals[s.labels["status"]] = totals.get(s.labels["status"], 0) + s.value
            elif s.name == "visionops_predictions_total":
                totals["predictions"] = totals.get("predictions", 0) + s.value
    assert totals == {"200": result.requests, "predictions": result.predictions}
    rate = result.requests / result.seconds
    print(
        f"\nload: {result.requests} requests ({result.predictions} predictions) in "
        f"{result.seconds:.1f} s at concurrency {CONCURRENCY}: {rate:.0f} req/s "
        f"(informational; client and server share this machine)"
    )
