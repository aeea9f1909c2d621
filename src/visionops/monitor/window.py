"""A window of the prediction log: the served traffic that drift is measured on.

:func:`load_window` reads the last ``N`` predictions, or those of a time range, from the
``predictions`` table (:mod:`visionops.serve.predlog`) with SQLAlchemy Core, so SQLite
and PostgreSQL work alike. Optional columns (``stroke_thickness``, the model input
``input_pixels``, or the ``thumbnail`` of older logs) are used when the table has them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import sqlalchemy as sa
from sqlalchemy.engine import Engine, make_url

from visionops.errors import ConfigError, DataError
from visionops.monitor.stats import SIZE_STATS, STAT_NAMES
from visionops.ood import REASONS
from visionops.serve.predlog import (
    create_predlog_engine,
    decode_embedding,
    decode_pixels,
    predictions_table,
    safe_url,
)

log = logging.getLogger(__name__)

#: Fewer rows than this and no test has the power to say anything.
MIN_WINDOW_ROWS = 30
#: Upper bound on the rows one window may hold (memory and time stay bounded).
MAX_WINDOW_ROWS = 200_000
OPTIONAL_COLUMNS = (
    "stroke_thickness",
    "original_width",
    "original_height",
    "original_format",
    "thumbnail",
    "input_pixels",
    "input_shape",
    "accepted",
    "reason",
    "ood_score",
)


class InsufficientDataError(DataError):
    """The window holds too few predictions to test for drift (the API answers 422)."""

    def __init__(self, rows: int, minimum: int, where: str) -> None:
        super().__init__(
            f"only {rows} prediction(s) in {where}; drift needs at least {minimum}: "
            "serve more predictions (e.g. `visionops simulate`) or widen the window"
        )
        self.rows = rows
        self.minimum = minimum


@dataclass(frozen=True)
class Window:
    """Served predictions, oldest first, as arrays."""

    ids: np.ndarray  # int64 row ids of the predictions table
    created_at: list[datetime]  # timezone-aware UTC
    request_ids: list[str]
    input_index: np.ndarray  # int64
    labels: list[str]  # predicted class names
    confidence: np.ndarray  # float64
    stats: dict[str, np.ndarray]  # statistic -> float64 values (NaN: not logged for a row)
    embeddings: np.ndarray = field(repr=False)  # (n_emb, D) float32
    embedding_rows: np.ndarray = field(repr=False)  # row positions the embeddings belong to
    model_versions: tuple[str, ...] = ()
    thumbnails: list[str | None] | None = field(default=None, repr=False)
    #: Whether the server accepted each prediction (confidence at or above its threshold);
    #: None when the log has no such column.
    accepted: np.ndarray | None = field(default=None, repr=False)
    #: Why the server rejected each input (None: not rejected); None without the column.
    reasons: list[str | None] | None = field(default=None, repr=False)
    ood_scores: np.ndarray | None = field(default=None, repr=False)  # float64, NaN: none
    #: Each upload's file format (PNG, JPEG, ...; None: not logged); None without the column.
    formats: list[str | None] | None = field(default=None, repr=False)

    def rejections(self) -> dict[str, int] | None:
        """Predictions not accepted, by reason; None when the log has no reason column."""
        if self.reasons is None:
            return None
        return {r: sum(1 for x in self.reasons if x == r) for r in REASONS}

    @property
    def size(self) -> int:
        return len(self.ids)

    @property
    def start(self) -> datetime | None:
        return self.created_at[0] if self.created_at else None

    @property
    def end(self) -> datetime | None:
        return self.created_at[-1] if self.created_at else None

    def info(self) -> dict[str, Any]:
        return {
            "size": self.size,
            "start": self.start.isoformat() if self.start else None,
            "end": self.end.isoformat() if self.end else None,
            "first_id": int(self.ids[0]) if self.size else None,
            "last_id": int(self.ids[-1]) if self.size else None,
            "model_versions": list(self.model_versions),
            "rejections": self.rejections(),
        }

    def slice(self, start: int, stop: int) -> Window:
        """Rows ``start:stop`` (positions, oldest first) as a window of their own."""
        keep = (self.embedding_rows >= start) & (self.embedding_rows < stop)
        return Window(
            ids=self.ids[start:stop],
            created_at=self.created_at[start:stop],
            request_ids=self.request_ids[start:stop],
            input_index=self.input_index[start:stop],
            labels=self.labels[start:stop],
            confidence=self.confidence[start:stop],
            stats={k: v[start:stop] for k, v in self.stats.items()},
            embeddings=self.embeddings[keep],
            embedding_rows=self.embedding_rows[keep] - start,
            model_versions=self.model_versions,
            thumbnails=None if self.thumbnails is None else self.thumbnails[start:stop],
            accepted=None if self.accepted is None else self.accepted[start:stop],
            reasons=None if self.reasons is None else self.reasons[start:stop],
            ood_scores=None if self.ood_scores is None else self.ood_scores[start:stop],
            formats=None if self.formats is None else self.formats[start:stop],
        )


def _utc(dt: datetime) -> datetime:
    return dt.replace(tzinfo=UTC) if dt.tzinfo is None else dt.astimezone(UTC)


def parse_time(value: str | datetime | None, name: str = "time") -> datetime | None:
    """An ISO 8601 time (naive means UTC) as an aware UTC datetime; None stays None."""
    if value is None or isinstance(value, datetime):
        return None if value is None else _utc(value)
    try:
        return _utc(datetime.fromisoformat(value.strip().replace("Z", "+00:00")))
    except ValueError:
        raise ConfigError(
            f"{name} {value!r} is not an ISO 8601 time (e.g. 2025-01-31T12:00:00Z)"
        ) from None


def _decode_embeddings(values: list[bytes | str | None]) -> tuple[np.ndarray, np.ndarray]:
    """The logged embeddings as one float32 array; rows whose size differs from the
    newest row's (another model answered them) are left out.

    Binary float32 values (:func:`visionops.serve.predlog.decode_embedding`) and the JSON
    text of logs written before the column became binary are both read.
    """
    if not values:
        return np.zeros((0, 0), np.float32), np.zeros(0, np.int64)
    rows: list[np.ndarray | None] = []
    for v in values:
        try:
            rows.append(decode_embedding(v))
        except (ValueError, TypeError):
            rows.append(None)
    sizes = [len(r) if r is not None else -1 for r in rows]
    dim = sizes[-1]
    keep = np.asarray([s == dim and s > 0 for s in sizes])
    if not keep.any():
        return np.zeros((0, 0), np.float32), np.zeros(0, np.int64)
    kept = [r for r, k in zip(rows, keep, strict=True) if k and r is not None]
    if not keep.all():
        log.warning("%d logged embedding(s) of another size left out", int((~keep).sum()))
    return np.stack(kept).astype(np.float32), np.flatnonzero(keep).astype(np.int64)


def _strokes_from_pixels(rows: Any) -> np.ndarray | None:
    """Stroke thickness of every row that logged its model input (NaN for the others).

    The server stores the input (``input_pixels``) and leaves this statistic to the
    monitor: one vectorised pass per input shape here instead of one per request there.
    None when no row has its input.
    """
    from visionops.monitor.stats import stroke_thickness

    out = _from_pixels(rows, lambda pixels: {"stroke_thickness": stroke_thickness(pixels)})
    return None if out is None else out["stroke_thickness"]


def _photo_stats_from_pixels(rows: Any) -> dict[str, np.ndarray] | None:
    """:data:`~visionops.monitor.stats.PHOTO_STATS` of every row that logged its model
    input (NaN for the others), computed here like the stroke thickness; None when no
    row has its input."""
    from visionops.monitor.stats import photo_statistics

    return _from_pixels(rows, photo_statistics)


def _from_pixels(
    rows: Any, compute: Callable[[np.ndarray], dict[str, np.ndarray]]
) -> dict[str, np.ndarray] | None:
    """``compute`` over the logged model inputs, one vectorised call per input shape;
    NaN for rows without an input. None when no row has its input."""
    if not rows or "input_pixels" not in rows[0]:
        return None
    by_shape: dict[str, list[int]] = {}
    for i, r in enumerate(rows):
        if r["input_pixels"] is not None and r.get("input_shape"):
            by_shape.setdefault(r["input_shape"], []).append(i)
    if not by_shape:
        return None
    out: dict[str, np.ndarray] = {}
    for shape, idx in by_shape.items():
        try:
            decoded = [decode_pixels(rows[i]["input_pixels"], shape) for i in idx]
            pixels = np.stack([d for d in decoded if d is not None])
        except (ValueError, DataError):
            log.warning("%d logged input(s) do not match their shape %s", len(idx), shape)
            continue
        for name, values in compute(pixels).items():
            out.setdefault(name, np.full(len(rows), np.nan))[idx] = values
    return out or None


def _sizes(rows: list[Any]) -> dict[str, np.ndarray]:
    """:data:`~visionops.monitor.stats.SIZE_STATS` from the logged ``original_width`` and
    ``original_height`` (NaN where a row has none); empty without the columns."""
    if not rows or "original_width" not in rows[0]:
        return {}
    w = np.asarray([np.nan if r["original_width"] is None else r["original_width"] for r in rows])
    h = np.asarray([np.nan if r["original_height"] is None else r["original_height"] for r in rows])
    if np.isnan(w).all():
        return {}
    with np.errstate(invalid="ignore", divide="ignore"):
        aspect = np.where(h > 0, w / np.where(h > 0, h, 1.0), np.nan)
    return dict(zip(SIZE_STATS, (w, h, aspect), strict=True))


def _thumbnails(rows: list[Any]) -> list[str | None]:
    """Base64 PNGs of the logged model inputs (``input_pixels``), or older ``thumbnail`` text."""
    from visionops.monitor.stats import thumbnail_base64

    out: list[str | None] = []
    for r in rows:
        pixels = decode_pixels(r.get("input_pixels"), r.get("input_shape"))
        out.append(thumbnail_base64(pixels) if pixels is not None else r.get("thumbnail"))
    return out


def _engine_for(url: str) -> Engine:
    try:
        parsed = make_url(url)
    except Exception:
        raise ConfigError(f"invalid prediction-log URL {url!r}") from None
    database = parsed.database
    if (
        parsed.get_backend_name() == "sqlite"
        and database not in (None, "", ":memory:")
        and not Path(str(database)).is_file()
    ):
        raise DataError(f"no prediction log at {parsed.database}")
    return create_predlog_engine(url)


def load_window(
    predlog_url: str,
    window: int | None = None,
    since: str | datetime | None = None,
    until: str | datetime | None = None,
    *,
    model_version: str | None = None,
    min_rows: int = MIN_WINDOW_ROWS,
    max_embeddings: int | None = None,
    thumbnails: bool = False,
    engine: Engine | None = None,
    photos: bool = False,
) -> Window:
    """The last ``window`` predictions, or those logged in ``[since, until)``, oldest first.

    With both, the last ``window`` rows of the time range. ``model_version`` keeps only
    one model version's rows. Only the newest ``max_embeddings`` embeddings are decoded
    (None: all; decoding is most of the cost of a large window); ``thumbnails`` also
    reads the thumbnail column. Raises :class:`InsufficientDataError` below ``min_rows``
    rows, :class:`DataError` when the log cannot be read. ``engine`` reuses an open
    engine (the server's) instead of creating one for ``predlog_url``. ``photos`` (a
    model of photos: metadata ``preprocess.kind`` natural) computes the photo statistics
    and reads the uploaded sizes instead of the digit-only stroke thickness.
    """
    if window is not None and not 1 <= window <= MAX_WINDOW_ROWS:
        raise ConfigError(f"window must be between 1 and {MAX_WINDOW_ROWS} rows (got {window})")
    if window is None and since is None and until is None:
        raise ConfigError("give a window size (last N predictions) or a time range")
    t0, t1 = parse_time(since, "since"), parse_time(until, "until")
    if t0 is not None and t1 is not None and t0 >= t1:
        raise ConfigError(f"since ({t0.isoformat()}) must be before until ({t1.isoformat()})")

    own_engine = engine is None
    eng = engine if engine is not None else _engine_for(predlog_url)
    try:
        with eng.connect() as conn:
            if not sa.inspect(conn).has_table(predictions_table.name):
                raise InsufficientDataError(0, min_rows, f"{safe_url(predlog_url)} (no table)")
            # Reflected, not the server's Table object: a newer server may log extra
            # columns (stroke_thickness, thumbnail) that are used when present.
            t = sa.Table(predictions_table.name, sa.MetaData(), autoload_with=conn)
            optional = [
                c
                for c in OPTIONAL_COLUMNS
                if c in t.c and (thumbnails or c != "thumbnail")  # input_pixels: always
            ]
            columns = [
                t.c[name]
                for name in (
                    "id",
                    "created_at",
                    "request_id",
                    "input_index",
                    "model_version",
                    "label",
                    "confidence",
                    "embedding",
                    *(c for c in STAT_NAMES if c in t.c),
                    *optional,
                )
            ]
            query = sa.select(*columns)
            sqlite = eng.dialect.name == "sqlite"

            def bind(dt: datetime) -> datetime:
                # SQLite stores naive UTC text; PostgreSQL compares aware times.
                return dt.replace(tzinfo=None) if sqlite else dt

            if t0 is not None:
                query = query.where(t.c.created_at >= bind(t0))
            if t1 is not None:
                query = query.where(t.c.created_at < bind(t1))
            if model_version is not None:
                query = query.where(t.c.model_version == model_version)
            query = query.order_by(t.c.id.desc()).limit(window or MAX_WINDOW_ROWS)
            rows = conn.execute(query).mappings().all()
    except sa.exc.SQLAlchemyError as exc:
        raise DataError(f"cannot read the prediction log {safe_url(predlog_url)}: {exc}") from None
    finally:
        if own_engine:
            eng.dispose()

    rows = list(reversed(rows))
    if len(rows) < min_rows:
        where = f"the last {window} predictions" if window else "the predictions"
        if t0 is not None or t1 is not None:
            start = t0.isoformat() if t0 else "the start"
            where += f" logged between {start} and {t1.isoformat() if t1 else 'now'}"
        if model_version is not None:
            where += f" of model version {model_version}"
        raise InsufficientDataError(len(rows), min_rows, f"{where} ({safe_url(predlog_url)})")

    # NaN where a row has no value (stroke_thickness of rows logged by an older server).
    stats = {
        name: np.asarray([np.nan if r[name] is None else r[name] for r in rows], np.float64)
        for name in STAT_NAMES
        if name in rows[0] and any(r[name] is not None for r in rows)
    }
    if photos:
        stats.update(_photo_stats_from_pixels(rows) or {})
        stats.update(_sizes(rows))
    else:
        strokes = _strokes_from_pixels(rows)
        if strokes is not None:
            logged = stats.get("stroke_thickness", np.full(len(rows), np.nan))
            stats["stroke_thickness"] = np.where(np.isnan(logged), strokes, logged)
    first = 0 if max_embeddings is None else max(0, len(rows) - max_embeddings)
    embeddings, emb_rows = _decode_embeddings([r["embedding"] for r in rows[first:]])
    emb_rows += first
    versions = sorted({str(r["model_version"]) for r in rows if r["model_version"] is not None})
    return Window(
        ids=np.asarray([r["id"] for r in rows], dtype=np.int64),
        created_at=[_utc(r["created_at"]) for r in rows],
        request_ids=[str(r["request_id"]) for r in rows],
        input_index=np.asarray([r["input_index"] for r in rows], dtype=np.int64),
        labels=[str(r["label"]) for r in rows],
        confidence=np.asarray([r["confidence"] for r in rows], dtype=np.float64),
        stats=stats,
        embeddings=embeddings,
        embedding_rows=emb_rows,
        model_versions=tuple(versions),
        thumbnails=_thumbnails(rows)
        if thumbnails and ("thumbnail" in optional or "input_pixels" in optional)
        else None,
        accepted=(
            np.asarray([bool(r["accepted"]) for r in rows]) if "accepted" in optional else None
        ),
        reasons=(
            [None if r["reason"] is None else str(r["reason"]) for r in rows]
            if "reason" in optional
            else None
        ),
        ood_scores=(
            np.asarray([np.nan if r["ood_score"] is None else r["ood_score"] for r in rows])
            if "ood_score" in optional
            else None
        ),
        formats=(
            [None if r["original_format"] is None else str(r["original_format"]) for r in rows]
            if "original_format" in optional
            else None
        ),
    )


def window_from_arrays(
    labels: list[str],
    confidence: np.ndarray,
    stats: dict[str, np.ndarray],
    embeddings: np.ndarray,
    created_at: list[datetime] | None = None,
    accepted: np.ndarray | None = None,
    formats: list[str | None] | None = None,
    ood_scores: np.ndarray | None = None,
) -> Window:
    """A window built in memory (benchmarks, tests): rows as the server would log them.

    ``ood_scores`` float ``(N,)`` are the logged ``ood_score`` values (NaN: none).
    """
    n = len(labels)
    now = datetime.now(UTC)
    return Window(
        ids=np.arange(1, n + 1, dtype=np.int64),
        created_at=created_at or [now] * n,
        request_ids=[f"mem-{i}" for i in range(n)],
        input_index=np.zeros(n, np.int64),
        labels=list(labels),
        confidence=np.asarray(confidence, dtype=np.float64),
        stats={k: np.asarray(v, dtype=np.float64) for k, v in stats.items()},
        embeddings=np.asarray(embeddings, dtype=np.float32),
        embedding_rows=np.arange(len(embeddings), dtype=np.int64),
        accepted=None if accepted is None else np.asarray(accepted, dtype=bool),
        formats=None if formats is None else list(formats),
        ood_scores=None if ood_scores is None else np.asarray(ood_scores, dtype=np.float64),
    )
