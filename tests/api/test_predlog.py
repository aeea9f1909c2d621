"""The prediction log: statistics, batched background writes, drain on shutdown, export."""

from __future__ import annotations

import json
import sqlite3
import uuid
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import sqlalchemy as sa
from serve_fixtures import digit_png

from conftest import MakeClient
from visionops.errors import ConfigError, DataError
from visionops.monitor.stats import logged_statistics, stroke_thickness
from visionops.monitor.window import load_window
from visionops.serve.predlog import (
    SQLITE_PAGE_SIZE,
    InputStats,
    PredictionBatch,
    PredictionLog,
    PredictionRecord,
    batch_columns,
    count_predictions,
    export_predlog,
    input_statistics,
    now_utc,
    predictions_table,
    read_predictions,
)

BAR = np.zeros((28, 28, 1), np.uint8)
BAR[4:24, 12:16] = 255  # a 4-pixel-wide vertical bar


def record(i: int, request_id: str = "req") -> PredictionRecord:
    return PredictionRecord(
        created_at=now_utc(),
        request_id=request_id,
        input_index=i,
        model_name="m",
        model_version="3",
        model_alias="champion",
        label=str(i % 10),
        class_index=i % 10,
        confidence=0.5,
        accepted=False,
        probabilities={"0": 0.5, "1": 0.5},
        embedding=[float(i), 0.25],
        pixels=BAR,
    )


# --------------------------------------------------------------------------- statistics


def test_input_statistics_of_known_images() -> None:
    empty = input_statistics(np.zeros((28, 28, 1), np.uint8))
    assert empty == InputStats(0.0, 0.0, 0, 0, 0.5, 0.5)

    a = np.zeros((10, 20), np.uint8)
    a[2:5, 4:10] = 255  # 3 rows × 6 columns of full ink
    s = input_statistics(a)
    assert s.bbox_height == 3 and s.bbox_width == 6
    assert s.ink_fraction == pytest.approx(18 / 200)
    assert s.mean_intensity == pytest.approx(18 / 200)
    assert s.center_y == pytest.approx(3 / 9)
    assert s.center_x == pytest.approx(6.5 / 19)

    faint = np.full((8, 8), 100, np.uint8)  # grey haze below the ink threshold
    f = input_statistics(faint)
    assert f.ink_fraction == 0 and f.bbox_width == 0
    assert f.mean_intensity == pytest.approx(100 / 255)


def test_input_statistics_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError):
        input_statistics(np.zeros((2, 2, 2, 2), np.uint8))


# --------------------------------------------------------------------------- writer


def test_log_writes_every_row_and_drains_on_close(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'sub' / 'p.db'}"
    plog = PredictionLog(url, batch_size=64)
    plog.start()
    plog.submit(record(i) for i in range(1000))
    plog.close()  # immediately: whatever is still queued must be written now
    assert plog.written == 1000 and plog.dropped == 0
    assert count_predictions(url) == 1000
    df = read_predictions(url)
    assert list(df["input_index"]) == list(range(1000))
    assert df["probabilities"][0] == {"0": 0.5, "1": 0.5}
    np.testing.assert_allclose(df["embedding"][7], [7.0, 0.25])
    assert df["model_alias"][0] == "champion"
    assert (df["bbox_height"][0], df["bbox_width"][0]) == (20, 4)
    assert df["stroke_thickness"][0] == pytest.approx(3.5, abs=0.5)
    # The model-sized input, as binary uint8 H×W×C with its shape beside it.
    assert df["input_shape"][0] == "28x28x1"
    np.testing.assert_array_equal(df["input_pixels"][0], BAR)
    assert df["embedding"][7].dtype == np.float32


def test_table_without_the_optional_columns_still_gets_rows(tmp_path: Path) -> None:
    """A log created before stroke_thickness/input_pixels existed keeps working."""
    db = tmp_path / "old.db"
    kept = [
        c._copy()
        for c in predictions_table.columns
        if c.name not in ("input_pixels", "input_shape", "stroke_thickness")
    ]
    engine = sa.create_engine(f"sqlite:///{db}")
    sa.Table("predictions", sa.MetaData(), *kept).create(engine)
    engine.dispose()
    plog = PredictionLog(f"sqlite:///{db}")
    plog.start()
    plog.submit(record(i) for i in range(5))
    plog.close()
    assert plog.written == 5
    assert count_predictions(f"sqlite:///{db}") == 5


def test_a_log_with_json_text_embeddings_keeps_json(tmp_path: Path) -> None:
    """Logs created when embeddings were JSON text get JSON text; readers read both."""
    db = tmp_path / "old.db"
    columns = [
        sa.Column("embedding", sa.Text, nullable=False) if c.name == "embedding" else c._copy()
        for c in predictions_table.columns
        if c.name not in ("input_pixels", "input_shape")
    ]
    engine = sa.create_engine(f"sqlite:///{db}")
    sa.Table("predictions", sa.MetaData(), *columns).create(engine)
    engine.dispose()
    plog = PredictionLog(f"sqlite:///{db}")
    plog.start()
    plog.submit(record(i) for i in range(3))
    plog.close()
    with sqlite3.connect(db) as conn:
        raw = conn.execute("SELECT embedding FROM predictions ORDER BY id").fetchall()
    assert json.loads(raw[2][0]) == [2.0, 0.25]
    np.testing.assert_allclose(read_predictions(f"sqlite:///{db}")["embedding"][2], [2.0, 0.25])


def test_many_requests_are_written_in_few_transactions(tmp_path: Path) -> None:
    """Rows queued within flush_seconds share one transaction (one per request is slow)."""
    url = f"sqlite:///{tmp_path / 'p.db'}"
    plog = PredictionLog(url, flush_seconds=1.0, batch_size=100)
    plog.start()
    commits: list[int] = []
    assert plog._engine is not None
    sa.event.listen(plog._engine, "commit", lambda conn: commits.append(1))
    plog.submit(record(i) for i in range(250))
    assert plog.flush(timeout=60)
    plog.close()
    assert count_predictions(url) == 250
    assert len(commits) == 3  # 100 + 100 + 50 rows


def test_sqlite_uses_wal_and_large_pages_for_a_new_log(tmp_path: Path) -> None:
    db = tmp_path / "p.db"
    plog = PredictionLog(f"sqlite:///{db}")
    plog.start()
    plog.submit([record(0)])
    plog.close()
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA page_size").fetchone()[0] == SQLITE_PAGE_SIZE == 16384
    # A log created with another page size keeps it and is written to as before.
    old = tmp_path / "old.db"
    with sqlite3.connect(old) as conn:
        conn.execute("PRAGMA page_size=4096")
        conn.execute("PRAGMA journal_mode=WAL")
    predictions_table.metadata.create_all(sa.create_engine(f"sqlite:///{old}"))
    plog = PredictionLog(f"sqlite:///{old}")
    plog.start()
    plog.submit([record(1)])
    plog.close()
    assert plog.written == 1 and count_predictions(f"sqlite:///{old}") == 1
    with sqlite3.connect(old) as conn:
        assert conn.execute("PRAGMA page_size").fetchone()[0] == 4096


def test_submit_does_not_wait_for_a_locked_database(tmp_path: Path) -> None:
    """Requests only enqueue: a database busy with someone else never blocks them."""
    db = tmp_path / "p.db"
    plog = PredictionLog(f"sqlite:///{db}")
    plog.start()
    blocker = sqlite3.connect(db, isolation_level=None)
    blocker.execute("BEGIN EXCLUSIVE")  # nobody else can write until we commit
    try:
        plog.submit(record(i) for i in range(50))  # returns although nothing can be written
        assert plog.written == 0
    finally:
        blocker.execute("COMMIT")
        blocker.close()
    plog.close()
    assert count_predictions(f"sqlite:///{db}") == 50


def test_full_queue_drops_instead_of_blocking(tmp_path: Path) -> None:
    plog = PredictionLog(f"sqlite:///{tmp_path / 'p.db'}", max_queue=10)
    # Not started: nothing consumes the queue.
    plog.submit(record(i) for i in range(15))
    assert plog.dropped == 5 and plog.pending == 10


# --------------------------------------------------------------------------- served


def test_every_served_prediction_is_logged(make_client: MakeClient, predlog_url: str) -> None:
    client = make_client()
    request_ids, served = [], 0
    for n in (1, 3, 2):
        pngs = [digit_png(k) for k in ("zero", "one", "seven")[:n]]
        r = client.post(
            "/v1/predict",
            files=[("files", (f"{i}.png", p, "image/png")) for i, p in enumerate(pngs)],
        )
        assert r.status_code == 200
        request_ids.append(r.headers["x-request-id"])
        served += len(r.json()["predictions"])
        last = r.json()["predictions"]
    r = client.post("/v1/predict", json={"instances": [np.zeros((28, 28)).tolist()]})
    assert r.status_code == 200
    served += 1
    client.post(
        "/v1/predict", content=b"junk", headers={"content-type": "text/plain"}
    )  # not logged

    client.__exit__(None, None, None)  # graceful shutdown drains the log
    df = read_predictions(predlog_url)
    assert len(df) == served == 7
    assert set(df["request_id"][:6]) == set(request_ids)
    third = df[df["request_id"] == request_ids[2]].sort_values("input_index")
    assert list(third["label"]) == [p["label"] for p in last]
    assert list(third["confidence"]) == pytest.approx([p["confidence"] for p in last])
    assert third["probabilities"].iloc[0] == pytest.approx(last[0]["probabilities"])
    assert set(df["model_name"]) == {"tiny-mnist"}
    assert all(len(e) == 16 for e in df["embedding"])
    assert (df["ink_fraction"][:6] > 0).all() and (df["bbox_height"][:6] > 0).all()
    blank = df.iloc[-1]
    assert blank["ink_fraction"] == 0 and blank["mean_intensity"] == 0
    # The server leaves stroke_thickness to the monitor, which reads the logged input.
    assert df["stroke_thickness"].isna().all()
    window = load_window(predlog_url, 7, min_rows=1)
    strokes = window.stats["stroke_thickness"]
    assert strokes[-1] == 0 and (strokes[:6] >= 1).all()
    assert (df["input_shape"] == "28x28x1").all()
    assert all(p.shape == (28, 28, 1) and p.dtype == np.uint8 for p in df["input_pixels"])
    assert df["created_at"].notna().all()


def test_logging_can_be_disabled(make_client: MakeClient, predlog_url: str) -> None:
    client = make_client(predlog_url=None)
    assert (
        client.post(
            "/v1/predict", files=[("files", ("a.png", digit_png(), "image/png"))]
        ).status_code
        == 200
    )
    client.__exit__(None, None, None)
    assert not Path(predlog_url.removeprefix("sqlite:///")).exists()


# --------------------------------------------------------------------------- export


@pytest.mark.parametrize("fmt", ["parquet", "csv"])
def test_export(tmp_path: Path, fmt: str) -> None:
    url = f"sqlite:///{tmp_path / 'p.db'}"
    plog = PredictionLog(url)
    plog.start()
    plog.submit(record(i, request_id=f"r{i}") for i in range(12))
    plog.close()
    out = tmp_path / "exports" / f"predictions.{fmt}"
    result = export_predlog(url, out, format=fmt)
    assert result.rows == 12 and out.is_file()
    assert "12 predictions" in result.describe()
    df = pd.read_parquet(out) if fmt == "parquet" else pd.read_csv(out)
    assert len(df) == 12
    assert list(df["request_id"]) == [f"r{i}" for i in range(12)]
    if fmt == "parquet":
        assert list(df["embedding"][3]) == [3.0, 0.25]
    else:
        assert json.loads(df["embedding"][3]) == [3.0, 0.25]
    assert json.loads(df["probabilities"][0]) == {"0": 0.5, "1": 0.5}


def test_export_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no prediction log"):
        export_predlog(f"sqlite:///{tmp_path / 'missing.db'}", tmp_path / "x.parquet")
    with pytest.raises(ConfigError, match="unknown export format"):
        export_predlog(f"sqlite:///{tmp_path / 'p.db'}", tmp_path / "x.xlsx", format="xlsx")
    sqlite3.connect(tmp_path / "other.db").execute("CREATE TABLE t (x)").connection.close()
    with pytest.raises(DataError, match="no 'predictions' table"):
        export_predlog(f"sqlite:///{tmp_path / 'other.db'}", tmp_path / "x.csv", format="csv")


# --------------------------------------------------------------------------- postgres


@pytest.mark.postgres
def test_postgres_log_and_export(
    postgres_url: str, make_client: MakeClient, tmp_path: Path
) -> None:
    engine = sa.create_engine(postgres_url)
    with engine.begin() as conn:
        conn.execute(sa.text("DROP TABLE IF EXISTS predictions"))
    engine.dispose()

    client = make_client(predlog_url=postgres_url)
    files = [
        ("files", (f"{i}.png", digit_png(k), "image/png")) for i, k in enumerate(("zero", "one"))
    ]
    for _ in range(3):
        assert client.post("/v1/predict", files=files).status_code == 200
    client.__exit__(None, None, None)
    assert count_predictions(postgres_url) == 6
    df = read_predictions(postgres_url)
    assert all(len(e) == 16 for e in df["embedding"])
    result = export_predlog(postgres_url, tmp_path / "pg.parquet")
    assert result.rows == 6


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_writer_stores_what_sqlalchemy_inserts_store(
    backend: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """The writer hands rows to the driver's executemany itself; every value lands as
    SQLAlchemy's own insert of the same rows stores it (dates, booleans, bytes, NULLs)."""
    if backend == "sqlite":
        url_a, url_b = (f"sqlite:///{tmp_path / name}" for name in ("a.db", "b.db"))
    else:
        url_a = url_b = request.getfixturevalue("postgres_url")
    rng = np.random.default_rng(3)
    pixels = rng.integers(0, 256, (3, 28, 28, 1), dtype=np.uint8)
    request_id = f"writer-{uuid.uuid4().hex}"  # unique even in a reused database
    batch = PredictionBatch(
        created_at=now_utc(),
        request_id=request_id,
        model_name="m",
        model_version="3",
        model_alias=None,
        classes=("a", "b"),
        class_index=np.array([0, 1, 1]),
        confidence=np.array([0.9, 0.6, 0.55]),
        accepted=np.array([True, False, False]),
        probabilities=np.array([[0.9, 0.1], [0.4, 0.6], [0.45, 0.55]], np.float32),
        embeddings=rng.normal(size=(3, 4)).astype(np.float32),
        pixels=pixels,
        first_index=2,
        reasons=(None, "low_confidence", "out_of_distribution"),
        ood_scores=np.array([0.1, 0.2, 0.9]),
        original_sizes=np.array([[280, 280], [28, 28], [640, 480]]),
        original_formats=("PNG", None, "JPEG"),
    )
    log = PredictionLog(url_a)
    log.start()
    log.submit(batch)
    log.close()
    assert log.written == 3 and log.dropped == 0

    engine = sa.create_engine(url_b)
    predictions_table.metadata.create_all(engine)
    cols = batch_columns([batch], logged_statistics(pixels), stroke_thickness(pixels))
    rows = [dict(zip(cols, values, strict=True)) for values in zip(*cols.values(), strict=True)]
    mine = sa.text("SELECT * FROM predictions WHERE request_id = :r ORDER BY id")
    with engine.begin() as conn:
        conn.execute(predictions_table.insert(), rows)
        stored = conn.execute(mine, {"r": request_id}).all()
    engine.dispose()
    if backend == "sqlite":
        assert len(stored) == 3
        with sqlite3.connect(tmp_path / "a.db") as raw:
            written = raw.execute(
                "SELECT * FROM predictions WHERE request_id = ? ORDER BY id", (request_id,)
            ).fetchall()
        inserted = stored
    else:  # one database: the writer's rows first, then SQLAlchemy's
        assert len(stored) == 6
        written, inserted = stored[:3], stored[3:]
    # Every column but the id is stored identically.
    assert [tuple(r)[1:] for r in written] == [tuple(r)[1:] for r in inserted]
    back = read_predictions(url_a)
    back = back[back["request_id"] == request_id].sort_values("id").head(3)
    assert back["accepted"].tolist() == [True, False, False]
    assert back["reason"].tolist()[1:] == ["low_confidence", "out_of_distribution"]
    assert back["original_format"].tolist()[0] == "PNG"
    np.testing.assert_array_equal(np.stack(back["embedding"].tolist()), batch.embeddings)


def test_drivers_with_other_parameter_styles_get_sqlalchemys_insert(tmp_path: Path) -> None:
    """The writer's own INSERT speaks ``?`` and ``%s``; a driver with another style
    (here sqlite3 switched to named parameters) gets SQLAlchemy's insert and the same rows."""
    stored = []
    for name, style in (("direct.db", None), ("named.db", "named")):
        url = f"sqlite:///{tmp_path / name}"
        log = PredictionLog(url)
        log.start()
        if style is not None:
            assert log._engine is not None
            log._engine.dialect.paramstyle = style
            log._engine.dialect.positional = False
        log.submit([record(i, request_id="same") for i in range(3)])
        log.close()
        assert (log.written, log.dropped) == (3, 0)
        assert bool(log._inserts) == (style is None)  # the driver's own INSERT, or not
        with sqlite3.connect(tmp_path / name) as raw:
            stored.append(raw.execute("SELECT * FROM predictions ORDER BY id").fetchall())
    # created_at differs between the two logs (record() stamps now); the rest is equal.
    assert [r[2:] for r in stored[0]] == [r[2:] for r in stored[1]]
