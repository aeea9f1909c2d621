"""Monitoring routes for the prediction service (no torch; mounted by ``create_app``).

- ``GET /v1/monitoring/drift?window=N`` (or ``since``/``until``): the monitoring verdict
  of the last N logged predictions as JSON — ``drift_detected`` (data drift, a warning)
  and ``alarm`` with ``alarm_reasons`` (a risk to performance), ``estimated_accuracy``
  and, where feedback exists, ``realised_accuracy``
  (:mod:`visionops.monitor.verdict`); updates the gauges of ``/metrics``. 422 when the
  window holds too few predictions, 503 without a prediction log or reference.
- ``POST /v1/feedback`` ``{"request_id", "label", "input_index"?}``: the true label of a
  logged prediction (404 unknown request, 422 unknown label).
- ``GET /monitoring``: the monitoring report as an HTML page.

Errors answer ``{"error": {"code", "message"}}`` like the rest of the API.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Annotated, Any

from fastapi import APIRouter, Query
from fastapi.responses import HTMLResponse, JSONResponse
from prometheus_client import CollectorRegistry, Counter, Gauge
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy.engine import Engine

from visionops.errors import VisionOpsError
from visionops.monitor.drift import MMD_WINDOW_SIZE
from visionops.monitor.feedback import (
    InvalidLabelError,
    UnknownPredictionError,
    record_feedback,
)
from visionops.monitor.reference import ReferenceProfile, ReferenceStore
from visionops.monitor.verdict import assess_window
from visionops.monitor.window import MAX_WINDOW_ROWS, InsufficientDataError, load_window
from visionops.serve.predlog import create_predlog_engine

log = logging.getLogger(__name__)

DEFAULT_WINDOW = 500
# The report page embeds its images as data: URIs and its style inline; nothing else.
REPORT_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; img-src data:; style-src 'unsafe-inline'; base-uri 'none'; "
        "form-action 'none'; frame-ancestors 'none'"
    ),
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


class FeedbackRequest(BaseModel):
    """Body of ``POST /v1/feedback``."""

    model_config = ConfigDict(extra="forbid")

    request_id: str = Field(
        min_length=1, max_length=64, description="X-Request-ID of the prediction"
    )
    label: str | int = Field(description="the true class name (an integer is read as its name)")
    input_index: int | None = Field(
        default=None, ge=0, description="which input of the request; optional for one input"
    )


class FeedbackResponse(BaseModel):
    request_id: str
    input_index: int
    label: str
    predicted_label: str
    correct: bool
    replaced: bool


def _error(status: int, code: str, message: str) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status)


def _predlog_disabled() -> JSONResponse:
    return _error(
        503, "predlog_disabled", "predictions are not logged: no prediction-log URL is configured"
    )


class MonitoringMetrics:
    """Drift gauges and the feedback counter, in the app's registry.

    With several worker processes the gauges report the most recent check, whichever
    worker ran it (prometheus-client's ``mostrecent`` multiprocess mode).
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        def gauge(name: str, documentation: str, labels: tuple[str, ...] = ()) -> Gauge:
            # The most recent check wins across worker processes.
            return Gauge(
                name, documentation, labels, registry=registry, multiprocess_mode="mostrecent"
            )

        self.score = gauge(
            "visionops_drift_score",
            "Largest drift test score of the last checked window (>= 1 means drift).",
        )
        self.detected = gauge(
            "visionops_drift_detected",
            "1 when the last checked window drifted.",
        )
        self.window_size = gauge(
            "visionops_drift_window_size",
            "Predictions in the last checked window.",
        )
        self.alarm = gauge(
            "visionops_monitoring_alarm",
            "1 when the last checked window puts the model's performance at risk.",
        )
        self.estimated_accuracy = gauge(
            "visionops_estimated_accuracy",
            "Estimated accuracy (no labels) of the last checked window (bound: low/value/high).",
            ("bound",),
        )
        self.reference_accuracy = gauge(
            "visionops_reference_accuracy",
            "Accuracy of the reference (validation split) the estimate is compared with.",
        )
        self.realised_accuracy = gauge(
            "visionops_realised_accuracy",
            "Accuracy over the labelled predictions of the last checked window.",
        )
        self.labelled = gauge(
            "visionops_labelled_predictions",
            "Predictions of the last checked window that received a true label.",
        )
        self.p_value = gauge(
            "visionops_drift_test_p_value",
            "p-value of each drift test on the last checked window.",
            ("test",),
        )
        self.feedback = Counter(
            "visionops_feedback",
            "True labels received, by whether the served prediction was correct.",
            ["correct"],
            registry=registry,
        )


def create_monitoring_router(
    get_reference: Callable[[], ReferenceProfile | None],
    get_predlog_url: Callable[[], str | None],
    registry: CollectorRegistry | None = None,
    *,
    default_window: int = DEFAULT_WINDOW,
    get_confidence_threshold: Callable[[], float] = lambda: 0.7,
) -> APIRouter:
    """The monitoring routes.

    ``get_reference()`` returns the served model's profile (None, or a raised
    ``VisionOpsError``, when there is none: 503 with the reason); ``get_predlog_url()``
    the prediction-log URL (None: logging is off, 503). Gauges go to ``registry`` (the
    app's ``/metrics`` registry; a private one when None). ``get_confidence_threshold()``
    is the server's ``serve.confidence_threshold`` (the rejected-rate check compares the
    log's ``accepted`` flags with the reference at that threshold).
    """
    metrics = MonitoringMetrics(registry if registry is not None else CollectorRegistry())
    engines: dict[str, Engine] = {}
    lock = threading.Lock()
    router = APIRouter(tags=["monitoring"])

    def engine_for(url: str) -> Engine:
        with lock:
            if url not in engines:
                engines[url] = create_predlog_engine(url)
            return engines[url]

    def resolve() -> tuple[ReferenceProfile, str] | JSONResponse:
        url = get_predlog_url()
        if not url:
            return _predlog_disabled()
        try:
            reference = get_reference()
        except VisionOpsError as exc:
            return _error(503, "no_reference", f"no reference profile for the served model: {exc}")
        if reference is None:
            return _error(
                503,
                "no_reference",
                "no reference profile for the served model "
                "(the export stage writes reference.json beside model.onnx)",
            )
        return reference, url

    @router.get(
        "/v1/monitoring/drift",
        responses={
            422: {"description": "Too few predictions in the window, or a bad time"},
            503: {"description": "No prediction log or no reference profile"},
        },
    )
    def drift(
        window: Annotated[
            int | None, Query(ge=1, le=MAX_WINDOW_ROWS, description="the last N predictions")
        ] = None,
        since: Annotated[str | None, Query(description="ISO 8601 start (UTC if no offset)")] = None,
        until: Annotated[str | None, Query(description="ISO 8601 end, exclusive")] = None,
        model_version: Annotated[
            str | None, Query(description="only this model version's rows")
        ] = None,
    ) -> Any:
        """Drift of recent traffic against the served model's reference profile."""
        resolved = resolve()
        if isinstance(resolved, JSONResponse):
            return resolved
        reference, url = resolved
        size = window if window is not None or since or until else default_window
        try:
            rows = load_window(
                url,
                size,
                since,
                until,
                model_version=model_version,
                max_embeddings=MMD_WINDOW_SIZE,
                engine=engine_for(url),
                photos=reference.kind == "natural",
            )
            verdict = assess_window(
                reference,
                rows,
                engine=engine_for(url),
                confidence_threshold=get_confidence_threshold(),
            )
        except InsufficientDataError as exc:
            return _error(422, "not_enough_predictions", str(exc))
        except VisionOpsError as exc:
            return _error(422, "invalid_window", str(exc))
        report, perf = verdict.drift, verdict.performance
        metrics.score.set(report.drift_score)
        metrics.detected.set(int(report.drift_detected))
        metrics.alarm.set(int(verdict.alarm))
        metrics.window_size.set(rows.size)
        for bound in ("low", "value", "high"):
            metrics.estimated_accuracy.labels(bound).set(getattr(perf.estimated, bound))
        metrics.reference_accuracy.set(perf.estimated.reference)
        if perf.realised is not None and perf.realised.value is not None:
            metrics.realised_accuracy.set(perf.realised.value)
        metrics.labelled.set(perf.realised.labelled if perf.realised is not None else 0)
        for t in report.tests:
            if t.p_value is not None:
                metrics.p_value.labels(t.name).set(t.p_value)
        return verdict.to_dict()

    @router.post(
        "/v1/feedback",
        response_model=FeedbackResponse,
        responses={
            404: {"description": "No logged prediction with this request id / input index"},
            422: {"description": "Label not a class of the answering model, or input_index needed"},
            503: {"description": "No prediction log"},
        },
    )
    def feedback(body: FeedbackRequest) -> Any:
        """Record the true label of a logged prediction (a second label replaces the first).

        Predictions are written to the log in the background: feedback sent within
        milliseconds of the prediction may find no row yet (404); retry shortly.
        """
        url = get_predlog_url()
        if not url:
            return _predlog_disabled()
        try:
            result = record_feedback(
                engine_for(url), body.request_id, str(body.label), body.input_index
            )
        except UnknownPredictionError as exc:
            return _error(404, "unknown_request", str(exc))
        except InvalidLabelError as exc:
            return _error(422, "invalid_label", str(exc))
        metrics.feedback.labels(str(result.correct).lower()).inc()
        return FeedbackResponse(**result.to_dict())

    @router.get("/monitoring", response_class=HTMLResponse, include_in_schema=False)
    def monitoring_page(
        window: Annotated[int, Query(ge=1, le=MAX_WINDOW_ROWS)] = default_window,
    ) -> HTMLResponse:
        """The monitoring report of the last ``window`` predictions as a web page."""
        from visionops.monitor.report import build_monitoring_html

        resolved = resolve()
        if isinstance(resolved, JSONResponse):
            body = bytes(resolved.body).decode()
            url = get_predlog_url()
            return HTMLResponse(
                _message_page(body, feedback_html(url) if url else ""),
                status_code=resolved.status_code,
                headers=REPORT_HEADERS,
            )
        reference, url = resolved
        try:
            text, _, _ = build_monitoring_html(
                reference,
                url,
                window,
                engine=engine_for(url),
                confidence_threshold=get_confidence_threshold(),
            )
        except InsufficientDataError as exc:
            return HTMLResponse(
                _message_page(str(exc), feedback_html(url)), status_code=422, headers=REPORT_HEADERS
            )
        return HTMLResponse(text, headers=REPORT_HEADERS)

    def feedback_html(url: str) -> str:
        """The feedback section alone, for pages that cannot show the whole report."""
        from visionops.monitor.feedback import feedback_accuracy
        from visionops.monitor.report import feedback_section

        try:
            acc = feedback_accuracy(engine_for(url))
        except Exception:  # the log itself is unreadable: the message says why already
            log.exception("monitoring page: cannot read the feedback")
            return ""
        return '<section id="feedback"><h2>Realised accuracy (feedback)</h2>' + (
            feedback_section(acc, None) + "</section>"
        )

    return router


def install_monitoring(app: Any, service: Any) -> None:
    """Mount the monitoring routes on the prediction service's app (``create_app``).

    ``service`` is the app's ``PredictionService``: the reference is the one beside the
    model it serves now (re-read after a reload; refused when built for another model
    file), the log is ``service.settings.predlog_url`` and the gauges go to
    ``service.metrics.registry`` (``/metrics``).
    """
    references = ReferenceStore()
    app.include_router(
        create_monitoring_router(
            get_reference=lambda: references.require(service.model),
            get_predlog_url=lambda: service.settings.predlog_url,
            registry=service.metrics.registry,
            get_confidence_threshold=lambda: service.settings.serve.confidence_threshold,
        )
    )


def _message_page(message: str, extra_html: str = "") -> str:
    import contextlib
    import html
    import json

    with contextlib.suppress(ValueError, KeyError, TypeError):  # a JSON error body
        message = json.loads(message)["error"]["message"]
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        "<title>visionops monitoring</title>"
        '</head><body><h1>visionops monitoring</h1><p id="message">'
        + html.escape(message)
        + "</p>"
        + extra_html
        + "</body></html>"
    )
