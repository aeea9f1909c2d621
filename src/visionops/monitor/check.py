"""Acting on the alarm: ``visionops monitor check`` for cron jobs and CI.

:func:`run_check` assesses one window of the prediction log at both levels
(:mod:`visionops.monitor.verdict`); its :attr:`CheckResult.exit_code` is 0 without an
alarm and 1 with one — data drift alone is a warning, reported but exit code 0 (bad
input raises a ``VisionOpsError``, which the CLI turns into exit code 2). On an alarm it
can POST a JSON alert to a webhook (Slack-style ``text`` plus the whole verdict).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from visionops.errors import ConfigError
from visionops.monitor.drift import DEFAULT_ALPHA, MMD_WINDOW_SIZE, Correction, DriftReport
from visionops.monitor.reference import ReferenceProfile, resolve_reference
from visionops.monitor.verdict import MonitoringVerdict, assess_window
from visionops.monitor.window import load_window
from visionops.serve.predlog import create_predlog_engine, safe_url

log = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_ALARM = 1


@dataclass(frozen=True)
class CheckResult:
    verdict: MonitoringVerdict
    webhook_url: str | None = None
    webhook_status: int | None = None  # HTTP status of the alert POST
    webhook_error: str | None = None

    @property
    def report(self) -> DriftReport:
        """The data-drift level of the verdict."""
        return self.verdict.drift

    @property
    def exit_code(self) -> int:
        return EXIT_ALARM if self.verdict.alarm else EXIT_OK

    def summary(self) -> dict[str, float]:
        return self.verdict.summary()

    def describe(self) -> str:
        text = self.verdict.describe()
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


def alert_payload(verdict: MonitoringVerdict) -> dict[str, Any]:
    """The webhook body: ``text`` (what chat webhooks show) plus the full verdict."""
    lines = [f"visionops ALARM: {verdict.performance.describe()}"]
    lines += [f"- {reason}" for reason in verdict.performance.reasons]
    lines.append(f"data drift: {verdict.drift.describe()}")
    lines += [f"- {t.verdict}" for t in verdict.drift.drifted]
    return {
        "text": "\n".join(lines),
        "event": "visionops.alarm",
        "report": verdict.to_dict(),
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
    confidence_threshold: float = 0.7,
) -> CheckResult:
    """Assess the last ``window`` predictions (or ``since``/``until``) at both levels.

    ``reference`` is a profile, a model folder / ``reference.json`` path or a registry URI
    (``models:/NAME@champion``). ``confidence_threshold`` is the server's
    ``serve.confidence_threshold``. With ``webhook_url`` an alert is POSTed on an alarm
    (not on data drift alone); a failed POST is reported in the result (and logged), it
    does not change the exit code.
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
        photos=profile.kind == "natural",
    )
    engine = create_predlog_engine(predlog_url)
    try:
        verdict = assess_window(
            profile,
            rows,
            engine=engine,
            confidence_threshold=confidence_threshold,
            alpha=alpha,
            correction=correction,
        )
    finally:
        engine.dispose()
    log.info("monitoring check on %s: %s", safe_url(predlog_url), verdict.describe())
    if not (verdict.alarm and webhook_url):
        return CheckResult(verdict)
    import httpx

    try:
        status = post_alert(webhook_url, alert_payload(verdict), timeout=timeout)
    except (httpx.HTTPError, OSError) as exc:
        reason = f"{type(exc).__name__}: {exc}".replace(webhook_url, _redact(webhook_url))
        log.error("alarm alert to %s failed: %s", _redact(webhook_url), reason)
        return CheckResult(verdict, webhook_url, None, reason)
    return CheckResult(verdict, webhook_url, status, None)
