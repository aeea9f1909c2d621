"""Acting on drift: the HTML report, `monitor check` (exit codes, webhook), feedback and the
monitoring routes, all on a real SQLite prediction log written by the server's writer."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import sqlalchemy as sa
from fastapi import FastAPI
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry

from visionops.errors import ConfigError, DataError
from visionops.monitor.api import create_monitoring_router
from visionops.monitor.check import EXIT_ALARM, EXIT_OK, run_check
from visionops.monitor.feedback import (
    InvalidLabelError,
    UnknownPredictionError,
    feedback_accuracy,
    record_feedback,
)
from visionops.monitor.reference import ReferenceProfile
from visionops.monitor.report import write_monitoring_report
from visionops.monitor.stats import image_statistics
from visionops.monitor.window import InsufficientDataError, load_window
from visionops.serve.predlog import PredictionLog, PredictionRecord, create_predlog_engine

CLASSES = tuple(str(i) for i in range(10))
START = datetime(2025, 5, 1, 8, 0, tzinfo=UTC)
N_CLEAN, N_DRIFT = 150, 100


def bars(n: int, rng: np.random.Generator, thick: bool = False) -> np.ndarray:
    """Digit-like vertical strokes; ``thick`` ones are 6-9 pixels wide instead of 1-3."""
    x = np.zeros((n, 28, 28, 1), np.uint8)
    for i in range(n):
        w = int(rng.integers(6, 10) if thick else rng.integers(1, 4))
        h = int(rng.integers(14, 21))
        top, left = (28 - h) // 2, 14 - w // 2 + int(rng.integers(-2, 3))
        x[i, top : top + h, left : left + w, 0] = int(rng.integers(180, 256))
    return x


@pytest.fixture(scope="module")
def reference() -> ReferenceProfile:
    rng = np.random.default_rng(0)
    return ReferenceProfile(
        classes=CLASSES,
        n_images=1000,
        stats=image_statistics(bars(1000, rng)),
        confidence=rng.beta(20, 1, 1000),
        class_counts=np.full(10, 100),
        embeddings=rng.normal(0.0, 1.0, (500, 8)).astype(np.float32),
        model_name="visionops-test",
        model_digest="feedc0ffee",
        accuracy=0.97,
    )


def log_traffic(url: str) -> None:
    """150 clean predictions, then 100 drifted ones (thick strokes, all '1', shifted
    embeddings, unsure), one second apart; request 'multi' holds two inputs."""
    rng = np.random.default_rng(1)
    writer = PredictionLog(url)
    writer.start()
    records = []
    for i in range(N_CLEAN + N_DRIFT):
        drifted = i >= N_CLEAN
        label = "1" if drifted else CLASSES[int(rng.integers(10))]
        confidence = float(rng.beta(2, 2) if drifted else rng.beta(20, 1))
        records.append(
            PredictionRecord(
                created_at=START + timedelta(seconds=i),
                request_id="multi" if i in (0, 1) else f"req-{i}",
                input_index=i if i in (0, 1) else 0,
                model_name="visionops-test",
                model_version="4",
                model_alias="champion",
                label=label,
                class_index=int(label),
                confidence=confidence,
                accepted=confidence >= 0.7,
                reason=None if confidence >= 0.7 else "low_confidence",
                probabilities={c: 0.1 for c in CLASSES},
                embedding=(rng.normal(1.0 if drifted else 0.0, 1.0, 8)).tolist(),
                pixels=bars(1, rng, thick=drifted)[0],
            )
        )
    writer.submit(records)
    writer.close()
    assert writer.written == N_CLEAN + N_DRIFT


@pytest.fixture(scope="module")
def predlog_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    url = f"sqlite:///{tmp_path_factory.mktemp('monitor') / 'predictions.db'}"
    log_traffic(url)
    return url


CLEAN_UNTIL = START + timedelta(seconds=N_CLEAN)


# --------------------------------------------------------------------------- check


class Webhook:
    """A local endpoint that records what is POSTed to it."""

    def __init__(self, status: int = 200) -> None:
        self.bodies: list[dict[str, Any]] = []
        hook = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                hook.bodies.append(
                    {
                        "path": self.path,
                        "type": self.headers["Content-Type"],
                        "json": json.loads(body),
                    }
                )
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hooks/secret-token"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def webhook() -> Iterator[Webhook]:
    hook = Webhook()
    yield hook
    hook.close()


def test_check_exits_0_without_drift_and_sends_nothing(
    predlog_url: str, reference: ReferenceProfile, webhook: Webhook
) -> None:
    result = run_check(None, predlog_url, reference, webhook.url, since=START, until=CLEAN_UNTIL)
    assert result.exit_code == EXIT_OK == 0
    assert not result.report.drift_detected and result.report.window["size"] == N_CLEAN
    assert webhook.bodies == [] and result.webhook_status is None


def test_check_exits_1_on_an_alarm_and_posts_the_alert(
    predlog_url: str, reference: ReferenceProfile, webhook: Webhook
) -> None:
    result = run_check(N_DRIFT, predlog_url, reference, webhook.url)
    assert result.exit_code == EXIT_ALARM == 1
    assert result.verdict.alarm and result.report.drift_detected
    # Unsure predictions (mean confidence 0.5 against 0.95): the estimate collapses.
    assert result.verdict.performance.estimated.value < 0.6
    assert any(r.startswith("estimated accuracy fell") for r in result.verdict.performance.reasons)
    names = {t.name for t in result.report.drifted}
    assert {"bbox_width", "stroke_thickness", "predicted_class", "embedding", "confidence"} <= names
    assert result.webhook_status == 200 and len(webhook.bodies) == 1
    sent = webhook.bodies[0]
    assert sent["path"] == "/hooks/secret-token" and sent["type"] == "application/json"
    assert sent["json"]["event"] == "visionops.alarm"
    assert sent["json"]["report"]["drift_detected"] is True
    assert sent["json"]["report"]["alarm"] is True
    assert sent["json"]["report"]["alarm_reasons"]
    assert sent["json"]["text"].startswith("visionops ALARM: ")
    assert "DATA DRIFT in 100 predictions" in sent["json"]["text"]
    assert "secret-token" not in result.describe()  # the webhook path is not printed


def test_check_reports_a_failing_webhook_but_keeps_the_exit_code(
    predlog_url: str, reference: ReferenceProfile
) -> None:
    broken = Webhook(status=500)
    try:
        result = run_check(N_DRIFT, predlog_url, reference, broken.url)
    finally:
        broken.close()
    assert result.exit_code == 1 and result.webhook_error is not None
    assert "500" in result.webhook_error and "secret-token" not in result.webhook_error
    with pytest.raises(ConfigError, match="http"):
        run_check(N_DRIFT, predlog_url, reference, "file:///etc/passwd")
    with pytest.raises(InsufficientDataError):
        run_check(None, predlog_url, reference, since=START + timedelta(seconds=240))


# --------------------------------------------------------------------------- feedback


def test_feedback_is_stored_validated_and_counted(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'fb.db'}"
    log_traffic(url)
    engine = create_predlog_engine(url)
    try:
        r = record_feedback(engine, "req-5", "7")
        assert (r.input_index, r.replaced) == (0, False)
        assert r.correct == (r.predicted_label == "7")
        again = record_feedback(engine, "req-5", r.predicted_label)
        assert again.replaced and again.correct
        record_feedback(engine, "multi", "3", input_index=1)
        with pytest.raises(InvalidLabelError, match="input_index"):
            record_feedback(engine, "multi", "3")
        with pytest.raises(UnknownPredictionError, match="no input_index 5"):
            record_feedback(engine, "multi", "3", input_index=5)
        with pytest.raises(UnknownPredictionError, match="'nope'"):
            record_feedback(engine, "nope", "3")
        with pytest.raises(InvalidLabelError, match="'cat' is not a class"):
            record_feedback(engine, "req-5", "cat")
        acc = feedback_accuracy(engine)
        assert acc.labelled == 2 and acc.by_version == {"4": (2, acc.correct)}
        with engine.connect() as conn:
            n = conn.execute(sa.text("select count(*) from feedback")).scalar_one()
        assert n == 2  # one row per prediction: the second label replaced the first
    finally:
        engine.dispose()


# --------------------------------------------------------------------------- report


def test_report_is_a_self_contained_html_file(
    predlog_url: str, reference: ReferenceProfile, tmp_path: Path
) -> None:
    out = tmp_path / "reports" / "monitoring.html"
    result = write_monitoring_report(reference, predlog_url, out, window=N_DRIFT)
    text = out.read_text()
    assert result.path == out and result.drift.drift_detected and result.timeline_windows >= 2
    assert text.startswith("<!DOCTYPE html>") and "DRIFT in 100 predictions" in text
    for section in ("summary", "tests", "distributions", "drift-over-time", "atypical", "feedback"):
        assert f'<section id="{section}">' in text, section
    assert text.count('<img class="plot" src="data:image/png;base64,') >= 4
    assert text.count('<img class="thumb" src="data:image/png;base64,') >= 10  # thumbnails
    lower = text.lower()
    assert "<script" not in lower and "<link" not in lower
    assert 'src="http' not in lower and 'href="http' not in lower and "url(" not in lower
    assert "No labelled predictions yet" in text
    # Rejections are counted by reason (the drifted traffic is unsure).
    counts = load_window(predlog_url, window=N_DRIFT).rejections()
    assert counts is not None and counts["low_confidence"] > 10
    assert counts["no_ink"] == counts["out_of_distribution"] == 0
    assert (
        f'<p id="rejections">Not accepted: <b>{counts["low_confidence"]}</b> of {N_DRIFT} ' in text
    )


# --------------------------------------------------------------------------- API


def make_client(
    predlog_url: str | None, reference: Any, registry: CollectorRegistry | None = None
) -> TestClient:
    app = FastAPI()

    def get_reference() -> ReferenceProfile | None:
        if isinstance(reference, Exception):
            raise reference
        return reference  # type: ignore[no-any-return]

    app.include_router(create_monitoring_router(get_reference, lambda: predlog_url, registry))
    return TestClient(app)


def test_drift_endpoint_reports_and_sets_the_gauges(
    predlog_url: str, reference: ReferenceProfile
) -> None:
    registry = CollectorRegistry()
    client = make_client(predlog_url, reference, registry)
    r = client.get("/v1/monitoring/drift", params={"window": N_DRIFT})
    assert r.status_code == 200
    body = r.json()
    assert body["drift_detected"] is True
    assert body["window"]["size"] == N_DRIFT and body["window"]["start"].startswith("2025-05-01")
    assert body["reference"]["model_digest"] == "feedc0ffee"
    first = body["tests"][0]
    assert {"name", "statistic", "p_value", "threshold", "drift", "verdict"} <= set(first)
    assert registry.get_sample_value("visionops_drift_detected") == 1.0
    assert registry.get_sample_value("visionops_drift_score") == pytest.approx(body["drift_score"])
    assert registry.get_sample_value("visionops_drift_window_size") == N_DRIFT

    clean = client.get(
        "/v1/monitoring/drift",
        params={"since": START.isoformat(), "until": CLEAN_UNTIL.isoformat()},
    )
    assert clean.status_code == 200 and clean.json()["drift_detected"] is False
    assert registry.get_sample_value("visionops_drift_detected") == 0.0


def test_drift_endpoint_errors_are_clear(predlog_url: str, reference: ReferenceProfile) -> None:
    client = make_client(predlog_url, reference)
    few = client.get("/v1/monitoring/drift", params={"window": 10})
    assert few.status_code == 422
    assert few.json()["error"]["code"] == "not_enough_predictions"
    assert "at least 30" in few.json()["error"]["message"]
    bad = client.get("/v1/monitoring/drift", params={"since": "last tuesday"})
    assert bad.status_code == 422 and "ISO 8601" in bad.json()["error"]["message"]
    assert make_client(predlog_url, None).get("/v1/monitoring/drift").status_code == 503
    missing = make_client(predlog_url, DataError("reference.json was built for model x"))
    r = missing.get("/v1/monitoring/drift")
    assert r.status_code == 503 and "built for model x" in r.json()["error"]["message"]
    off = make_client(None, reference).get("/v1/monitoring/drift")
    assert off.status_code == 503 and off.json()["error"]["code"] == "predlog_disabled"


def test_feedback_endpoint(tmp_path: Path, reference: ReferenceProfile) -> None:
    url = f"sqlite:///{tmp_path / 'api-fb.db'}"
    log_traffic(url)
    registry = CollectorRegistry()
    client = make_client(url, reference, registry)
    ok = client.post("/v1/feedback", json={"request_id": "req-200", "label": 1})
    assert ok.status_code == 200
    assert ok.json() == {
        "request_id": "req-200",
        "input_index": 0,
        "label": "1",
        "predicted_label": "1",
        "correct": True,
        "replaced": False,
    }
    assert registry.get_sample_value("visionops_feedback_total", {"correct": "true"}) == 1.0
    unknown = client.post("/v1/feedback", json={"request_id": "ghost", "label": "1"})
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "unknown_request"
    bad = client.post("/v1/feedback", json={"request_id": "req-200", "label": "11"})
    assert bad.status_code == 422 and bad.json()["error"]["code"] == "invalid_label"
    assert client.post("/v1/feedback", json={"label": "1"}).status_code == 422
    page = client.get("/monitoring", params={"window": 100})
    assert page.status_code == 200 and "accuracy on <b>1</b> labelled predictions" in page.text
    assert 'id="feedback-summary" data-labelled="1" data-correct="1"' in page.text
    # The window's own labelled rows: realised accuracy beside the estimate.
    assert 'id="realised-accuracy"><td>realised accuracy (1 labelled)' in page.text


def test_monitoring_page(predlog_url: str, reference: ReferenceProfile) -> None:
    client = make_client(predlog_url, reference)
    page = client.get("/monitoring", params={"window": N_DRIFT})
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "default-src 'none'" in page.headers["content-security-policy"]
    assert '<img class="plot" src="data:image/png;base64,' in page.text
    few = client.get("/monitoring", params={"window": 5})
    assert few.status_code == 422 and "at least 30" in few.text


def test_monitoring_modules_do_not_import_torch() -> None:
    code = (
        "import sys\n"
        "import visionops.monitor.api, visionops.monitor.report, visionops.monitor.check\n"
        "import visionops.monitor.reference, visionops.monitor.drift, visionops.monitor.simulate\n"
        "print('torch' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_install_monitoring_on_the_real_prediction_service(tmp_path: Path) -> None:
    """The exact mounting the app factory uses: real app, real model, real log."""
    from test_reference import SPEC, digits, tiny_onnx

    from visionops.monitor.reference import build_reference_profile
    from visionops.serve.app import create_app
    from visionops.serve.service import ServeSettings

    model_dir = tiny_onnx(tmp_path / "exported")
    build_reference_profile(model_dir, digits(300, seed=4), SPEC)
    url = f"sqlite:///{tmp_path / 'predictions.db'}"
    # create_app mounts the monitoring routes itself (install_monitoring).
    app = create_app(ServeSettings(model_uri=str(model_dir), predlog_url=url, threads=1))
    with TestClient(app) as client:
        for _ in range(200):
            if client.get("/readyz").status_code == 200:
                break
            threading.Event().wait(0.05)
        instances = (digits(40, seed=5)[..., 0] / 255.0).round(3).tolist()
        r = client.post("/v1/predict", json={"instances": instances})
        assert r.status_code == 200
        app.state.service.predlog.flush()
        drift = client.get("/v1/monitoring/drift", params={"window": 40})
        assert drift.status_code == 200, drift.text
        body = drift.json()
        assert body["window"]["size"] == 40 and body["reference"]["model_name"] == "tiny"
        assert not body["drift_detected"]  # the same kind of images as the reference
        fb = client.post(
            "/v1/feedback",
            json={"request_id": r.headers["x-request-id"], "label": "a", "input_index": 3},
        )
        assert fb.status_code == 200 and fb.json()["input_index"] == 3
        few = client.get("/v1/monitoring/drift", params={"window": 10})
        assert few.status_code == 422 and few.json()["error"]["code"] == "not_enough_predictions"
        metrics = client.get("/metrics").text
        assert "visionops_drift_score " in metrics and "visionops_feedback_total" in metrics
