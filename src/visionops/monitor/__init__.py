"""Monitoring: is the served traffic still what the model was validated on?

- :mod:`~visionops.monitor.stats` — per-image statistics (shared with the server's log).
- :mod:`~visionops.monitor.reference` — the reference profile written at export time.
- :mod:`~visionops.monitor.window` — a window of the prediction log.
- :mod:`~visionops.monitor.drift` — the drift tests and their combined verdict.
- :mod:`~visionops.monitor.feedback` — true labels for logged predictions.
- :mod:`~visionops.monitor.check` — ``visionops monitor check`` (exit code, webhook).
- :mod:`~visionops.monitor.report` — the self-contained HTML report.
- :mod:`~visionops.monitor.api` — the server's monitoring routes.
- :mod:`~visionops.monitor.simulate` — traffic with known drift for a running service.

Nothing here imports torch; import the submodule you need (this package imports none).
"""
