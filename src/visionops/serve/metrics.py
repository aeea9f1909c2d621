"""Prometheus metrics of one app, in its own registry (several apps can live in a process)."""

from __future__ import annotations

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    generate_latest,
)

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
CONFIDENCE_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)

#: The ``method`` label values (RFC 9110 section 9 plus PATCH); any other token becomes
#: ``other``. The HTTP parser accepts any token as a method, and one series per made-up
#: method would let clients grow ``/metrics`` without bound.
HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"})


def method_label(method: str) -> str:
    """``method`` when it is one of :data:`HTTP_METHODS`, else ``"other"``."""
    return method if method in HTTP_METHODS else "other"


def status_label(status: int) -> str:
    """The status code as text for a valid code (100-599), else ``"other"``."""
    return str(status) if 100 <= status <= 599 else "other"


class ServeMetrics:
    """Every series the service exports.

    Every label has a bounded set of values: ``route`` is a route template or
    ``unmatched``, ``method`` and ``status`` go through :func:`method_label` and
    :func:`status_label`, ``label`` is one of the model's classes.
    """

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "visionops_http_requests",
            "HTTP requests by route template, method and status code.",
            ["route", "method", "status"],
            registry=r,
        )
        self.latency = Histogram(
            "visionops_http_request_duration_seconds",
            "HTTP request latency by route template, method and status code.",
            ["route", "method", "status"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.predictions = Counter(
            "visionops_predictions",
            "Predictions served, by predicted class and whether confidence passed the threshold.",
            ["label", "accepted"],
            registry=r,
        )
        self.confidence = Histogram(
            "visionops_prediction_confidence",
            "Confidence (top-class probability) of served predictions.",
            buckets=CONFIDENCE_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "visionops_batch_size",
            "Images per ONNX Runtime call (micro-batching).",
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.model_info = Info(
            "visionops_model", "The model being served (name, version, alias).", registry=r
        )
        self.model_loaded = Gauge(
            "visionops_model_loaded", "1 when a model is loaded and ready.", registry=r
        )
        self.reloads = Counter(
            "visionops_model_reloads", "Admin reload attempts by outcome.", ["outcome"], registry=r
        )
        self.predlog_pending = Gauge(
            "visionops_predlog_pending_rows",
            "Prediction-log rows waiting to be written.",
            registry=r,
        )

    def set_model(self, name: str, version: str | None, alias: str | None, digest: str) -> None:
        self.model_info.info(
            {"name": name, "version": version or "", "alias": alias or "", "digest": digest}
        )
        self.model_loaded.set(1)

    def render(self) -> bytes:
        return generate_latest(self.registry)
