"""Prometheus metrics of one app, correct with one process or several.

With one process the app has its own registry (several apps can live in a process, as
the tests build them). With ``visionops serve --workers N`` every worker writes its
values to prometheus-client's multiprocess directory (``PROMETHEUS_MULTIPROC_DIR``,
set before the workers start) and ``/metrics``, whichever worker answers it, sums the
files of all of them (:class:`prometheus_client.multiprocess.MultiProcessCollector`).
"""

from __future__ import annotations

from collections import Counter as Tally
from collections.abc import Sequence
from typing import Any

import numpy as np
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
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

    ``multiprocess_dir``: the multiprocess directory when several workers serve (the
    environment variable must already name it when ``prometheus_client`` is imported);
    None for a single process with a private registry.

    Every label has a bounded set of values: ``route`` is a route template or
    ``unmatched``, ``method`` and ``status`` go through :func:`method_label` and
    :func:`status_label`, ``label`` is one of the model's classes.
    """

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, multiprocess_dir: str | None = None) -> None:
        self.multiprocess_dir = multiprocess_dir
        # In multiprocess mode the values live in files; this registry only holds the
        # metric objects (rendering reads the files of every worker instead).
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
        self.rejections = Counter(
            "visionops_rejected_predictions",
            "Predictions not accepted, by reason: no_ink, out_of_distribution, low_confidence.",
            ["reason"],
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
        # A gauge, not an Info: Info has no multiprocess mode. One series per worker
        # process in multiprocess mode ("liveall"), so a reload is visible per worker.
        self.model_info = Gauge(
            "visionops_model_info",
            "The model being served (name, version, alias, digest); 1 for the current one.",
            ["name", "version", "alias", "digest"],
            registry=r,
            multiprocess_mode="liveall",
        )
        self.model_loaded = Gauge(
            "visionops_model_loaded",
            "1 when a model is loaded and ready (the least of all workers).",
            registry=r,
            multiprocess_mode="livemin",
        )
        self.reloads = Counter(
            "visionops_model_reloads", "Admin reload attempts by outcome.", ["outcome"], registry=r
        )
        self.predlog_pending = Gauge(
            "visionops_predlog_pending_rows",
            "Prediction-log rows waiting to be written (all workers).",
            registry=r,
            multiprocess_mode="livesum",
        )
        self._model_labels: tuple[str, str, str, str] | None = None
        # Labelled children by label values: .labels() validates and locks on every call.
        self._children: dict[tuple[object, ...], Any] = {}

    def child(self, metric: Any, *labels: str) -> Any:
        """``metric.labels(*labels)``, looked up once per label combination."""
        key = (id(metric), *labels)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*labels)
        return found

    def set_model(self, name: str, version: str | None, alias: str | None, digest: str) -> None:
        labels = (name, version or "", alias or "", digest)
        if self._model_labels is not None and self._model_labels != labels:
            if self.multiprocess_dir:
                self.model_info.labels(*self._model_labels).set(0)
            else:
                self.model_info.remove(*self._model_labels)
        self.model_info.labels(*labels).set(1)
        self._model_labels = labels
        self.model_loaded.set(1)

    def observe_rejections(self, reasons: Sequence[str | None]) -> None:
        """Count one request's predictions that were not accepted, by reason."""
        for reason, n in Tally(r for r in reasons if r is not None).items():
            self.child(self.rejections, reason).inc(n)

    def observe_predictions(
        self,
        classes: Sequence[str],
        class_index: np.ndarray,
        confidence: np.ndarray,
        accepted: np.ndarray,
    ) -> None:
        """Count one request's predictions: one increment per (label, accepted) pair."""
        pairs = Tally(zip(class_index.tolist(), accepted.tolist(), strict=True))
        for (k, ok), n in pairs.items():
            self.child(self.predictions, classes[k], "true" if ok else "false").inc(n)
        for c in confidence.tolist():
            self.confidence.observe(c)

    def render(self) -> bytes:
        if not self.multiprocess_dir:
            return generate_latest(self.registry)
        from prometheus_client import multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=self.multiprocess_dir)
        return generate_latest(registry)


def mark_process_dead(multiprocess_dir: str, pid: int) -> None:
    """Drop a finished worker's live gauges (its counters keep counting in the totals)."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(pid, multiprocess_dir)
