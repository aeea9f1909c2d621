"""`visionops serve --workers N`: one port, several processes, one service.

A real server with two worker processes: a reload answered by one worker reaches the
other (each worker's ``visionops_model_info`` series shows the new digest), and the
workers' metrics are summed by whichever answers ``/metrics``.
"""

from __future__ import annotations

import os
import shutil
import signal
import time
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


def _workers_of(pid: int) -> list[int]:
    """The spawned worker processes under ``pid`` (not multiprocessing's resource tracker)."""
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    out = []
    for child in children:
        cmdline = Path(f"/proc/{child}/cmdline").read_bytes().replace(b"\0", b" ")
        if b"spawn_main" in cmdline:
            out.append(int(child))
    return sorted(out)


def _listening_inodes(port: int) -> set[str]:
    """Socket inodes in LISTEN state on ``port`` (/proc/net/tcp)."""
    found = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if int(fields[1].split(":")[1], 16) == port and fields[3] == "0A":
            found.add(fields[9])
    return found


def _socket_inodes(pid: int) -> set[str]:
    out = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            out.add(target[8:-1])
    return out


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="needs Linux /proc")
def test_each_worker_has_its_own_socket_and_a_dead_one_is_replaced(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    env = {"VISIONOPS_PREDLOG_URL": f"sqlite:///{tmp_path / 'p.db'}"}
    with server_process(tiny_model_dir, tmp_path, env=env, workers=2) as server:
        port = int(server.url.rsplit(":", 1)[1])
        deadline = time.monotonic() + 60
        while len(workers := _workers_of(server.proc.pid)) < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert len(workers) == 2
        # SO_REUSEPORT: two listening sockets on the port, one in each worker, none in
        # the supervisor (the kernel spreads connections over the two).
        listening = _listening_inodes(port)
        assert len(listening) == 2
        assert [len(_socket_inodes(w) & listening) for w in workers] == [1, 1]
        assert not _socket_inodes(server.proc.pid) & listening

        os.kill(workers[0], signal.SIGKILL)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            now = _workers_of(server.proc.pid)
            if len(now) == 2 and workers[0] not in now and len(_listening_inodes(port)) == 2:
                break
            time.sleep(0.2)
        else:
            raise AssertionError(f"no replacement worker:\n{server.log()[-3000:]}")
        assert workers[1] in now  # the other worker kept serving
        files = {"files": ("one.png", digit_png("one"), "image/png")}
        codes = [httpx.post(f"{server.url}/v1/predict", files=files).status_code for _ in range(20)]
        assert codes == [200] * 20
        assert server.stop() == 0
