"""Suite-wide settings (applied before any test module imports torch or mlflow) and the
PostgreSQL server fixture shared by the prediction-log and MLflow-store tests."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "1")
# torch's OpenMP threads busy-wait by default, which starves concurrent processes
# (servers, dvc stages) on a small machine.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _pg_bin() -> Path | None:
    candidates = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), reverse=True)
    found = shutil.which("initdb")
    return candidates[0].parent if candidates else (Path(found).parent if found else None)


def _unavailable(reason: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"PostgreSQL is required in CI: {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A throwaway PostgreSQL server (VISIONOPS_TEST_POSTGRES_URL to use an existing one),
    as a ``postgresql+psycopg://`` URL (psycopg 3, the driver the project installs)."""
    from visionops.config import database_url

    if url := os.environ.get("VISIONOPS_TEST_POSTGRES_URL"):
        yield database_url(url)  # postgresql:// would mean psycopg2, which is not installed
        return
    bindir = _pg_bin()
    if bindir is None or not (bindir / "pg_ctl").exists():
        _unavailable("PostgreSQL server binaries not installed")
    assert bindir is not None
    base = Path(tempfile.mkdtemp(prefix="visionops-pg-"))
    prefix: list[str] = []
    if os.geteuid() == 0:  # initdb refuses root: run the server as the postgres user
        prefix = ["runuser", "-u", "postgres", "--"]
        shutil.chown(base, user="postgres")
    data, port = base / "data", _free_port()
    try:
        subprocess.run(
            [*prefix, str(bindir / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres"],
            check=True,
            capture_output=True,
        )
        subprocess.run(
            [
                *prefix,
                str(bindir / "pg_ctl"),
                "-D",
                str(data),
                "-l",
                str(base / "log"),
                "-w",
                "-o",
                f"-k {base} -p {port} -c listen_addresses=''",
                "start",
            ],
            check=True,
            capture_output=True,
        )
    except (subprocess.CalledProcessError, OSError) as exc:
        shutil.rmtree(base, ignore_errors=True)
        detail = getattr(exc, "stderr", b"") or b""
        _unavailable(f"cannot start PostgreSQL: {exc} {detail.decode(errors='replace')[-500:]}")
    try:
        yield f"postgresql+psycopg://postgres@/postgres?host={base}&port={port}"
    finally:
        subprocess.run(
            [*prefix, str(bindir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"],
            check=False,
            capture_output=True,
        )
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def postgres_database(postgres_url: str) -> Iterator[str]:
    """A fresh, empty database on the PostgreSQL server, dropped afterwards."""
    import sqlalchemy as sa

    name = f"visionops_test_{uuid.uuid4().hex[:10]}"
    admin = sa.create_engine(postgres_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    try:
        yield sa.make_url(postgres_url).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()
