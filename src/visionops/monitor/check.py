"""Acting on drift: ``visionops monitor check`` for cron jobs and CI.

:func:`run_check` tests one window of the prediction log; its :attr:`CheckResult.exit_code`
is 0 without drift and 1 with drift (bad input raises a ``VisionOpsError``, which the CLI
turns into exit code 2). On drift it can POST a JSON alert to a webhook (Slack-style
``text`` plus the whole report).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from visionops.errors import ConfigError
from visionops.monitor.drift import (
    DEFAULT_ALPHA,
    MMD_WINDOW_SIZE,
    Correction,
    DriftReport,
    detect_drift,
)
from visionops.monitor.reference import ReferenceProfile, resolve_reference
from visionops.monitor.window import load_window
from visionops.serve.predlog import safe_url

log = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_DRIFT = 1


@dataclass(frozen=True)
class CheckResult:
    report: DriftReport
    webhook_url: str | None = None
    webhook_status: int | None = None  # HTTP status of the alert POST
    webhook_error: str | None = None

    @property
    def exit_code(self) -> int:
        return EXIT_DRIFT if self.report.drift_detected else EXIT_OK

    def summary(self) -> dict[str, float]:
        return self.report.summary()

    def describe(self) -> str:
        text = self.report.describe()
        if self.webhook_error:
            text += f"; the alert to {_redact(self.webhook_url)} FAILED: {self.webhook_error}"
        elif self.webhook_status is not None:
            text += f"; alert sent to {_redact(self.webhook_url)} (HTTP {self.webhook_status})"
        return text


def _redact(url: str | None) -> str:
    """Scheme, host and port only: webhook paths often carry a secret token."""
    if not url:
        return ""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.hostname or ''}{f':{parts.port}' if parts.port else ''}/…"


def alert_payload(report: DriftReport) -> dict[str, Any]:
    """The webhook body: ``text`` (what chat webhooks show) plus the full report."""
    lines = [f"visionops: {report.describe()}"]
    lines += [f"- {t.verdict}" for t in report.drifted]
    return {
        "text": "\n".join(lines),
        "event": "visionops.drift_detected",
        "report": report.to_dict(),
    }


def post_alert(url: str, payload: dict[str, Any], timeout: float = 10.0) -> int:
    """POST ``payload`` as JSON to ``url``; returns the status, raises on non-2xx."""
    import httpx

    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"webhook URL must be http(s)://host/..., got {_redact(url) or url!r}")
    response = httpx.post(url, json=payload, timeout=timeout, follow_redirects=False)
    response.raise_for_status()
    return response.status_code


def run_check(
    window: int | None,
    predlog_url: str,
    reference: ReferenceProfile | str | Path,
    webhook_url: str | None = None,
    *,
    since: str | datetime | None = None,
    until: str | datetime | None = None,
    model_version: str | None = None,
    alpha: float = DEFAULT_ALPHA,
    correction: Correction = "bonferroni",
    timeout: float = 10.0,
) -> CheckResult:
    """Test the last ``window`` predictions (or ``since``/``until``) for drift.

    ``reference`` is a profile, a model folder / ``reference.json`` path or a registry URI
    (``models:/NAME@champion``). With
    ``webhook_url`` an alert is POSTed when drift is found; a failed POST is reported in
    the result (and logged), it does not change the exit code.
    """
    profile = reference if isinstance(reference, ReferenceProfile) else resolve_reference(reference)
    if webhook_url:
        scheme = urlsplit(webhook_url).scheme
        if scheme not in ("http", "https"):
            raise ConfigError(f"webhook URL must start with http:// or https:// (got {scheme!r})")
    rows = load_window(
        predlog_url,
        window,
        since,
        until,
        model_version=model_version,
        max_embeddings=MMD_WINDOW_SIZE,
    )
    report = detect_drift(profile, rows, alpha=alpha, correction=correction)
    log.info("drift check on %s: %s", safe_url(predlog_url), report.describe())
    if not (report.drift_detected and webhook_url):
        return CheckResult(report)
    import httpx

    try:
        status = post_alert(webhook_url, alert_payload(report), timeout=timeout)
    except (httpx.HTTPError, OSError) as exc:
        reason = f"{type(exc).__name__}: {exc}".replace(webhook_url, _redact(webhook_url))
        log.error("drift alert to %s failed: %s", _redact(webhook_url), reason)
        return CheckResult(report, webhook_url, None, reason)
    return CheckResult(report, webhook_url, status, None)
