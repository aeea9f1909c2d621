"""Ground truth after the fact: true labels for logged predictions, and the accuracy they give.

``POST /v1/feedback`` stores a label for one logged prediction (``request_id`` and the
input's position in that request) in the ``feedback`` table, in the same database as
the prediction log, created on first use. The predicted label and model version are
copied in, so the served model's accuracy on labelled traffic is one query.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from visionops.errors import DataError
from visionops.serve.predlog import now_utc, predictions_table

feedback_metadata = sa.MetaData()
feedback_table = sa.Table(
    "feedback",
    feedback_metadata,
    sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), primary_key=True),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, index=True),
    # predictions.id; no foreign key: the prediction log may be pruned independently.
    sa.Column("prediction_id", sa.BigInteger, nullable=False, unique=True),
    sa.Column("request_id", sa.String(64), nullable=False, index=True),
    sa.Column("input_index", sa.Integer, nullable=False),
    sa.Column("model_version", sa.String(64), nullable=True, index=True),
    sa.Column("label", sa.String(200), nullable=False),  # the true label
    sa.Column("predicted_label", sa.String(200), nullable=False),
    sa.Column("correct", sa.Boolean, nullable=False),
)


class UnknownPredictionError(DataError):
    """No logged prediction has this request id / input index (the API answers 404)."""


class InvalidLabelError(DataError):
    """The label is not one of the classes of the model that answered (the API: 422)."""


@dataclass(frozen=True)
class FeedbackResult:
    request_id: str
    input_index: int
    label: str
    predicted_label: str
    correct: bool
    replaced: bool  # an earlier label for this prediction was overwritten

    def to_dict(self) -> dict[str, Any]:
        return {
            "request_id": self.request_id,
            "input_index": self.input_index,
            "label": self.label,
            "predicted_label": self.predicted_label,
            "correct": self.correct,
            "replaced": self.replaced,
        }


def ensure_feedback_table(bind: Engine | Connection) -> None:
    """Create the ``feedback`` table if it does not exist yet."""
    feedback_metadata.create_all(bind, checkfirst=True)


def record_feedback(
    engine: Engine, request_id: str, label: str, input_index: int | None = None
) -> FeedbackResult:
    """Store the true ``label`` of the prediction ``request_id`` / ``input_index``.

    ``input_index`` may be left out when the request held a single input. Raises
    :class:`UnknownPredictionError` for an unknown request or index and
    :class:`InvalidLabelError` for a label outside the answering model's classes. A
    second label for the same prediction replaces the first.
    """
    label = str(label)
    t = predictions_table
    with engine.begin() as conn:
        if not sa.inspect(conn).has_table(t.name):
            raise UnknownPredictionError(
                f"no prediction with request id {request_id!r} (the log is empty)"
            )
        rows = conn.execute(
            sa.select(t.c.id, t.c.input_index, t.c.label, t.c.probabilities, t.c.model_version)
            .where(t.c.request_id == request_id)
            .order_by(t.c.input_index)
        ).all()
        if not rows:
            raise UnknownPredictionError(f"no prediction with request id {request_id!r}")
        if input_index is None:
            if len(rows) > 1:
                raise InvalidLabelError(
                    f"request {request_id!r} classified {len(rows)} inputs; "
                    "say which with input_index"
                )
            row = rows[0]
        else:
            matches = [r for r in rows if r.input_index == input_index]
            if not matches:
                raise UnknownPredictionError(
                    f"request {request_id!r} has no input_index {input_index} "
                    f"(it has {[r.input_index for r in rows]})"
                )
            row = matches[0]
        try:
            classes = list(json.loads(row.probabilities))
        except (TypeError, ValueError):
            classes = []
        if classes and label not in classes:
            raise InvalidLabelError(
                f"label {label!r} is not a class of the model that answered; "
                f"choose one of {classes}"
            )
        ensure_feedback_table(conn)
        values = {
            "created_at": now_utc(),
            "prediction_id": row.id,
            "request_id": request_id,
            "input_index": row.input_index,
            "model_version": row.model_version,
            "label": label,
            "predicted_label": row.label,
            "correct": label == row.label,
        }
        f = feedback_table
        existing = conn.execute(sa.select(f.c.id).where(f.c.prediction_id == row.id)).first()
        if existing is None:
            conn.execute(f.insert().values(**values))
        else:
            conn.execute(f.update().where(f.c.id == existing.id).values(**values))
    return FeedbackResult(
        request_id=request_id,
        input_index=int(row.input_index),
        label=label,
        predicted_label=str(row.label),
        correct=label == row.label,
        replaced=existing is not None,
    )


@dataclass(frozen=True)
class FeedbackAccuracy:
    """The served model's accuracy on predictions that received a true label."""

    labelled: int
    correct: int
    per_class: dict[str, tuple[int, int]] = field(default_factory=dict)  # label -> (n, correct)
    by_version: dict[str, tuple[int, int]] = field(default_factory=dict)
    first: datetime | None = None
    last: datetime | None = None

    @property
    def accuracy(self) -> float | None:
        return self.correct / self.labelled if self.labelled else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "labelled": self.labelled,
            "correct": self.correct,
            "accuracy": self.accuracy,
            "per_class": {k: {"n": n, "correct": c} for k, (n, c) in self.per_class.items()},
            "by_version": {k: {"n": n, "correct": c} for k, (n, c) in self.by_version.items()},
        }


def feedback_accuracy(engine: Engine, model_version: str | None = None) -> FeedbackAccuracy:
    """Accuracy over every labelled prediction (of ``model_version`` when given)."""
    f = feedback_table
    with engine.connect() as conn:
        if not sa.inspect(conn).has_table(f.name):
            return FeedbackAccuracy(0, 0)
        query = sa.select(f.c.label, f.c.correct, f.c.model_version, f.c.created_at)
        if model_version is not None:
            query = query.where(f.c.model_version == model_version)
        rows = conn.execute(query.order_by(f.c.id)).all()
    n_by, c_by = Counter[str](), Counter[str]()
    n_ver, c_ver = Counter[str](), Counter[str]()
    for r in rows:
        n_by[r.label] += 1
        c_by[r.label] += int(bool(r.correct))
        version = str(r.model_version) if r.model_version is not None else "unversioned"
        n_ver[version] += 1
        c_ver[version] += int(bool(r.correct))
    times = [r.created_at for r in rows]
    return FeedbackAccuracy(
        labelled=len(rows),
        correct=sum(c_by.values()),
        per_class={k: (n_by[k], c_by[k]) for k in sorted(n_by)},
        by_version={k: (n_ver[k], c_ver[k]) for k in sorted(n_ver)},
        first=min(times) if times else None,
        last=max(times) if times else None,
    )


def feedback_counts(engine: Engine, prediction_ids: Any) -> tuple[int, int]:
    """``(labelled, correct)`` over the predictions whose row ids are ``prediction_ids``.

    ``(0, 0)`` when nothing was labelled (or there is no feedback table yet).
    """
    import numpy as np

    ids = np.asarray(prediction_ids, dtype=np.int64)
    if ids.size == 0:
        return 0, 0
    f = feedback_table
    with engine.connect() as conn:
        if not sa.inspect(conn).has_table(f.name):
            return 0, 0
        rows = conn.execute(
            sa.select(f.c.prediction_id, f.c.correct).where(
                f.c.prediction_id.between(int(ids.min()), int(ids.max()))
            )
        ).all()
    wanted = set(ids.tolist())
    hits = [bool(r.correct) for r in rows if int(r.prediction_id) in wanted]
    return len(hits), sum(hits)


@dataclass(frozen=True)
class FeedbackExportResult:
    """What ``visionops feedback export`` wrote."""

    path: Path
    written: int
    per_class: dict[str, int]
    without_pixels: int  # labelled rows logged without their input (an older server)

    def summary(self) -> dict[str, float]:
        return {"written": float(self.written), "without_pixels": float(self.without_pixels)}

    def describe(self) -> str:
        classes = ", ".join(f"{k}: {v}" for k, v in self.per_class.items()) or "none"
        skipped = (
            f"; {self.without_pixels} labelled row(s) have no logged input"
            if self.without_pixels
            else ""
        )
        return f"{self.written} labelled input(s) to {self.path} ({classes}){skipped}"


def _safe_class_folder(label: str) -> str:
    if not label or label in (".", "..") or "/" in label or "\\" in label or "\0" in label:
        raise DataError(f"class name {label!r} cannot be a folder name; rename the class")
    return label


def export_feedback_images(
    url: str, out: str | Path, *, model_version: str | None = None
) -> FeedbackExportResult:
    """Write every labelled, logged input as ``out/<true label>/fb-<prediction id>.png``.

    The image is the model-sized input the server scored (``input_pixels``: uint8
    H×W×C, ink high), so ingesting the folder with the same preprocessing gives the same
    pixels back. ``model_version`` keeps one version's predictions. Existing files are
    overwritten (same prediction, same name), nothing else in ``out`` is touched. Raises
    :class:`DataError` when the log cannot be read or holds no labelled prediction.
    """
    from PIL import Image

    from visionops.serve.predlog import create_predlog_engine, decode_pixels, safe_url

    engine = create_predlog_engine(url)
    p, f = predictions_table, feedback_table
    try:
        with engine.connect() as conn:
            inspector = sa.inspect(conn)
            if not inspector.has_table(f.name) or not inspector.has_table(p.name):
                raise DataError(f"{safe_url(url)} holds no feedback yet (POST /v1/feedback)")
            columns = {c["name"] for c in inspector.get_columns(p.name)}
            if "input_pixels" not in columns:
                raise DataError(
                    f"{safe_url(url)}: the prediction log has no input_pixels column "
                    "(written by an older server); serve with this version to log inputs"
                )
            query = (
                sa.select(f.c.prediction_id, f.c.label, p.c.input_pixels, p.c.input_shape)
                .join(p, p.c.id == f.c.prediction_id)
                .order_by(f.c.prediction_id)
            )
            if model_version is not None:
                query = query.where(f.c.model_version == model_version)
            rows = conn.execute(query).all()
    except sa.exc.SQLAlchemyError as exc:
        raise DataError(f"cannot read the prediction log {safe_url(url)}: {exc}") from None
    finally:
        engine.dispose()
    if not rows:
        which = f" of model version {model_version}" if model_version else ""
        raise DataError(f"no labelled prediction{which} in {safe_url(url)}")
    root = Path(out)
    per_class: Counter[str] = Counter()
    missing = 0
    for row in rows:
        try:
            pixels = decode_pixels(row.input_pixels, row.input_shape)
        except DataError:  # a damaged row: skipped and counted, not fatal
            pixels = None
        if pixels is None:
            missing += 1
            continue
        folder = root / _safe_class_folder(str(row.label))
        folder.mkdir(parents=True, exist_ok=True)
        image = Image.fromarray(pixels[:, :, 0] if pixels.shape[2] == 1 else pixels)
        image.save(folder / f"fb-{int(row.prediction_id)}.png")
        per_class[str(row.label)] += 1
    return FeedbackExportResult(
        path=root,
        written=sum(per_class.values()),
        per_class=dict(sorted(per_class.items())),
        without_pixels=missing,
    )
