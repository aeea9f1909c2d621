"""Run the DVC pipeline under one MLflow parent run (`visionops pipeline run`, `make run`)."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from visionops.errors import VisionOpsError
from visionops.layout import Layout

log = logging.getLogger(__name__)


def _env_with_venv() -> dict[str, str]:
    """The environment for `dvc`: this interpreter's bin dir first, so stages find `visionops`."""
    env = dict(os.environ)
    bin_dir = str(Path(sys.executable).parent)
    env["PATH"] = bin_dir + os.pathsep + env.get("PATH", "")
    env.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    env.setdefault("DO_NOT_TRACK", "1")
    return env


def _dvc() -> str:
    local = Path(sys.executable).parent / "dvc"
    found = str(local) if local.exists() else shutil.which("dvc")
    if not found:
        raise VisionOpsError("dvc is not installed in this environment (pip install dvc)")
    return found


def pipeline_is_up_to_date(layout: Layout) -> bool:
    """True when `dvc status` reports nothing to do."""
    proc = subprocess.run(
        [_dvc(), "status", "--json"],
        cwd=layout.root,
        env=_env_with_venv(),
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise VisionOpsError(f"dvc status failed: {proc.stderr.strip() or proc.stdout.strip()}")
    return json.loads(proc.stdout or "{}") == {}


def run_pipeline(layout: Layout, force: bool = False) -> str:
    """Run `dvc repro` with one MLflow parent run for the stages that execute.

    Returns the summary text. Raises :class:`VisionOpsError` when a stage fails; the
    parent run is then marked FAILED.
    """
    from visionops import registry

    if not force and pipeline_is_up_to_date(layout):
        return "pipeline up to date: nothing to run\n\n" + summarize(layout)

    run_id = registry.start_pipeline_run(layout)
    env = _env_with_venv()
    env["VISIONOPS_PARENT_RUN_ID"] = run_id
    cmd = [_dvc(), "repro"] + (["--force"] if force else [])
    started = time.perf_counter()
    proc = subprocess.run(cmd, cwd=layout.root, env=env, check=False)
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        registry.end_pipeline_run(layout, status="FAILED")
        raise VisionOpsError(
            f"the pipeline failed after {seconds:.0f} s (dvc repro exit code {proc.returncode}); "
            "the failing stage's message is above"
        )
    # The report stage ends the parent run; if it did not run (cached), end it here.
    registry.end_pipeline_run(layout, status="FINISHED")
    return f"pipeline finished in {seconds:.0f} s\n\n" + summarize(layout)


def summarize(layout: Layout) -> str:
    """The last pipeline run's summary (reports/summary.md)."""
    summary = layout.reports_dir / "summary.md"
    if not summary.exists():
        raise VisionOpsError(f"no pipeline summary yet ({summary} missing): run `make run`")
    return summary.read_text()
