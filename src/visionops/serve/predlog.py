"""The prediction log: every served prediction, for monitoring, drift checks and audits.

Rows go through SQLAlchemy Core, so the default SQLite file (WAL mode, busy timeout) and
a PostgreSQL URL (``VISIONOPS_PREDLOG_URL``) work unchanged, also with several server
processes writing to one SQLite file. Requests never wait for the database:
:meth:`PredictionLog.submit` queues one :class:`PredictionBatch` per request (NumPy
arrays, nothing encoded yet) and a background thread turns whatever is queued into
columns in one vectorised pass (:func:`batch_columns`) and inserts them in one
transaction, as tuples straight to the driver's ``executemany`` (sqlite3, psycopg) with
each column type's SQLAlchemy bind processor applied; :meth:`PredictionLog.close` drains
the queue, so a graceful shutdown loses no row.

Array columns are binary, little-endian and C-ordered:

- ``embedding``: float32 ``(D,)`` — ``np.frombuffer(value, "<f4")`` (D = bytes / 4);
- ``input_pixels``: the model-sized input the model scored, uint8 ``(H, W, C)`` with ink
  high (MNIST convention) — ``np.frombuffer(value, np.uint8).reshape(H, W, C)`` where
  ``input_shape`` is the text ``"HxWxC"`` (e.g. ``"28x28x1"``).

:func:`decode_embedding` and :func:`decode_pixels` do exactly that (and also read the
JSON-text embeddings of logs written before the columns became binary).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import sqlalchemy as sa
from sqlalchemy.engine import Engine, make_url

from visionops.config import database_url
from visionops.errors import ConfigError, DataError
from visionops.monitor.stats import (
    INK_THRESHOLD,
    LOGGED_STATS,
    logged_statistics,
    stroke_thickness,
)

log = logging.getLogger(__name__)

metadata = sa.MetaData()
predictions_table = sa.Table(
    "predictions",
    metadata,
    sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), primary_key=True),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, index=True),
    sa.Column("request_id", sa.String(64), nullable=False, index=True),
    sa.Column("input_index", sa.Integer, nullable=False),
    sa.Column("model_name", sa.String(200), nullable=False),
    sa.Column("model_version", sa.String(64), nullable=True, index=True),
    sa.Column("model_alias", sa.String(64), nullable=True),
    sa.Column("label", sa.String(200), nullable=False),
    sa.Column("class_index", sa.Integer, nullable=False),
    sa.Column("confidence", sa.Float, nullable=False),
    sa.Column("accepted", sa.Boolean, nullable=False),
    sa.Column("probabilities", sa.Text, nullable=False),  # JSON {label: p}
    sa.Column("mean_intensity", sa.Float, nullable=False),
    sa.Column("ink_fraction", sa.Float, nullable=False),
    sa.Column("bbox_width", sa.Integer, nullable=False),
    sa.Column("bbox_height", sa.Integer, nullable=False),
    sa.Column("center_x", sa.Float, nullable=False),
    sa.Column("center_y", sa.Float, nullable=False),
    sa.Column("embedding", sa.LargeBinary, nullable=False),  # float32 (D,), little-endian
    # For the monitor (visionops.monitor.stats); NULL when it cannot be computed.
    sa.Column("stroke_thickness", sa.Float, nullable=True),
    sa.Column("input_pixels", sa.LargeBinary, nullable=True),  # uint8 (H, W, C), ink high
    sa.Column("input_shape", sa.String(32), nullable=True),  # "HxWxC" of input_pixels
    # Why the prediction was not accepted (visionops.ood.REASONS; NULL: accepted) and the
    # OOD score (NULL: the model has no OOD calibration).
    sa.Column("reason", sa.String(32), nullable=True),
    sa.Column("ood_score", sa.Float, nullable=True),
    # The uploaded picture's size before preprocessing (pixels; NULL: not an upload or
    # logged by an older server): the monitor's original_width/height/aspect.
    sa.Column("original_width", sa.Integer, nullable=True),
    sa.Column("original_height", sa.Integer, nullable=True),
    # The upload's file format (Pillow's name: PNG, JPEG, ...); NULL for JSON instances.
    sa.Column("original_format", sa.String(16), nullable=True),
)


@dataclass(frozen=True)
class InputStats:
    """Cheap statistics of one model input, comparable with the training data's."""

    mean_intensity: float  # mean of the uint8 pixels / 255 (ink is high)
    ink_fraction: float  # share of pixels >= INK_THRESHOLD
    bbox_width: int  # pixels spanned by ink, 0 for an empty image
    bbox_height: int
    center_x: float  # intensity-weighted centre of mass in [0, 1]; 0.5 when empty
    center_y: float


def input_statistics(x: np.ndarray) -> InputStats:
    """Statistics of a uint8 ``(H, W)`` or ``(H, W, C)`` image with ink high (MNIST style).

    The definition; the server computes the same values for a whole batch at once with
    :func:`visionops.monitor.stats.logged_statistics` (a unit test holds them equal).
    """
    a = np.asarray(x, dtype=np.float32)
    if a.ndim == 3:
        a = a.mean(axis=2)
    if a.ndim != 2 or a.size == 0:
        raise ValueError(f"expected an (H, W[, C]) image, got shape {np.shape(x)}")
    h, w = a.shape
    ink = a >= INK_THRESHOLD
    rows, cols = np.flatnonzero(ink.any(axis=1)), np.flatnonzero(ink.any(axis=0))
    bw = int(cols[-1] - cols[0] + 1) if cols.size else 0
    bh = int(rows[-1] - rows[0] + 1) if rows.size else 0
    total = float(a.sum())
    if total > 0:
        cy = float((a.sum(axis=1) * np.arange(h)).sum() / total) / max(h - 1, 1)
        cx = float((a.sum(axis=0) * np.arange(w)).sum() / total) / max(w - 1, 1)
    else:
        cx = cy = 0.5
    return InputStats(
        mean_intensity=float(a.mean() / 255.0),
        ink_fraction=float(ink.mean()),
        bbox_width=bw,
        bbox_height=bh,
        center_x=cx,
        center_y=cy,
    )


# --------------------------------------------------------------------------- codecs


def encode_embedding(v: np.ndarray) -> bytes:
    """A ``(D,)`` embedding as the ``embedding`` column's bytes (float32, little-endian)."""
    return np.ascontiguousarray(v, dtype="<f4").tobytes()


def decode_embedding(value: bytes | str | None) -> np.ndarray | None:
    """The ``embedding`` column back as float32 ``(D,)``; JSON text from older logs too."""
    if value is None:
        return None
    if isinstance(value, str):
        return np.asarray(json.loads(value), dtype=np.float32)
    return np.frombuffer(bytes(value), dtype="<f4").astype(np.float32)


def pixels_shape_text(shape: tuple[int, ...]) -> str:
    """``"HxWxC"`` of a uint8 ``(H, W, C)`` image, the ``input_shape`` column."""
    return "x".join(str(int(d)) for d in shape)


def decode_pixels(value: bytes | None, shape: str | None) -> np.ndarray | None:
    """``input_pixels`` + ``input_shape`` back as the uint8 ``(H, W, C)`` model input.

    None when either is missing; raises :class:`DataError` when they disagree.
    """
    if value is None or not shape:
        return None
    try:
        dims = tuple(int(d) for d in shape.split("x"))
        return np.frombuffer(bytes(value), dtype=np.uint8).reshape(dims)
    except ValueError as exc:
        raise DataError(f"logged input of {len(value)} bytes is not {shape!r} ({exc})") from None


_INT_STATS = frozenset({"bbox_width", "bbox_height"})


@dataclass(frozen=True)
class PredictionBatch:
    """The predictions of one request, as arrays (one row each when written).

    ``pixels`` is the model-sized uint8 input ``(N, H, W, C)`` (ink high) the model
    scored; statistics are computed from it by the writer thread, off the request path.
    """

    created_at: datetime
    request_id: str
    model_name: str
    model_version: str | None
    model_alias: str | None
    classes: tuple[str, ...]
    class_index: np.ndarray  # (N,) int
    confidence: np.ndarray  # (N,) float
    accepted: np.ndarray  # (N,) bool
    probabilities: np.ndarray  # (N, K) float32, columns in the order of ``classes``
    embeddings: np.ndarray  # (N, D) float32
    pixels: np.ndarray  # (N, H, W, C) uint8
    labels: tuple[str, ...] | None = None  # None: classes[class_index]
    first_index: int = 0  # input_index of the first row
    reasons: Sequence[str | None] | None = None  # why not accepted (None: accepted)
    ood_scores: np.ndarray | None = None  # (N,) float; None: no OOD calibration
    original_sizes: np.ndarray | None = None  # (N, 2) int width, height; None: unknown
    original_formats: Sequence[str | None] | None = None  # PNG, JPEG, ...; None: unknown

    def __len__(self) -> int:
        return len(self.class_index)


@dataclass(frozen=True)
class PredictionRecord:
    """One prediction to log (simulators, tests, imports); :meth:`to_batch` for the writer.

    ``pixels`` is the model-sized uint8 input ``(H, W, C)``, ink high.
    """

    created_at: datetime
    request_id: str
    input_index: int
    model_name: str
    model_version: str | None
    model_alias: str | None
    label: str
    class_index: int
    confidence: float
    accepted: bool
    probabilities: dict[str, float]
    embedding: list[float]
    pixels: np.ndarray
    reason: str | None = None  # None: accepted
    ood_score: float | None = None
    original_size: tuple[int, int] | None = None  # width, height of the upload (pixels)
    original_format: str | None = None  # the upload's format (PNG, JPEG, ...)

    def to_batch(self) -> PredictionBatch:
        return PredictionBatch(
            created_at=self.created_at,
            request_id=self.request_id,
            model_name=self.model_name,
            model_version=self.model_version,
            model_alias=self.model_alias,
            classes=tuple(self.probabilities),
            class_index=np.asarray([self.class_index]),
            confidence=np.asarray([self.confidence], dtype=np.float64),
            accepted=np.asarray([self.accepted]),
            probabilities=np.asarray([list(self.probabilities.values())], dtype=np.float64),
            embeddings=np.asarray([self.embedding], dtype=np.float32),
            pixels=np.asarray(self.pixels, dtype=np.uint8)[None],
            labels=(self.label,),
            first_index=self.input_index,
            reasons=(self.reason,),
            ood_scores=None if self.ood_score is None else np.asarray([self.ood_score]),
            original_sizes=None
            if self.original_size is None
            else np.asarray([self.original_size], dtype=np.int64),
            original_formats=(self.original_format,),
        )


def batch_columns(
    batches: list[PredictionBatch],
    stats: dict[str, np.ndarray] | None,
    strokes: np.ndarray | None,
) -> dict[str, list[Any]]:
    """The table columns of ``batches``' rows, in order: column name -> one Python value
    per row. ``stats``/``strokes`` cover every row at once. Built a column at a time
    (``tolist``, list repetition): no per-row dictionary.
    """
    # Every column of the table but the key and the statistics (filled from ``stats``).
    cols: dict[str, list[Any]] = {
        c.name: []
        for c in predictions_table.columns
        if c.name != "id" and c.name not in LOGGED_STATS
    }
    for b in batches:
        n = len(b)
        index = b.class_index.tolist()
        for name, value in (
            ("created_at", b.created_at),
            ("request_id", b.request_id),
            ("model_name", b.model_name),
            ("model_version", b.model_version),
            ("model_alias", b.model_alias),
            ("input_shape", pixels_shape_text(b.pixels.shape[1:])),
        ):
            cols[name] += [value] * n
        cols["input_index"] += range(b.first_index, b.first_index + n)
        cols["label"] += b.labels or [b.classes[k] for k in index]
        cols["class_index"] += index
        cols["confidence"] += b.confidence.tolist()
        cols["accepted"] += b.accepted.tolist()
        classes = b.classes
        cols["probabilities"] += [
            orjson.dumps(dict(zip(classes, p, strict=True))).decode()
            for p in b.probabilities.tolist()
        ]
        cols["embedding"] += [e.tobytes() for e in np.ascontiguousarray(b.embeddings, "<f4")]
        cols["input_pixels"] += [x.tobytes() for x in np.ascontiguousarray(b.pixels, np.uint8)]
        cols["reason"] += list(b.reasons) if b.reasons is not None else [None] * n
        cols["ood_score"] += b.ood_scores.tolist() if b.ood_scores is not None else [None] * n
        if b.original_sizes is not None:
            sizes = b.original_sizes.tolist()
            cols["original_width"] += [w for w, _ in sizes]
            cols["original_height"] += [h for _, h in sizes]
        else:
            cols["original_width"] += [None] * n
            cols["original_height"] += [None] * n
        cols["original_format"] += list(b.original_formats or [None] * n)
    rows = len(cols["created_at"])
    cols["stroke_thickness"] = [None] * rows if strokes is None else strokes.astype(float).tolist()
    # Python ints and floats, one conversion per column instead of one per value.
    for name, values in (stats or {}).items():
        cols[name] = (
            values.astype(np.int64) if name in _INT_STATS else values.astype(float)
        ).tolist()
    return cols


@dataclass(frozen=True)
class _MonitorStats:
    """The monitor's own definitions of the statistics columns (one source of truth)."""

    logged_statistics: Callable[[np.ndarray], dict[str, np.ndarray]]
    stroke_thickness: Callable[[np.ndarray], np.ndarray]

    @classmethod
    def load(cls) -> _MonitorStats:
        return cls(logged_statistics, stroke_thickness)


def safe_url(url: str) -> str:
    """The URL without its password, for messages and logs."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return "<unparseable database URL>"


#: SQLite page size (bytes) of a new prediction log; see :func:`create_predlog_engine`.
SQLITE_PAGE_SIZE = 16384


def create_predlog_engine(url: str) -> Engine:
    """An engine for ``url``; SQLite gets WAL, a busy timeout and its folder created.

    PostgreSQL URLs without the psycopg 3 driver are pointed at it
    (:func:`visionops.config.database_url`).
    """
    url = database_url(url)
    try:
        parsed = make_url(url)
    except Exception:
        raise ConfigError(f"invalid prediction-log URL {url!r}") from None
    if parsed.get_backend_name() != "sqlite":
        return sa.create_engine(url, pool_pre_ping=True)
    database = parsed.database
    kwargs: dict[str, Any] = {"connect_args": {"timeout": 30, "check_same_thread": False}}
    if not database or database == ":memory:":
        kwargs["poolclass"] = sa.pool.StaticPool  # one shared in-memory database
    else:
        Path(database).parent.mkdir(parents=True, exist_ok=True)
    engine = sa.create_engine(url, **kwargs)

    @sa.event.listens_for(engine, "connect")
    def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
        cur = dbapi_conn.cursor()
        # Pages of 16 KiB for a new file (an existing one keeps its own): a row is about
        # 2.2 KB (embedding, model input), so a 4 KiB page holds one row and wastes
        # almost half; measured on such rows, inserts cost 13 instead of 22 µs per row.
        cur.execute(f"PRAGMA page_size={SQLITE_PAGE_SIZE}")
        # WAL: readers (monitoring, exports) never block the writer thread and vice versa.
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.close()

    return engine


def add_missing_columns(engine: Engine) -> frozenset[str]:
    """Bring a ``predictions`` table written by an older version up to date.

    Columns of :data:`predictions_table` that are nullable and missing are added with
    ``ALTER TABLE ... ADD COLUMN`` (SQLite and PostgreSQL alike; old rows read NULL).
    Returns the column names the table has afterwards.
    """

    def columns() -> set[str]:
        return {c["name"] for c in sa.inspect(engine).get_columns(predictions_table.name)}

    have = columns()
    quote = engine.dialect.identifier_preparer.quote
    added = []
    for column in predictions_table.columns:
        if column.name in have or not column.nullable:
            continue
        kind = column.type.compile(dialect=engine.dialect)
        ddl = f"ALTER TABLE {quote(predictions_table.name)} ADD COLUMN {quote(column.name)} {kind}"
        try:
            with engine.begin() as conn:
                conn.execute(sa.text(ddl))
            added.append(column.name)
        except sa.exc.SQLAlchemyError:
            # Another server process may have added it a moment ago.
            if column.name not in columns():
                raise
    if added:
        log.info("prediction log: added column(s) %s to an existing table", added)
    return frozenset(columns())


class PredictionLog:
    """Background, batched writer of :class:`PredictionBatch` rows."""

    def __init__(
        self,
        url: str,
        *,
        batch_size: int = 1000,
        max_queue: int = 100_000,
        retries: int = 3,
        monitor_extras: bool = True,
        flush_seconds: float = 0.05,
    ) -> None:
        self.url = url
        # False: leave the optional stroke_thickness column NULL (as older servers did).
        self.monitor_extras = monitor_extras
        self.batch_size = batch_size  # rows per transaction, about
        self.max_queue = max_queue  # rows waiting; past it new rows are dropped and counted
        self.retries = retries
        # The writer wakes this often and writes what is queued: one transaction per
        # interval instead of one per request (a one-row SQLite transaction costs ~1 ms).
        self.flush_seconds = flush_seconds
        # A deque, not a queue.Queue: submitting must not wake the writer thread. Each
        # wake-up made the event loop wait for the GIL (measured: ~2 ms per request);
        # the writer wakes on its own every flush_seconds instead.
        self._queue: deque[PredictionBatch] = deque()
        self._stopping = threading.Event()
        self._engine: Engine | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._stats: _MonitorStats | None = None
        self._table = predictions_table
        self._columns: frozenset[str] = frozenset()
        self._json_embedding = False
        self._inserts: dict[tuple[str, ...], tuple[str, list[Callable[[Any], Any] | None]]] = {}
        self._pending = 0
        self.written = 0
        self.dropped = 0

    def start(self) -> None:
        """Create the table if needed and start the writer thread."""
        if self._thread is not None:
            return
        self._engine = create_predlog_engine(self.url)
        try:
            metadata.create_all(self._engine)
            # A table created by an older version gets the newer nullable columns; any
            # other missing column is left out of the inserts instead of failing them.
            add_missing_columns(self._engine)
            existing = sa.inspect(self._engine).get_columns(predictions_table.name)
        except sa.exc.SQLAlchemyError as exc:
            self._engine.dispose()
            self._engine = None
            raise DataError(f"cannot open the prediction log {safe_url(self.url)}: {exc}") from None
        self._columns = frozenset(c["name"] for c in existing)
        # Logs created before embeddings became binary keep getting JSON text there.
        self._json_embedding = any(
            c["name"] == "embedding" and not isinstance(c["type"], sa.LargeBinary) for c in existing
        )
        missing = {c.name for c in predictions_table.columns} - self._columns
        if missing:
            log.warning("prediction log table lacks columns %s: not logged", sorted(missing))
        self._stats = _MonitorStats.load()
        self._table = predictions_table
        if self._json_embedding:
            self._table = sa.Table(
                predictions_table.name,
                sa.MetaData(),
                *(
                    sa.Column("embedding", sa.Text, nullable=False)
                    if c.name == "embedding"
                    else c._copy()
                    for c in predictions_table.columns
                ),
            )
        self._thread = threading.Thread(target=self._run, name="predlog-writer", daemon=True)
        self._thread.start()
        log.info("prediction log at %s", safe_url(self.url))

    @property
    def pending(self) -> int:
        """Rows queued and not yet written."""
        return self._pending

    def submit(self, batch: PredictionBatch | Iterable[PredictionBatch | PredictionRecord]) -> None:
        """Queue rows for writing; never blocks (past ``max_queue`` rows: dropped, counted)."""
        for item in [batch] if isinstance(batch, PredictionBatch) else batch:
            b = item.to_batch() if isinstance(item, PredictionRecord) else item
            n = len(b)
            with self._lock:
                if self._pending + n > self.max_queue:
                    self.dropped += n
                    log.warning("prediction log queue full: dropped %d row(s)", n)
                    continue
                self._pending += n
            self._queue.append(b)

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every queued row has been written (or given up on); False on timeout."""
        if self._thread is None:
            return self._pending == 0
        with self._idle:
            return self._idle.wait_for(lambda: self._pending == 0, timeout)

    def close(self) -> None:
        """Write everything still queued, then stop the thread and release the database."""
        if self._thread is not None:
            self._stopping.set()
            self._thread.join()
            self._thread = None
            self._stopping.clear()
        if self._engine is not None:
            self._engine.dispose()
            self._engine = None
        log.info("prediction log closed: %d rows written, %d dropped", self.written, self.dropped)

    def _run(self) -> None:
        while True:
            stopping = self._stopping.wait(self.flush_seconds)
            while self._queue:
                batches, rows = [], 0
                while self._queue and rows < self.batch_size:
                    batches.append(self._queue.popleft())
                    rows += len(batches[-1])
                self._write_batches(batches)
            if stopping:
                return

    def _write_batches(self, batches: list[PredictionBatch]) -> None:
        n = sum(len(b) for b in batches)
        try:
            cols = self._columns_of(batches)
        except Exception:  # one odd batch must not stop the writer
            log.exception("prediction log: cannot encode %d row(s)", n)
            self._done(0, n)
            return
        self._write(cols, n)

    def _columns_of(self, batches: list[PredictionBatch]) -> dict[str, list[Any]]:
        """:func:`batch_columns` of ``batches`` with the statistics, restricted to the
        columns the table has."""
        st = self._stats
        assert st is not None
        extras = self.monitor_extras and "stroke_thickness" in self._columns
        groups: dict[tuple[int, ...], list[PredictionBatch]] = {}
        for b in batches:
            groups.setdefault(b.pixels.shape[1:], []).append(b)
        if len(groups) > 1:  # rows keep their order; each shape is one vectorised pass
            parts = [self._columns_of([b]) for b in batches]
            return {name: [v for part in parts for v in part[name]] for name in parts[0]}
        pixels = (
            batches[0].pixels if len(batches) == 1 else np.concatenate([b.pixels for b in batches])
        )
        stats = st.logged_statistics(pixels)
        strokes = st.stroke_thickness(pixels) if extras else None
        cols = batch_columns(batches, stats, strokes)
        if self._json_embedding:
            cols["embedding"] = [
                json.dumps(np.frombuffer(e, "<f4").tolist()) for e in cols["embedding"]
            ]
        return {name: values for name, values in cols.items() if name in self._columns}

    def _insert(
        self, names: tuple[str, ...]
    ) -> tuple[str, list[Callable[[Any], Any] | None]] | None:
        """The driver's own INSERT of the columns ``names`` (``?`` or ``%s`` parameters)
        and each column type's bind processor for this database, built once per column
        set; None for a driver with another parameter style."""
        assert self._engine is not None
        dialect = self._engine.dialect
        mark = {"qmark": "?", "format": "%s", "pyformat": "%s"}.get(dialect.paramstyle)
        if mark is None:
            return None
        found = self._inserts.get(names)
        if found is None:
            prep = dialect.identifier_preparer
            columns = ", ".join(prep.format_column(self._table.c[n]) for n in names)
            sql = (
                f"INSERT INTO {prep.format_table(self._table)} ({columns}) "
                f"VALUES ({', '.join([mark] * len(names))})"
            )
            processors: list[Callable[[Any], Any] | None] = [
                self._table.c[n].type.dialect_impl(dialect).bind_processor(dialect) for n in names
            ]
            found = self._inserts[names] = (sql, processors)
        return found

    def _write(self, cols: dict[str, list[Any]], n: int) -> None:
        """Insert ``n`` rows given as columns in one transaction, retrying on errors.

        Where the driver takes ``?`` or ``%s`` parameters (sqlite3, psycopg) the rows go
        to its ``executemany`` as tuples, each value through its column type's bind
        processor (what SQLAlchemy's insert does, without compiling parameters row by
        row: about a third of the writer's time); other drivers get SQLAlchemy's insert.
        """
        assert self._engine is not None
        names = tuple(cols)
        direct = self._insert(names)
        if direct is not None:
            sql, processors = direct
            values = [
                cols[name] if p is None else [None if v is None else p(v) for v in cols[name]]
                for name, p in zip(names, processors, strict=True)
            ]
            params: list[Any] = list(zip(*values, strict=True))
        else:
            params = [
                dict(zip(names, row, strict=True)) for row in zip(*cols.values(), strict=True)
            ]
        for attempt in range(1, self.retries + 1):
            try:
                with self._engine.begin() as conn:
                    if direct is not None:
                        conn.exec_driver_sql(sql, params)
                    else:
                        conn.execute(self._table.insert(), params)
            except sa.exc.SQLAlchemyError as exc:
                if attempt == self.retries:
                    log.error("prediction log: gave up on %d rows: %s", n, exc)
                    self._done(0, n)
                    return
                log.warning("prediction log write failed (attempt %d): %s", attempt, exc)
                time.sleep(0.2 * attempt)
            else:
                self._done(n, 0)
                return

    def _done(self, written: int, dropped: int) -> None:
        with self._idle:
            self.written += written
            self.dropped += dropped
            self._pending -= written + dropped
            self._idle.notify_all()


def ensure_predlog_table(url: str) -> None:
    """Create the ``predictions`` table at ``url`` if it is missing (idempotent)."""
    engine = create_predlog_engine(url)
    try:
        metadata.create_all(engine)
    except sa.exc.SQLAlchemyError as exc:
        raise DataError(f"cannot open the prediction log {safe_url(url)}: {exc}") from None
    finally:
        engine.dispose()


def now_utc() -> datetime:
    return datetime.now(UTC)


def count_predictions(url: str) -> int:
    """Number of rows in the prediction log at ``url``."""
    engine = create_predlog_engine(url)
    try:
        with engine.connect() as conn:
            return int(
                conn.execute(sa.select(sa.func.count()).select_from(predictions_table)).scalar_one()
            )
    except sa.exc.SQLAlchemyError as exc:
        raise DataError(f"cannot read the prediction log {safe_url(url)}: {exc}") from None
    finally:
        engine.dispose()


def read_predictions(url: str, decode: bool = True) -> Any:
    """The prediction log as a pandas DataFrame, oldest first.

    With ``decode``, ``probabilities`` becomes a dict, ``embedding`` a float32 ``(D,)``
    array and ``input_pixels`` the uint8 ``(H, W, C)`` model input of each row.
    """
    import pandas as pd

    parsed = make_url(url)
    database = parsed.database if parsed.get_backend_name() == "sqlite" else None
    if database not in (None, "", ":memory:") and not Path(str(database)).is_file():
        raise DataError(f"no prediction log at {database}")
    engine = create_predlog_engine(url)
    try:
        with engine.connect() as conn:
            if not sa.inspect(conn).has_table(predictions_table.name):
                raise DataError(f"{safe_url(url)} has no '{predictions_table.name}' table")
            t = sa.Table(predictions_table.name, sa.MetaData(), autoload_with=conn)
            df = pd.read_sql(sa.select(t).order_by(t.c.id), conn)
    except sa.exc.SQLAlchemyError as exc:
        raise DataError(f"cannot read the prediction log {safe_url(url)}: {exc}") from None
    finally:
        engine.dispose()
    if decode and len(df):
        df["probabilities"] = df["probabilities"].map(json.loads)
        df["embedding"] = df["embedding"].map(decode_embedding)
        if "input_pixels" in df and "input_shape" in df:
            df["input_pixels"] = [
                decode_pixels(v, s)
                for v, s in zip(df["input_pixels"], df["input_shape"], strict=True)
            ]
    return df


EXPORT_FORMATS = ("parquet", "csv")


@dataclass(frozen=True)
class ExportResult:
    path: Path
    rows: int
    format: str

    def summary(self) -> dict[str, float]:
        return {"rows": float(self.rows)}

    def describe(self) -> str:
        return f"{self.rows} predictions to {self.path} ({self.format})"


def export_predlog(url: str, out: str | Path, format: str = "parquet") -> ExportResult:
    """Write the whole prediction log to a Parquet or CSV file.

    Parquet keeps ``embedding`` as a list of floats and ``input_pixels`` as bytes; CSV
    writes the embedding as JSON text and leaves ``input_pixels`` out (binary).
    ``probabilities`` stays JSON text in both (class names vary by model).
    """
    if format not in EXPORT_FORMATS:
        raise ConfigError(f"unknown export format {format!r}; choose parquet or csv")
    df = read_predictions(url, decode=False)
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    emb = df["embedding"].map(decode_embedding)
    if format == "parquet":
        df["embedding"] = emb.map(lambda v: None if v is None else v.tolist())
        df.to_parquet(path, index=False)
    else:
        df["embedding"] = emb.map(lambda v: None if v is None else json.dumps(v.tolist()))
        df.drop(columns=[c for c in ("input_pixels",) if c in df]).to_csv(path, index=False)
    return ExportResult(path=path, rows=len(df), format=format)
