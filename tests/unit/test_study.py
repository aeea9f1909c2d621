"""Tuning workers started together on a new study: no race, one baseline trial.

Several processes, released at once by a barrier, each join the same fresh study
(a new SQLite file, or a new PostgreSQL database) several rounds in a row.
"""

from __future__ import annotations

import multiprocessing as mp
from pathlib import Path
from typing import Any

import pytest

WORKERS = 4
ROUNDS = 3


def _join(urls: list[str], barrier: Any, errors: Any) -> None:
    from visionops.config import Params
    from visionops.study import join_study
    from visionops.tune import baseline_values

    params = Params()
    for url in urls:
        barrier.wait(timeout=120)
        try:
            join_study(params, "race", url, baseline_values(params), [{"lr": 0.001}])
        except Exception as exc:
            errors.put(f"{type(exc).__name__}: {exc}")


def _race(urls: list[str]) -> list[str]:
    ctx = mp.get_context("spawn")
    barrier, errors = ctx.Barrier(WORKERS), ctx.Queue()
    procs = [ctx.Process(target=_join, args=(urls, barrier, errors)) for _ in range(WORKERS)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    found = []
    while not errors.empty():
        found.append(errors.get())
    return found


def _check_study(url: str) -> None:
    import optuna

    study = optuna.load_study(study_name="race", storage=url)
    trials = study.get_trials(deepcopy=False)
    assert sum(bool(t.user_attrs.get("baseline")) for t in trials) == 1
    assert len(trials) == 2, [t.params for t in trials]  # the baseline and the one enqueued
    assert all(t.state == optuna.trial.TrialState.WAITING for t in trials)


def test_workers_racing_on_a_new_sqlite_study(tmp_path: Path) -> None:
    urls = [f"sqlite:///{tmp_path / f'round{i}' / 'optuna.db'}" for i in range(ROUNDS)]
    assert _race(urls) == []
    for url in urls:
        _check_study(url)


@pytest.mark.postgres
def test_workers_racing_on_a_new_postgres_study(postgres_url: str) -> None:
    import sqlalchemy as sa

    admin = sa.create_engine(postgres_url, isolation_level="AUTOCOMMIT")
    names = [f"visionops_race_{i}" for i in range(ROUNDS)]
    with admin.connect() as conn:
        for name in names:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
            conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    urls = [
        sa.make_url(postgres_url).set(database=n).render_as_string(hide_password=False)
        for n in names
    ]
    try:
        assert _race(urls) == []
        for url in urls:
            _check_study(url)
    finally:
        with admin.connect() as conn:
            for name in names:
                conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()
