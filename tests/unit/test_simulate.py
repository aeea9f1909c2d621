"""The traffic simulator: scenario images, target checks, and real HTTP to a local server."""

from __future__ import annotations

import json
import socket
import struct
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from scipy import ndimage

from visionops.errors import ConfigError
from visionops.monitor.simulate import (
    SCENARIOS,
    check_target,
    load_mnist_test,
    scenario_images,
    simulate,
)


def fake_mnist(n: int = 60) -> tuple[np.ndarray, np.ndarray]:
    """Bars centred like MNIST digits; label = bar width (1..5) as a class."""
    x = np.zeros((n, 28, 28), np.uint8)
    y = np.arange(n, dtype=np.int64) % 5
    for i in range(n):
        w = int(y[i]) + 1
        x[i, 4:24, 14 - w // 2 : 14 - w // 2 + w] = 255
    return x, y


def write_idx(folder: Path, x: np.ndarray, y: np.ndarray) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    header = struct.pack(">I", 0x0803) + struct.pack(">III", *x.shape)
    (folder / "t10k-images-idx3-ubyte").write_bytes(header + x.tobytes())
    labels = struct.pack(">I", 0x0801) + struct.pack(">I", len(y)) + y.astype(np.uint8).tobytes()
    (folder / "t10k-labels-idx1-ubyte").write_bytes(labels)
    return folder


# --------------------------------------------------------------------------- images


def test_every_scenario_gives_model_sized_uint8_images() -> None:
    mnist = fake_mnist()
    for scenario in SCENARIOS:
        data = scenario_images(scenario, 7, seed=1, mnist=mnist)
        assert data.images.shape == (7, 28, 28) and data.images.dtype == np.uint8, scenario
        again = scenario_images(scenario, 7, seed=1, mnist=mnist)
        assert np.array_equal(data.images, again.images), f"{scenario} is not deterministic"
    with pytest.raises(ConfigError, match="unknown scenario"):
        scenario_images("sideways", 3, mnist=mnist)
    with pytest.raises(ConfigError, match="positive"):
        scenario_images("noise", 0)


def test_scenarios_change_what_they_claim_to_change() -> None:
    x, _ = mnist = fake_mnist()
    base = scenario_images("mnist", 40, seed=2, mnist=mnist)
    assert base.labels is not None and all(
        any(np.array_equal(img, ref) for ref in x) for img in base.images
    )

    inverted = scenario_images("inverted", 40, seed=2, mnist=mnist)
    assert inverted.force_json and np.array_equal(inverted.images, 255 - base.images)

    shift = scenario_images("label-shift", 40, seed=2, mnist=mnist, classes=(1, 3))
    assert shift.labels is not None and set(shift.labels.tolist()) <= {1, 3}
    with pytest.raises(ConfigError, match="one or two classes"):
        scenario_images("label-shift", 5, mnist=mnist, classes=(1, 2, 3))

    blur = scenario_images("blur", 40, seed=2, mnist=mnist)
    assert blur.images.max(axis=(1, 2)).mean() < 200  # peaks smeared out
    rot = scenario_images("rotation", 40, seed=2, mnist=mnist)
    # A vertical bar rotated by 30-60 degrees gets wider and shorter.
    heights = (rot.images >= 128).any(axis=2).sum(axis=1)
    assert heights.max() < 20

    noise = scenario_images("noise", 20, seed=2)
    assert 110 < noise.images.mean() < 145 and noise.labels is None

    foreign = scenario_images("foreign-digits", 30, seed=2)
    assert foreign.labels is not None and set(foreign.labels.tolist()) <= set(range(10))
    cy, cx = np.mean([ndimage.center_of_mass(img.astype(float)) for img in foreign.images], 0)
    assert abs(cy - 14) < 1 and abs(cx - 14) < 1  # centred like MNIST
    assert (foreign.images > 0).any(axis=2).sum(axis=1).max() <= 21  # a 20-pixel box


def test_mnist_test_images_are_read_from_a_folder(tmp_path: Path) -> None:
    x, y = fake_mnist(12)
    folder = write_idx(tmp_path / "mnist", x, y)
    gx, gy = load_mnist_test(folder)
    assert np.array_equal(gx, x) and np.array_equal(gy, y)
    data = scenario_images("mnist", 5, mnist_dir=folder)
    assert data.images.shape == (5, 28, 28)
    with pytest.raises(Exception, match="t10k-images-idx3-ubyte"):
        load_mnist_test(tmp_path)


# --------------------------------------------------------------------------- target


def test_check_target_accepts_loopback_only() -> None:
    assert check_target("http://127.0.0.1:8000") == "http://127.0.0.1:8000/v1/predict"
    assert check_target("http://localhost:9/v1/predict") == "http://localhost:9/v1/predict"
    assert check_target("http://[::1]:8000/") == "http://[::1]:8000/v1/predict"
    assert check_target("http://127.3.4.5/") == "http://127.3.4.5/v1/predict"
    for url in ("http://example.com", "http://10.0.0.1:8000", "http://localhost.evil.com"):
        with pytest.raises(ConfigError, match="only loopback"):
            check_target(url)
    assert check_target("https://example.com/api", allow_remote=True) == (
        "https://example.com/api/v1/predict"
    )
    with pytest.raises(ConfigError, match="must look like"):
        check_target("ftp://127.0.0.1/")


def test_simulate_refuses_remote_hosts_before_sending() -> None:
    with pytest.raises(ConfigError, match="only loopback"):
        simulate("http://192.0.2.1:8000", "noise", 5, timeout=0.1)
    with pytest.raises(ConfigError, match="batch"):
        simulate("http://127.0.0.1:1", "noise", 5, batch=0)


# --------------------------------------------------------------------------- HTTP


class FakeService:
    """A /v1/predict stand-in on 127.0.0.1: answers label '1', or 500 when failing."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.fail = False
        service = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                ctype = self.headers.get("Content-Type", "")
                if ctype.startswith("application/json"):
                    instances = json.loads(body)["instances"]
                    n, kind = len(instances), "json"
                else:
                    instances = None
                    n, kind = body.count(b'name="files"'), "multipart"
                service.requests.append(
                    {"path": self.path, "kind": kind, "n": n, "instances": instances, "body": body}
                )
                if service.fail:
                    self.send_response(500)
                    self.end_headers()
                    self.wfile.write(b"boom")
                    return
                out = json.dumps({"predictions": [{"label": "1"} for _ in range(n)]}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(out)))
                self.end_headers()
                self.wfile.write(out)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FakeService:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def fake_service() -> Iterator[FakeService]:
    with FakeService() as service:
        yield service


@pytest.fixture
def mnist_dir(tmp_path: Path) -> Path:
    return write_idx(tmp_path / "mnist", *fake_mnist(30))


def test_simulate_sends_json_instances_in_batches(
    fake_service: FakeService, mnist_dir: Path
) -> None:
    result = simulate(fake_service.url, "mnist", 10, batch=4, mnist_dir=mnist_dir, seed=5)
    assert (result.sent, result.ok, result.errors, result.requests) == (10, 10, 0, 3)
    assert result.label_counts == {"1": 10} and result.status_counts == {"200": 10}
    assert [r["n"] for r in fake_service.requests] == [4, 4, 2]
    assert all(r["path"] == "/v1/predict" and r["kind"] == "json" for r in fake_service.requests)
    sent = scenario_images("mnist", 10, seed=5, mnist_dir=mnist_dir)
    first = np.asarray(fake_service.requests[0]["instances"][0])
    assert first.shape == (28, 28) and np.allclose(first, sent.images[0] / 255.0, atol=1e-4)
    # The service always answers "1": it is right exactly for the images labelled 1.
    assert sent.labels is not None
    assert result.correct == int((sent.labels == 1).sum())
    assert result.accuracy == pytest.approx(result.correct / 10)
    assert "10/10 images answered" in result.describe()


def test_simulate_png_uploads_except_for_inverted(
    fake_service: FakeService, mnist_dir: Path
) -> None:
    png = simulate(fake_service.url, "noise", 3, batch=3, image_format="png")
    assert png.ok == 3 and png.image_format == "png"
    assert fake_service.requests[-1]["kind"] == "multipart"
    assert fake_service.requests[-1]["body"].count(b"\x89PNG") == 3
    inverted = simulate(fake_service.url, "inverted", 2, image_format="png", mnist_dir=mnist_dir)
    assert inverted.image_format == "json" and fake_service.requests[-1]["kind"] == "json"
    pixels = np.asarray(fake_service.requests[-1]["instances"][0])
    assert pixels.mean() > 0.5  # the service sees a light background


def test_simulate_counts_errors_and_stops_on_a_failing_service(fake_service: FakeService) -> None:
    fake_service.fail = True
    result = simulate(fake_service.url, "noise", 50, batch=2)
    assert result.ok == 0 and result.requests == 10  # gave up after 10 failures in a row
    assert result.errors == result.sent == 20
    assert result.stopped is not None and "HTTP 500" in result.stopped
    assert result.status_counts == {"500": 20} and result.error_samples[0].startswith("HTTP 500")


def test_simulate_against_a_closed_port_stops_early() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again when the block ends: nothing listens
    result = simulate(f"http://127.0.0.1:{port}", "noise", 30, timeout=2.0)
    assert result.ok == 0 and result.sent == 10 and result.stopped is not None
    assert "ConnectError" in result.stopped
