"""`reason` and `ood_score` in the API, the metrics and the prediction log.

The served model is the tiny test CNN with an OOD test calibrated the way the export
calibrates it (bank and validation embeddings of bundled MNIST test images).
"""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient
from PIL import Image
from serve_fixtures import SPEC, digit_png

from visionops.config import ServeParams
from visionops.data.transforms import normalize
from visionops.monitor.simulate import load_mnist_test
from visionops.monitor.window import load_window
from visionops.ood import calibrate
from visionops.serve.app import create_app
from visionops.serve.model import LoadedModel, ResolvedModel, load_model
from visionops.serve.predlog import predictions_table, read_predictions
from visionops.serve.service import ServeSettings

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from nondigits import non_digit_images

FRR = 0.05


@pytest.fixture(scope="module")
def mnist() -> tuple[np.ndarray, np.ndarray]:
    x, y = load_mnist_test()
    return x[:1200].reshape(-1, 28, 28, 1), y[:1200]


@pytest.fixture(scope="module")
def ood_model_dir(
    tiny_model_dir: Path,
    tiny_model: LoadedModel,
    mnist: tuple[np.ndarray, np.ndarray],
    tmp_path_factory: pytest.TempPathFactory,
) -> Path:
    """The tiny model plus ``ood`` metadata and bank (bank: 400 images, val: 600)."""
    folder = tmp_path_factory.mktemp("ood-model") / "exported"
    shutil.copytree(tiny_model_dir, folder)
    x = mnist[0]
    _, emb = tiny_model.run(normalize(x[:1000], SPEC))
    detector = calibrate(emb[:400], emb[400:1000], FRR, k=1, val_pixels=x[400:1000])
    detector.save_bank(folder)
    meta = json.loads((folder / "metadata.json").read_text())
    meta["ood"] = detector.to_metadata()
    (folder / "metadata.json").write_text(json.dumps(meta))
    return folder


def _with_ood(folder: Path, tmp: Path, **change: Any) -> Path:
    """A copy of ``folder`` whose ood entry has ``change`` applied."""
    out = tmp / "changed"
    shutil.copytree(folder, out)
    meta = json.loads((out / "metadata.json").read_text())
    meta["ood"].update(change)
    (out / "metadata.json").write_text(json.dumps(meta))
    return out


@pytest.fixture
def serve(predlog_url: str) -> Iterator[Any]:
    clients: list[TestClient] = []

    def make(folder: Path, confidence_threshold: float = 0.0, **settings: Any) -> TestClient:
        model = load_model(ResolvedModel(folder, None, None, None), threads=1)
        base: dict[str, Any] = {
            "model_uri": str(folder),
            "serve": ServeParams(confidence_threshold=confidence_threshold),
            "predlog_url": predlog_url,
            "threads": 1,
        }
        base.update(settings)
        client = TestClient(create_app(ServeSettings(**base), model=model))
        client.__enter__()
        clients.append(client)
        return client

    yield make
    for c in reversed(clients):
        c.__exit__(None, None, None)


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _files(pngs: list[bytes]) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("files", (f"{i}.png", p, "image/png")) for i, p in enumerate(pngs)]


def _ramp() -> list[list[float]]:
    """A smooth ramp filling a digit-sized box, as a JSON instance (1 = ink)."""
    a = np.zeros((28, 28))
    a[4:24, 8:20] = np.linspace(0.05, 1.0, 12)
    return a.tolist()


def test_blank_inputs_are_no_ink_before_anything_else(
    serve: Any, ood_model_dir: Path, tmp_path: Path
) -> None:
    # Even with a threshold that calls everything out of distribution, a blank is no_ink.
    client = serve(_with_ood(ood_model_dir, tmp_path, threshold=-1.0))
    blanks = [
        _png(Image.new("L", (200, 200), 255)),
        _png(Image.new("RGB", (90, 60), (200, 30, 30))),
        _png(Image.new("RGBA", (64, 64), (0, 0, 0, 0))),
    ]
    r = client.post("/v1/predict", files=_files(blanks))
    assert r.status_code == 200
    for p in r.json()["predictions"]:
        assert p["accepted"] is False and p["reason"] == "no_ink"
        assert isinstance(p["ood_score"], float) and 0.0 <= p["ood_score"] <= 2.0
        assert set(p["probabilities"]) == {str(i) for i in range(10)}  # still answered
    r = client.post("/v1/predict", json={"instances": [np.zeros((28, 28)).tolist()]})
    assert r.json()["predictions"][0]["reason"] == "no_ink"


def test_mnist_digits_are_rejected_at_the_calibrated_rate(
    serve: Any, ood_model_dir: Path, mnist: tuple[np.ndarray, np.ndarray]
) -> None:
    client = serve(ood_model_dir)
    held_out = mnist[0][1000:1200, :, :, 0] / 255.0  # not in the bank nor calibration
    preds = []
    for i in range(0, len(held_out), 50):  # serve.max_files per request
        r = client.post("/v1/predict", json={"instances": held_out[i : i + 50].tolist()})
        assert r.status_code == 200, r.text
        preds += r.json()["predictions"]
    reasons = [p["reason"] for p in preds]
    assert set(reasons) <= {None, "out_of_distribution"}
    # 5 % calibrated; 200 new images: well under 3 binomial standard deviations above.
    assert reasons.count("out_of_distribution") <= 25
    assert all(p["accepted"] == (p["reason"] is None) for p in preds)
    threshold = client.get("/v1/model").json()["ood"]["threshold"]
    for p in preds:
        assert (p["reason"] == "out_of_distribution") == (p["ood_score"] > threshold)


def test_served_scores_come_from_onnx_runtime_and_match_numpy(
    ood_model_dir: Path, mnist: tuple[np.ndarray, np.ndarray]
) -> None:
    model = load_model(ResolvedModel(ood_model_dir, None, None, None), threads=1)
    assert model.ood is not None and model.ood_session is not None
    x = normalize(mnist[0][1000:1016], model.spec)
    _, emb, scores = model.infer(x)
    assert scores is not None and scores.shape == (16,)
    np.testing.assert_allclose(scores, model.ood.score(emb), atol=1e-5)


def test_without_the_onnx_package_the_ood_score_runs_in_numpy(
    ood_model_dir: Path, mnist: tuple[np.ndarray, np.ndarray], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "onnx", None)  # `import onnx` now fails
    model = load_model(ResolvedModel(ood_model_dir, None, None, None), threads=1)
    assert model.ood is not None and model.ood_session is None
    x = normalize(mnist[0][1000:1004], model.spec)
    _, emb, scores = model.infer(x)
    assert scores is not None
    np.testing.assert_array_equal(scores, model.ood.score(emb))


def test_smooth_fields_are_out_of_distribution(serve: Any, ood_model_dir: Path) -> None:
    client = serve(ood_model_dir)
    r = client.post("/v1/predict", json={"instances": [_ramp()]})
    assert r.json()["predictions"][0]["reason"] == "out_of_distribution"
    # The same kind of image as a file: whether the preprocessing keeps the ramp (then
    # it is too smooth to be strokes) or removes it as uneven lighting (then no ink is
    # left), it is not accepted.
    smooth = ("horizontal", "horizontal_reversed", "grey_soft", "radial")
    gradients = [n.png() for n in non_digit_images() if n.name.split("/")[-1] in smooth]
    r = client.post("/v1/predict", files=_files(gradients))
    reasons = [p["reason"] for p in r.json()["predictions"]]
    assert len(reasons) == 4
    assert all(x in ("no_ink", "out_of_distribution") for x in reasons), reasons


def test_reasons_follow_their_order(serve: Any, ood_model_dir: Path, tmp_path: Path) -> None:
    digit = _files([digit_png("seven")])
    everything_out = serve(_with_ood(ood_model_dir, tmp_path, threshold=-1.0))
    p = everything_out.post("/v1/predict", files=digit).json()["predictions"][0]
    assert (p["accepted"], p["reason"]) == (False, "out_of_distribution")

    nothing_out = _with_ood(ood_model_dir, tmp_path / "b", threshold=3.0, min_edge_density=0)
    unsure = serve(nothing_out, confidence_threshold=1.0)
    p = unsure.post("/v1/predict", files=digit).json()["predictions"][0]
    assert (p["accepted"], p["reason"]) == (False, "low_confidence")
    sure = serve(nothing_out, confidence_threshold=0.0)
    p = sure.post("/v1/predict", files=digit).json()["predictions"][0]
    assert (p["accepted"], p["reason"]) == (True, None)


def test_a_model_without_ood_calibration_still_says_no_ink(client: TestClient) -> None:
    r = client.post("/v1/predict", json={"instances": [np.zeros((28, 28)).tolist(), _ramp()]})
    blank, ramp = r.json()["predictions"]
    assert blank["reason"] == "no_ink" and blank["ood_score"] is None
    assert ramp["reason"] != "out_of_distribution" and ramp["ood_score"] is None
    assert client.get("/v1/model").json()["ood"] is None


def test_model_info_schema_and_metrics_show_the_ood_test(serve: Any, ood_model_dir: Path) -> None:
    client = serve(ood_model_dir)
    info = client.get("/v1/model").json()["ood"]
    assert info["method"] == "knn" and info["k"] == 1 and info["false_rejection_rate"] == FRR
    assert info["calibration"]["rejected_share"] == pytest.approx(FRR)
    schema = client.get("/openapi.json").json()["components"]["schemas"]["Prediction"]
    reason = schema["properties"]["reason"]
    enums = [s.get("enum") for s in reason["anyOf"] if "enum" in s]
    assert enums == [["no_ink", "out_of_distribution", "low_confidence"]]
    assert "ood_score" in schema["properties"]

    client.post("/v1/predict", json={"instances": [np.zeros((28, 28)).tolist()] * 2})
    client.post("/v1/predict", json={"instances": [_ramp()]})
    text = client.get("/metrics").text
    assert 'visionops_rejected_predictions_total{reason="no_ink"} 2.0' in text
    assert 'visionops_rejected_predictions_total{reason="out_of_distribution"} 1.0' in text


def test_prediction_log_stores_reason_and_score(
    serve: Any, ood_model_dir: Path, predlog_url: str
) -> None:
    client = serve(ood_model_dir)
    r = client.post(
        "/v1/predict",
        json={"instances": [np.zeros((28, 28)).tolist(), _ramp()]},
    )
    answered = r.json()["predictions"]
    r = client.post("/v1/predict", files=_files([digit_png("one")]))
    answered += r.json()["predictions"]
    client.__exit__(None, None, None)
    df = read_predictions(predlog_url).sort_values("id")
    assert [r if isinstance(r, str) else None for r in df["reason"]] == [
        p["reason"] for p in answered
    ]
    assert list(df["ood_score"]) == pytest.approx([p["ood_score"] for p in answered])
    assert list(df["accepted"]) == [p["accepted"] for p in answered]
    # Monitoring counts them.
    window = load_window(predlog_url, window=10, min_rows=1)
    counts = window.rejections()
    assert counts is not None and sum(counts.values()) == sum(not p["accepted"] for p in answered)
    assert counts["no_ink"] == 1 and counts["out_of_distribution"] >= 1
    assert window.info()["rejections"] == counts
    np.testing.assert_allclose(window.ood_scores, [p["ood_score"] for p in answered])


def _old_table_gets_the_new_columns(serve: Any, folder: Path, url: str) -> None:
    kept = [c._copy() for c in predictions_table.columns if c.name not in ("reason", "ood_score")]
    engine = sa.create_engine(url)
    sa.Table("predictions", sa.MetaData(), *kept).create(engine)
    engine.dispose()
    client = serve(folder, predlog_url=url)
    client.post("/v1/predict", json={"instances": [np.zeros((28, 28)).tolist()]})
    client.__exit__(None, None, None)
    engine = sa.create_engine(url)
    columns = {c["name"] for c in sa.inspect(engine).get_columns("predictions")}
    engine.dispose()
    assert {"reason", "ood_score"} <= columns
    df = read_predictions(url)
    assert list(df["reason"]) == ["no_ink"] and df["ood_score"].notna().all()


def test_an_old_sqlite_log_table_gets_the_new_columns(
    serve: Any, ood_model_dir: Path, tmp_path: Path
) -> None:
    _old_table_gets_the_new_columns(serve, ood_model_dir, f"sqlite:///{tmp_path / 'old.db'}")


@pytest.mark.postgres
def test_an_old_postgres_log_table_gets_the_new_columns(
    serve: Any, ood_model_dir: Path, postgres_database: str
) -> None:
    _old_table_gets_the_new_columns(serve, ood_model_dir, postgres_database)


def _base_install() -> set[str]:
    """Distributions the base install (``pip install visionops``, no extras) brings:
    pyproject's ``dependencies`` with the extras they name, and theirs, transitively."""
    import tomllib
    from importlib import metadata

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    deps = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())
    todo = [(Requirement(r), "") for r in deps["project"]["dependencies"]]
    seen: set[str] = set()
    while todo:
        req, extra = todo.pop()
        if req.marker is not None and not req.marker.evaluate({"extra": extra}):
            continue
        name = canonicalize_name(req.name)
        for wanted in ["", *sorted(req.extras)]:
            if (name, wanted) in seen:
                continue
            seen.add((name, wanted))  # type: ignore[arg-type]
            try:
                requires = metadata.requires(name) or []
            except metadata.PackageNotFoundError:
                continue
            todo += [(Requirement(r), wanted) for r in requires]
    return {name for name, _ in seen}  # type: ignore[misc]


def test_serving_an_ood_model_needs_only_the_base_install(
    ood_model_dir: Path, tmp_path: Path
) -> None:
    """Every third-party module a serving process imports (model with OOD test, a
    prediction, the page, metrics) comes with the base install; the API image has no more."""
    from importlib import metadata

    from packaging.utils import canonicalize_name

    predlog = f"sqlite:///{tmp_path / 'p.db'}"
    script = textwrap.dedent(
        f"""
        import io, json, sys
        from fastapi.testclient import TestClient
        from PIL import Image
        from visionops.serve.app import create_app
        from visionops.serve.service import ServeSettings

        s = ServeSettings(model_uri={str(ood_model_dir)!r}, predlog_url={predlog!r}, threads=1)
        buf = io.BytesIO(); Image.new("L", (28, 28), 0).save(buf, "PNG")
        with TestClient(create_app(s)) as c:
            for _ in range(400):
                if c.get("/readyz").status_code == 200:
                    break
                import time; time.sleep(0.05)
            files = [("files", ("a.png", buf.getvalue(), "image/png"))]
            r = c.post("/v1/predict", files=files)
            c.get("/"); c.get("/metrics")
        print(json.dumps({{"status": r.status_code,
                           "ood": r.json()["predictions"][0]["ood_score"],
                           "modules": sorted({{m.split(".")[0] for m in sys.modules}})}}))
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=False
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["status"] == 200 and isinstance(out["ood"], float)
    # Not ours: what the interpreter loads before any code runs (.pth hooks of the venv)
    # and the test client (it takes httpx2 when installed).
    harness = "import sys, json, fastapi.testclient; print(json.dumps(sorted(sys.modules)))"
    startup = subprocess.run(
        [sys.executable, "-c", harness],
        capture_output=True,
        text=True,
        check=True,
    )
    modules = set(out["modules"]) - {m.split(".")[0] for m in json.loads(startup.stdout)}
    owners = metadata.packages_distributions()
    base = _base_install() | {"visionops"}
    # A module is covered when one of the distributions that install it is in the base.
    missing = {
        module: owners[module]
        for module in modules
        if module in owners and not {canonicalize_name(d) for d in owners[module]} & base
    }
    assert {"onnx", "onnxruntime"} <= modules  # the OOD graph was built and run
    assert not missing, missing
