"""The prediction log: every served prediction, for monitoring, drift checks and audits.

Rows go through SQLAlchemy Core, so the default SQLite file (WAL mode) and a
PostgreSQL URL (``VISIONOPS_PREDLOG_URL``) work unchanged. Requests never wait for the
database: :meth:`PredictionLog.submit` puts records on a queue and a background thread
writes them in batches; :meth:`PredictionLog.close` drains the queue, so a graceful
shutdown loses no row.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import sqlalchemy as sa
from sqlalchemy.engine import Engine, make_url

from visionops.config import database_url
from visionops.errors import ConfigError, DataError

log = logging.getLogger(__name__)

INK_THRESHOLD = 128  # uint8: a pixel at least half-way to full ink counts as ink

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
    sa.Column("embedding", sa.Text, nullable=False),  # JSON list of floats
    # For the monitor (visionops.monitor.stats); NULL when it cannot be computed.
    sa.Column("stroke_thickness", sa.Float, nullable=True),
    sa.Column("thumbnail", sa.Text, nullable=True),  # base64 PNG of the model-sized input
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
    """Statistics of a uint8 ``(H, W)`` or ``(H, W, C)`` image with ink high (MNIST style)."""
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


@dataclass(frozen=True)
class PredictionRecord:
    """One prediction to log. ``pixels`` is the model-sized uint8 input (ink high).

    Statistics and the thumbnail are computed from ``pixels`` by the writer thread, off
    the request path.
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

    def to_row(
        self, extras: _MonitorExtras | None = None, stroke: float | None = None
    ) -> dict[str, Any]:
        """The table row: JSON columns encoded, input statistics computed.

        ``stroke`` is this record's stroke thickness when the caller computed it for a
        whole batch at once (one distance-transform pass instead of one per record).
        """
        row = {
            f.name: getattr(self, f.name)
            for f in fields(self)
            if f.name not in ("probabilities", "embedding", "pixels")
        }
        row.update(asdict(input_statistics(self.pixels)))
        row["probabilities"] = json.dumps(self.probabilities)
        row["embedding"] = json.dumps([round(float(v), 6) for v in self.embedding])
        row["stroke_thickness"] = row["thumbnail"] = None
        if extras is not None:
            row["stroke_thickness"] = (
                stroke
                if stroke is not None
                else float(extras.stroke_thickness(self.pixels[None])[0])
            )
            row["thumbnail"] = extras.thumbnail_base64(self.pixels)
        return row


@dataclass(frozen=True)
class _MonitorExtras:
    """The monitor's own definitions of the optional columns (one source of truth)."""

    stroke_thickness: Callable[[np.ndarray], np.ndarray]
    thumbnail_base64: Callable[[np.ndarray], str]

    @classmethod
    def load(cls) -> _MonitorExtras | None:
        try:  # imported late: visionops.monitor.stats itself imports this module
            from visionops.monitor.stats import stroke_thickness, thumbnail_base64
        except ImportError as exc:
            log.warning("prediction log: no stroke_thickness/thumbnail columns (%s)", exc)
            return None
        return cls(stroke_thickness, thumbnail_base64)


def safe_url(url: str) -> str:
    """The URL without its password, for messages and logs."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return "<unparseable database URL>"


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
        # WAL: readers (monitoring, exports) never block the writer thread and vice versa.
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.close()

    return engine


_STOP = object()


class PredictionLog:
    """Background, batched writer of :class:`PredictionRecord` rows."""

    def __init__(
        self,
        url: str,
        *,
        batch_size: int = 500,
        max_queue: int = 100_000,
        retries: int = 3,
        monitor_extras: bool = True,
    ) -> None:
        self.url = url
        self.monitor_extras = monitor_extras
        self.batch_size = batch_size
        self.retries = retries
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=max_queue)
        self._engine: Engine | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._extras: _MonitorExtras | None = None
        self._columns: frozenset[str] = frozenset()
        self.written = 0
        self.dropped = 0

    def start(self) -> None:
        """Create the table if needed and start the writer thread."""
        if self._thread is not None:
            return
        self._engine = create_predlog_engine(self.url)
        try:
            metadata.create_all(self._engine)
            # A table created by an older version may lack newer columns: write only
            # the columns it has instead of failing every insert.
            existing = sa.inspect(self._engine).get_columns(predictions_table.name)
            self._columns = frozenset(c["name"] for c in existing)
        except sa.exc.SQLAlchemyError as exc:
            self._engine.dispose()
            self._engine = None
            raise DataError(f"cannot open the prediction log {safe_url(self.url)}: {exc}") from None
        missing = {c.name for c in predictions_table.columns} - self._columns
        if missing:
            log.warning("prediction log table lacks columns %s: not logged", sorted(missing))
        self._extras = _MonitorExtras.load() if self.monitor_extras else None
        self._thread = threading.Thread(target=self._run, name="predlog-writer", daemon=True)
        self._thread.start()
        log.info("prediction log at %s", safe_url(self.url))

    @property
    def pending(self) -> int:
        return self._queue.qsize()

    def submit(self, records: Iterable[PredictionRecord]) -> None:
        """Queue records for writing; never blocks (a full queue drops and counts)."""
        for rec in records:
            try:
                self._queue.put_nowait(rec)
            except queue.Full:
                with self._lock:
                    self.dropped += 1
                log.warning("prediction log queue full: dropped a row (%d so far)", self.dropped)

    def flush(self) -> None:
        """Block until every queued record has been written (or given up on)."""
        if self._thread is not None:
            self._queue.join()

    def close(self) -> None:
        """Write everything still queued, then stop the thread and release the database."""
        if self._thread is not None:
            self._queue.put(_STOP)
            self._thread.join()
            self._thread = None
        if self._engine is not None:
            self._engine.dispose()
            self._engine = None
        log.info("prediction log closed: %d rows written, %d dropped", self.written, self.dropped)

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            items = [item]
            while item is not _STOP and len(items) < self.batch_size:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                items.append(item)
            records = [i for i in items if i is not _STOP]
            strokes = self._batch_strokes(records)
            rows = [row for row in map(self._to_row, records, strokes) if row is not None]
            if rows:
                self._write(rows)
            for _ in items:
                self._queue.task_done()
            if len(records) != len(items):
                return

    def _batch_strokes(self, records: list[PredictionRecord]) -> list[float | None]:
        """Stroke thickness of every record in one vectorised call (same-shaped inputs)."""
        none: list[float | None] = [None] * len(records)
        if self._extras is None or not records:
            return none
        shapes = {r.pixels.shape for r in records}
        if len(shapes) != 1:
            return none
        try:
            values = self._extras.stroke_thickness(np.stack([r.pixels for r in records]))
        except Exception:  # fall back to one record at a time in to_row
            log.exception("prediction log: batched stroke thickness failed")
            return none
        return [float(v) for v in values]

    def _to_row(
        self, record: PredictionRecord, stroke: float | None = None
    ) -> dict[str, Any] | None:
        try:
            row = record.to_row(self._extras, stroke)
        except Exception:  # one odd record must not stop the writer
            log.exception("prediction log: cannot encode a record of %s", record.request_id)
            with self._lock:
                self.dropped += 1
            return None
        return {k: v for k, v in row.items() if k in self._columns}

    def _write(self, rows: list[dict[str, Any]]) -> None:
        assert self._engine is not None
        for attempt in range(1, self.retries + 1):
            try:
                with self._engine.begin() as conn:
                    conn.execute(predictions_table.insert(), rows)
            except sa.exc.SQLAlchemyError as exc:
                if attempt == self.retries:
                    with self._lock:
                        self.dropped += len(rows)
                    log.error("prediction log: gave up on %d rows: %s", len(rows), exc)
                    return
                log.warning("prediction log write failed (attempt %d): %s", attempt, exc)
                time.sleep(0.2 * attempt)
            else:
                with self._lock:
                    self.written += len(rows)
                return


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

    With ``decode`` the JSON columns become Python objects: ``probabilities`` a dict and
    ``embedding`` a float32 array per row.
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
            df = pd.read_sql(sa.select(predictions_table).order_by(predictions_table.c.id), conn)
    except sa.exc.SQLAlchemyError as exc:
        raise DataError(f"cannot read the prediction log {safe_url(url)}: {exc}") from None
    finally:
        engine.dispose()
    if decode and len(df):
        df["probabilities"] = df["probabilities"].map(json.loads)
        df["embedding"] = df["embedding"].map(lambda s: np.asarray(json.loads(s), np.float32))
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

    Parquet keeps ``embedding`` as a list of floats; CSV keeps both JSON columns as
    JSON text. ``probabilities`` stays JSON text in both (class names vary by model).
    """
    if format not in EXPORT_FORMATS:
        raise ConfigError(f"unknown export format {format!r}; choose parquet or csv")
    df = read_predictions(url, decode=False)
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    if format == "parquet":
        df["embedding"] = df["embedding"].map(json.loads)
        df.to_parquet(path, index=False)
    else:
        df.to_csv(path, index=False)
    return ExportResult(path=path, rows=len(df), format=format)
