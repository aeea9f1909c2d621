"""The Optuna study of a tuning search: its storage, sampler and pruner, joined safely.

"Many workers share one study" is how tuning scales, so workers started together on a
fresh storage must not race. :func:`storage_lock` serialises, across processes, the
steps that are not safe to run at once -- creating the storage's tables (Optuna's
``create_all`` and Alembic stamp), creating the study and enqueuing its baseline
trial, recording the study's MLflow parent run: a file lock beside a SQLite database,
a PostgreSQL advisory lock (``pg_advisory_lock``) for PostgreSQL.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import re
import socket
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from visionops.config import ChoiceDim, Params
from visionops.errors import ConfigError

if TYPE_CHECKING:
    import optuna

log = logging.getLogger(__name__)

#: Key of the PostgreSQL advisory lock taken while a worker sets up its study
#: (the first 8 bytes of sha256("visionops.study"), as a signed 64-bit integer).
ADVISORY_LOCK_KEY = int.from_bytes(
    hashlib.sha256(b"visionops.study").digest()[:8], "big", signed=True
)


def display_url(url: str) -> str:
    """``url`` without credentials, for messages and tags."""
    return re.sub(r"//[^/@]+@", "//***@", url)


def _rdb_storage(url: str) -> optuna.storages.RDBStorage:
    import optuna

    engine_kwargs: dict[str, Any] = {}
    if url.startswith("sqlite:///"):
        path = Path(url.removeprefix("sqlite:///"))
        path.parent.mkdir(parents=True, exist_ok=True)
        # Several local workers share the file: wait for its lock instead of failing.
        engine_kwargs["connect_args"] = {"timeout": 60}
    else:
        engine_kwargs["pool_pre_ping"] = True
    try:
        with warnings.catch_warnings():  # heartbeats are marked experimental
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            # Heartbeats: a trial of a worker that died is marked FAILED, not RUNNING forever.
            return optuna.storages.RDBStorage(
                url, engine_kwargs=engine_kwargs, heartbeat_interval=60, grace_period=300
            )
    except Exception as exc:  # SQLAlchemy and driver errors come in many types
        raise ConfigError(f"cannot open tuning storage {display_url(url)}: {exc}") from None


def _sampler(params: Params, seed: int | None) -> optuna.samplers.BaseSampler:
    import optuna

    if params.tune.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(
        seed=seed, n_startup_trials=params.tune.random_trials, constant_liar=True
    )


def _pruner(params: Params) -> optuna.pruners.BasePruner:
    import optuna

    tune = params.tune
    if tune.pruner == "median":
        return optuna.pruners.MedianPruner(
            n_startup_trials=tune.prune_after_trials, n_warmup_steps=tune.prune_after_epochs
        )
    if tune.pruner == "hyperband":
        max_epochs = _max_epochs(params)
        return optuna.pruners.HyperbandPruner(
            min_resource=min(tune.prune_after_epochs, max_epochs), max_resource=max_epochs
        )
    return optuna.pruners.NopPruner()


def _max_epochs(params: Params) -> int:
    dim = params.tune.space.get("epochs")
    if dim is None:
        return params.train.epochs
    if isinstance(dim, ChoiceDim):
        return max(int(c) for c in dim.choices)
    return int(dim.high)


def _sampler_seed(created: bool, trials: Sequence[optuna.trial.FrozenTrial], seed: int) -> int:
    """``seed`` for a new study and for a sequential continuation (plus the trial count);
    a fresh seed for a worker joining while others run, so it does not repeat their draws."""
    from optuna.trial import TrialState

    if created or (trials and not any(t.state == TrialState.RUNNING for t in trials)):
        return seed + len(trials)
    noise = hashlib.blake2b(f"{socket.gethostname()}-{os.getpid()}-{time.time_ns()}".encode())
    return int.from_bytes(noise.digest()[:4], "little")


def open_study(params: Params, name: str, url: str) -> optuna.Study:
    """Create the study in the storage, or join it when it exists (see :func:`join_study`)."""
    import optuna

    storage = _rdb_storage(url)
    direction: Literal["maximize", "minimize"] = (
        "maximize" if params.tune.metric == "val_accuracy" else "minimize"
    )
    created = True
    try:
        optuna.create_study(storage=storage, study_name=name, direction=direction)
    except optuna.exceptions.DuplicatedStudyError:
        created = False
    existing = optuna.load_study(study_name=name, storage=storage)
    if existing.direction.name.lower() != direction:
        raise ConfigError(
            f"study '{name}' in {display_url(url)} is to {existing.direction.name.lower()}, "
            f"but tune.metric={params.tune.metric} needs {direction}: use another --study"
        )
    seed = _sampler_seed(created, existing.get_trials(deepcopy=False), params.seed)
    return optuna.load_study(
        study_name=name, storage=storage, sampler=_sampler(params, seed), pruner=_pruner(params)
    )


@contextmanager
def storage_lock(url: str) -> Iterator[None]:
    """Hold a lock on the tuning storage ``url`` across processes (and machines, for
    PostgreSQL) while the block runs.

    SQLite: ``fcntl.flock`` on ``<database>.lock`` beside the file. PostgreSQL: a
    session advisory lock (key :data:`ADVISORY_LOCK_KEY`) on its own connection. Other
    databases: no lock (a warning is logged).

    Raises:
        ConfigError: the PostgreSQL server cannot be reached.
    """
    if url.startswith("sqlite:///"):
        path = Path(url.removeprefix("sqlite:///"))
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(f"{path}.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing releases the lock
        return
    if not url.startswith("postgresql"):
        log.warning("no lock for %s: start concurrent workers one at a time", display_url(url))
        yield
        return
    import sqlalchemy as sa

    engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
    try:
        try:
            conn = engine.connect()
        except Exception as exc:  # driver errors come in many types
            raise ConfigError(f"cannot open tuning storage {display_url(url)}: {exc}") from None
        with conn:
            conn.execute(sa.text("SELECT pg_advisory_lock(:k)"), {"k": ADVISORY_LOCK_KEY})
            conn.commit()
            try:
                yield
            finally:
                conn.execute(sa.text("SELECT pg_advisory_unlock(:k)"), {"k": ADVISORY_LOCK_KEY})
                conn.commit()
    finally:
        engine.dispose()


def join_study(
    params: Params,
    name: str,
    url: str,
    baseline: Mapping[str, Any] | None = None,
    enqueue: Sequence[Mapping[str, Any]] = (),
) -> optuna.Study:
    """Create or join study ``name`` in ``url``; safe for workers started together.

    Under :func:`storage_lock`: the storage is created if new, the study is created or
    loaded, ``baseline`` (the train params' values) is enqueued once -- only while the
    study has no trial -- and so are the ``enqueue`` values not already there.
    """
    with storage_lock(url):
        study = open_study(params, name, url)
        if baseline is not None and not study.trials:
            study.enqueue_trial(dict(baseline), {"baseline": True}, skip_if_exists=True)
        for values in enqueue:
            study.enqueue_trial(dict(values), skip_if_exists=True)
    return study
