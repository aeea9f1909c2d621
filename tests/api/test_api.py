"""The HTTP contract of the prediction service, on the real app and a tiny real model."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families
from serve_fixtures import build_tiny_model, digit_png, encode, stroke_image, unit_instance

from conftest import ADMIN_TOKEN, MakeClient, wait_ready
from visionops.data.transforms import decode_image, image_to_array, normalize
from visionops.ood import screen_pixels
from visionops.serve.batching import MicroBatcher
from visionops.serve.model import LoadedModel, Scores

AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


def files_of(*pngs: bytes) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("files", (f"img{i}.png", b, "image/png")) for i, b in enumerate(pngs)]


def expected_probabilities(model: LoadedModel, data: bytes) -> np.ndarray:
    """What training-time preprocessing + the model give for one file (no server)."""
    pixels = image_to_array(decode_image(data, max_pixels=10**7), model.spec)
    probs, _ = model.run(normalize(pixels[None], model.spec))
    return probs[0]


def metric_samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


# --------------------------------------------------------------------------- health


def test_healthz(client: TestClient) -> None:
    r = client.get("/healthz")
    assert r.status_code == 200
    assert r.json() == {"status": "ok"}


def test_readyz_when_loaded(client: TestClient) -> None:
    r = client.get("/readyz")
    assert r.status_code == 200
    assert r.json()["model"]["name"] == "tiny-mnist"


def test_unready_when_model_missing(make_client: MakeClient, tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"
    c = make_client(model_uri=str(missing), preload=False)
    wait_for_load_error(c)
    r = c.get("/readyz")
    assert r.status_code == 503
    assert r.json()["error"]["code"] == "model_not_ready"
    assert str(missing) in r.json()["error"]["message"]
    assert c.get("/healthz").status_code == 200  # alive, just not ready
    r = c.post("/v1/predict", files=files_of(digit_png()))
    assert r.status_code == 503
    assert r.json()["error"]["code"] == "model_not_ready"
    assert c.get("/v1/model").status_code == 503


def wait_for_load_error(c: TestClient) -> None:
    service = c.app.state.service  # type: ignore[attr-defined]
    for _ in range(200):
        if service.load_error:
            return
        time.sleep(0.02)
    raise AssertionError("load never failed")


def test_background_load_then_ready(make_client: MakeClient, tiny_model_dir: Path) -> None:
    c = make_client(preload=False, model_uri=str(tiny_model_dir))
    wait_ready(c)
    assert c.post("/v1/predict", files=files_of(digit_png())).status_code == 200


# --------------------------------------------------------------------------- predict


def test_predict_single_file_matches_training_preprocessing(
    client: TestClient, tiny_model: LoadedModel
) -> None:
    png = digit_png("zero")
    r = client.post("/v1/predict", files=files_of(png))
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == {"name": "tiny-mnist", "version": None, "alias": None}
    (pred,) = body["predictions"]
    expected = expected_probabilities(tiny_model, png)
    assert list(pred["probabilities"]) == [str(i) for i in range(10)]
    got = np.array(list(pred["probabilities"].values()))
    np.testing.assert_allclose(got, expected, atol=1e-6)
    assert pred["class_index"] == int(expected.argmax())
    assert pred["label"] == str(int(expected.argmax()))
    assert pred["confidence"] == pytest.approx(float(expected.max()), abs=1e-6)
    assert sum(pred["probabilities"].values()) == pytest.approx(1.0, abs=1e-4)


def test_return_input_gives_what_the_model_saw(client: TestClient, tiny_model: LoadedModel) -> None:
    pngs = [digit_png("zero", dark_on_light=True), digit_png("seven")]
    plain = client.post("/v1/predict", files=files_of(*pngs)).json()["predictions"]
    assert all("input_png" not in p for p in plain)  # off by default
    r = client.post("/v1/predict?return_input=true", files=files_of(*pngs))
    assert r.status_code == 200, r.text
    shown = r.json()["predictions"]
    for png, with_input, without in zip(pngs, shown, plain, strict=True):
        assert with_input["probabilities"] == without["probabilities"]
        head, data = with_input["input_png"].split(",", 1)
        assert head == "data:image/png;base64"
        seen = np.asarray(Image.open(io.BytesIO(base64.b64decode(data))))
        expected = image_to_array(decode_image(png, max_pixels=10**7), tiny_model.spec)
        assert seen.dtype == np.uint8 and seen.shape == expected.shape[:2]
        np.testing.assert_array_equal(seen, expected[..., 0])  # exact: PNG is lossless
    # The two inputs differ (a preview of the wrong image would not).
    assert shown[0]["input_png"] != shown[1]["input_png"]
    bad = client.post("/v1/predict?return_input=maybe", files=files_of(pngs[0]))
    assert bad.status_code == 422
    assert bad.json()["error"]["code"] == "invalid_request"
    assert "return_input" in bad.json()["error"]["message"]
    off = client.post("/v1/predict?return_input=false", files=files_of(pngs[0])).json()
    assert "input_png" not in off["predictions"][0]


def test_dark_on_light_upload_is_inverted(client: TestClient) -> None:
    light = stroke_image("seven", dark_on_light=False)
    dark = stroke_image("seven", dark_on_light=True)
    a, b = (client.post("/v1/predict", files=files_of(encode(i))).json() for i in (light, dark))
    assert a["predictions"][0]["probabilities"] == pytest.approx(
        b["predictions"][0]["probabilities"], abs=1e-6
    )


def test_multiple_files_keep_input_order(client: TestClient) -> None:
    kinds = ["zero", "one", "seven", "zero", "seven", "one"]
    pngs = [digit_png(k) for k in kinds]
    singles = [client.post("/v1/predict", files=files_of(p)).json()["predictions"][0] for p in pngs]
    assert len({s["label"] for s in singles}) > 1 or len({s["confidence"] for s in singles}) > 1
    r = client.post("/v1/predict", files=files_of(*pngs))
    assert r.status_code == 200
    batch = r.json()["predictions"]
    assert len(batch) == len(kinds)
    for one, many in zip(singles, batch, strict=True):
        assert many["label"] == one["label"]
        assert many["confidence"] == pytest.approx(one["confidence"], abs=1e-6)


def test_other_image_formats(client: TestClient) -> None:
    img = stroke_image("one")
    for fmt, kwargs in (("JPEG", {"quality": 95}), ("BMP", {}), ("GIF", {}), ("WEBP", {})):
        r = client.post("/v1/predict", files=files_of(encode(img.convert("L"), fmt, **kwargs)))
        assert r.status_code == 200, (fmt, r.text)
    rgba = stroke_image("one", dark_on_light=True).convert("RGBA")
    assert client.post("/v1/predict", files=files_of(encode(rgba))).status_code == 200


def test_predict_json_instances(client: TestClient, tiny_model: LoadedModel) -> None:
    native = unit_instance("zero", size=28)
    r = client.post("/v1/predict", json={"instances": [native, unit_instance("seven", size=56)]})
    assert r.status_code == 200, r.text
    preds = r.json()["predictions"]
    assert len(preds) == 2
    # A native-size instance is exactly what the model sees: no re-centring.
    pixels = np.rint(np.asarray(native) * 255).astype(np.uint8)[:, :, None]
    probs, _ = tiny_model.run(normalize(pixels[None], tiny_model.spec))
    np.testing.assert_allclose(list(preds[0]["probabilities"].values()), probs[0], atol=1e-6)


def test_json_and_upload_of_same_drawing_agree(client: TestClient) -> None:
    """Off-size instances are centred like uploads: the same pixels give the same answer."""
    inst = unit_instance("seven", size=56)
    png = encode(stroke_image("seven", size=56))
    a = client.post("/v1/predict", json={"instances": [inst]}).json()["predictions"][0]
    b = client.post("/v1/predict", files=files_of(png)).json()["predictions"][0]
    assert a["probabilities"] == pytest.approx(b["probabilities"], abs=1e-6)


def test_confidence_threshold_flags_low_confidence(make_client: MakeClient) -> None:
    pngs = [digit_png(k) for k in ("zero", "one", "seven")]
    default = make_client().post("/v1/predict", files=files_of(*pngs)).json()["predictions"]
    for p in default:
        assert p["accepted"] == (p["confidence"] >= 0.7)
    everything = make_client(serve={"confidence_threshold": 0.0})
    assert all(
        p["accepted"]
        for p in everything.post("/v1/predict", files=files_of(*pngs)).json()["predictions"]
    )
    nothing = make_client(serve={"confidence_threshold": 1.0})
    assert not any(
        p["accepted"]
        for p in nothing.post("/v1/predict", files=files_of(*pngs)).json()["predictions"]
    )


def test_request_id_header(client: TestClient) -> None:
    r = client.post("/v1/predict", files=files_of(digit_png()))
    rid = r.headers["x-request-id"]
    assert len(rid) == 32 and int(rid, 16) >= 0
    r2 = client.get("/healthz", headers={"X-Request-ID": "client-id-123"})
    assert r2.headers["x-request-id"] == "client-id-123"
    r3 = client.get("/healthz", headers={"X-Request-ID": "x" * 500})
    assert r3.headers["x-request-id"] != "x" * 500  # unsafe ids are replaced
    err = client.post("/v1/predict", content=b"nope", headers={"content-type": "text/plain"})
    assert "x-request-id" in err.headers


# --------------------------------------------------------------------------- model info


def test_model_info(client: TestClient, tiny_model: LoadedModel) -> None:
    r = client.get("/v1/model")
    assert r.status_code == 200
    info = r.json()
    assert info["name"] == "tiny-mnist"
    assert info["classes"] == [str(i) for i in range(10)]
    assert info["input_size"] == {"channels": 1, "height": 28, "width": 28}
    assert info["metrics"] == {"accuracy": 0.1, "macro_f1": 0.1}
    assert info["architecture"] == "tiny-cnn"
    assert info["digest"] == tiny_model.digest
    assert info["preprocess"]["mean"] == [0.1307]


# --------------------------------------------------------------------------- reload


def test_reload_disabled_without_token(make_client: MakeClient) -> None:
    c = make_client(admin_token=None)
    r = c.post("/v1/admin/reload", headers=AUTH)
    assert r.status_code == 403
    assert r.json()["error"]["code"] == "admin_disabled"


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer wrong"},
        {"Authorization": ADMIN_TOKEN},
        {"Authorization": "Basic dGVzdA=="},
    ],
    ids=["missing", "wrong", "no-scheme", "basic"],
)
def test_reload_needs_the_token(client: TestClient, headers: dict[str, str]) -> None:
    r = client.post("/v1/admin/reload", headers=headers)
    assert r.status_code == 401
    assert r.json()["error"]["code"] == "unauthorized"
    assert r.headers["www-authenticate"] == "Bearer"


def test_reload_swaps_and_refuses_broken_models(make_client: MakeClient, tmp_path: Path) -> None:
    served = build_tiny_model(tmp_path / "served", seed=0)
    c = make_client(model_uri=str(served), preload=False)
    wait_ready(c)
    png = digit_png("zero")
    before = c.post("/v1/predict", files=files_of(png)).json()["predictions"][0]
    digest_a = c.get("/v1/model").json()["digest"]

    same = c.post("/v1/admin/reload", headers=AUTH)
    assert same.status_code == 200
    assert same.json()["changed"] is False

    # A new model appears at the same place (as when the champion alias moves).
    shutil.rmtree(served)
    build_tiny_model(served, seed=1, name="tiny-mnist-b")
    r = c.post("/v1/admin/reload", headers=AUTH)
    assert r.status_code == 200, r.text
    assert r.json()["changed"] is True
    assert r.json()["previous"]["name"] == "tiny-mnist"
    assert r.json()["current"]["name"] == "tiny-mnist-b"
    info = c.get("/v1/model").json()
    assert info["digest"] != digest_a
    after = c.post("/v1/predict", files=files_of(png)).json()
    assert after["model"]["name"] == "tiny-mnist-b"
    assert after["predictions"][0]["probabilities"] != before["probabilities"]
    digest_b = info["digest"]

    # Broken replacements are refused and B keeps serving.
    breakages = {
        "garbage-onnx": lambda: (served / "model.onnx").write_bytes(b"not an onnx graph"),
        "wrong-class-count": lambda: _rewrite_meta(served, classes=["a", "b", "c"]),
        "bad-preprocess": lambda: _rewrite_meta(served, preprocess={"image_size": 28}),
        "missing-metadata": lambda: (served / "metadata.json").unlink(),
    }
    for name, breakage in breakages.items():
        shutil.rmtree(served)
        build_tiny_model(served, seed=2)
        breakage()
        r = c.post("/v1/admin/reload", headers=AUTH)
        assert r.status_code == 409, (name, r.text)
        assert r.json()["error"]["code"] == "reload_refused"
        assert "still serving tiny-mnist-b" in r.json()["error"]["message"]
        assert c.get("/v1/model").json()["digest"] == digest_b
        ok = c.post("/v1/predict", files=files_of(png))
        assert ok.status_code == 200 and ok.json()["model"]["name"] == "tiny-mnist-b"

    metrics = metric_samples(c.get("/metrics").text)
    assert metrics[("visionops_model_reloads_total", (("outcome", "refused"),))] == 4
    assert metrics[("visionops_model_reloads_total", (("outcome", "ok"),))] == 2


def _rewrite_meta(folder: Path, **changes: object) -> None:
    meta = json.loads((folder / "metadata.json").read_text())
    meta.update(changes)
    (folder / "metadata.json").write_text(json.dumps(meta))


# --------------------------------------------------------------------------- metrics


def test_metrics_after_requests(client: TestClient) -> None:
    n_ok = 3
    for _ in range(n_ok):
        assert (
            client.post(
                "/v1/predict", files=files_of(digit_png("zero"), digit_png("one"))
            ).status_code
            == 200
        )
    assert (
        client.post("/v1/predict", content=b"x", headers={"content-type": "text/plain"}).status_code
        == 415
    )
    client.get("/no/such/route")
    r = client.get("/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    m = metric_samples(r.text)

    def sample(metric: str, **labels: str) -> float:
        return m[(metric, tuple(sorted(labels.items())))]

    route = {"route": "/v1/predict", "method": "POST"}
    assert sample("visionops_http_requests_total", status="200", **route) == n_ok
    assert sample("visionops_http_requests_total", status="415", **route) == 1
    assert (
        sample("visionops_http_requests_total", route="unmatched", method="GET", status="404") == 1
    )
    assert sample("visionops_http_request_duration_seconds_count", status="200", **route) == n_ok
    by_class = sum(v for (name, _), v in m.items() if name == "visionops_predictions_total")
    assert by_class == 2 * n_ok
    assert sample("visionops_prediction_confidence_count") == 2 * n_ok
    assert sample("visionops_batch_size_sum") == 2 * n_ok
    assert sample("visionops_batch_size_count") >= n_ok
    info = sample(
        "visionops_model_info",
        name="tiny-mnist",
        version="",
        alias="",
        digest=client.get("/v1/model").json()["digest"],
    )
    assert info == 1
    assert sample("visionops_model_loaded") == 1


def test_each_app_has_its_own_metrics(make_client: MakeClient) -> None:
    a, b = make_client(), make_client()
    a.post("/v1/predict", files=files_of(digit_png()))
    mb = metric_samples(b.get("/metrics").text)
    assert not any(name == "visionops_predictions_total" for name, _ in mb)


# --------------------------------------------------------------------------- errors


def test_unexpected_errors_are_json_500_and_service_survives(
    make_client: MakeClient, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    c = make_client(raise_server_exceptions=False)

    def boom(*_: object) -> None:
        raise RuntimeError("kaboom")

    monkeypatch.setattr(LoadedModel, "run", boom)
    r = c.post("/v1/predict", files=files_of(digit_png()))
    assert r.status_code == 500
    assert r.json()["error"]["code"] == "internal_error"
    assert r.headers["x-request-id"] in r.json()["error"]["message"]
    assert "kaboom" in caplog.text  # logged, not swallowed
    monkeypatch.undo()
    assert c.post("/v1/predict", files=files_of(digit_png())).status_code == 200


def test_unknown_route_and_method_are_json(client: TestClient) -> None:
    r = client.get("/v2/nothing")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    r = client.get("/v1/predict")
    assert r.status_code == 405 and r.json()["error"]["code"] == "method_not_allowed"


# --------------------------------------------------------------------------- docs & page


def test_openapi_documents_the_contract(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    schemas = spec["components"]["schemas"]
    for name in ("PredictRequest", "PredictResponse", "Prediction", "ModelInfo", "ErrorResponse"):
        assert name in schemas, name
    post = spec["paths"]["/v1/predict"]["post"]
    assert set(post["requestBody"]["content"]) == {"multipart/form-data", "application/json"}
    assert {"200", "400", "413", "415", "422"} <= set(post["responses"])
    (param,) = post["parameters"]
    assert param["name"] == "return_input" and param["schema"]["type"] == "boolean"
    assert "input_png" in schemas["Prediction"]["properties"]
    assert "/v1/admin/reload" in spec["paths"] and "/v1/model" in spec["paths"]


def test_web_page_is_served(client: TestClient) -> None:
    r = client.get("/")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in r.headers["content-security-policy"]
    for element_id in (
        "canvas",
        "predict",
        "file",
        "label",
        "confidence",
        "bars",
        "model-version",
        "clear",
    ):
        assert f'id="{element_id}"' in r.text, element_id
    assert "http://" not in r.text and "https://" not in r.text  # no CDN
    js = client.get("/static/app.js")
    assert js.status_code == 200 and "/v1/predict" in js.text
    assert client.get("/static/style.css").status_code == 200


# --------------------------------------------------------------------------- internals


def test_micro_batcher_batches_concurrent_requests_without_waiting(
    tiny_model: LoadedModel,
) -> None:
    """Requests that arrive together share one call; an idle model runs at once."""
    sizes: list[int] = []
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (10, 28, 28, 1), dtype=np.uint8)

    async def scenario() -> tuple[list[Scores], float]:
        # max_batch_size 4: the 3+3+4 images become three calls (a request is never
        # split between calls); the lone image afterwards runs at once, by itself.
        batcher = MicroBatcher(max_batch_size=4, max_wait_ms=0, on_batch=sizes.append)
        batcher.start()
        try:
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            parts = await asyncio.gather(
                batcher.predict(tiny_model, x[:3]),
                batcher.predict(tiny_model, x[3:6]),
                batcher.predict(tiny_model, x[6:]),
            )
            single = await batcher.predict(tiny_model, x[:1])  # idle model: its own call
            waited = loop.time() - t0
        finally:
            await batcher.stop()
        return [*parts, single], waited

    parts, _ = asyncio.run(scenario())
    assert sizes == [3, 3, 4, 1]
    probs, emb = tiny_model.run(normalize(x, tiny_model.spec))
    assert [len(p.probabilities) for p in parts] == [3, 3, 4, 1]
    np.testing.assert_allclose(np.concatenate([p[0] for p in parts[:3]]), probs, atol=1e-6)
    np.testing.assert_allclose(np.concatenate([p[1] for p in parts[:3]]), emb, atol=1e-6)
    np.testing.assert_allclose(parts[3][0], probs[:1], atol=1e-6)
    # The pixel tests ran on the batch and came back row by row, like the scores.
    screen = screen_pixels(x, tiny_model.min_ink_pixels, 0.0)
    np.testing.assert_array_equal(
        np.concatenate([p.screen.no_ink for p in parts[:3]]), screen.no_ink
    )


def test_micro_batcher_merges_small_requests_and_chunks_large_ones(
    tiny_model: LoadedModel,
) -> None:
    sizes: list[int] = []
    x = np.random.default_rng(1).integers(0, 256, (12, 28, 28, 1), dtype=np.uint8)
    x[3] = 0  # a blank image among them: its own no_ink row

    async def scenario() -> list[Scores]:
        batcher = MicroBatcher(max_batch_size=8, on_batch=sizes.append)
        batcher.start()
        try:
            # Five one-image requests in the same turn of the loop: one call of 5; then a
            # 12-image request alone: calls of 8 and 4.
            small = await asyncio.gather(
                *(batcher.predict(tiny_model, x[i : i + 1]) for i in range(5))
            )
            big = await batcher.predict(tiny_model, x)
        finally:
            await batcher.stop()
        return [*small, big]

    parts = asyncio.run(scenario())
    assert sizes == [5, 8, 4]
    probs, _ = tiny_model.run(normalize(x, tiny_model.spec))
    assert [bool(p.screen.no_ink[0]) for p in parts[:5]] == [False, False, False, True, False]
    assert parts[5].screen.no_ink.tolist() == [i == 3 for i in range(12)]
    np.testing.assert_allclose(np.concatenate([p[0] for p in parts[:5]]), probs[:5], atol=1e-6)
    np.testing.assert_allclose(parts[5][0], probs, atol=1e-6)


def test_micro_batcher_max_wait_is_an_upper_bound(tiny_model: LoadedModel) -> None:
    """With max_wait_ms set, a lone request waits for company, but a full batch does not."""
    sizes: list[int] = []
    x = np.zeros((4, 28, 28, 1), np.uint8)

    async def scenario() -> None:
        batcher = MicroBatcher(max_batch_size=2, max_wait_ms=60_000, on_batch=sizes.append)
        batcher.start()
        try:
            # Two images fill the batch: scored at once despite the one-minute bound.
            await asyncio.wait_for(
                asyncio.gather(
                    batcher.predict(tiny_model, x[:1]), batcher.predict(tiny_model, x[1:2])
                ),
                timeout=30,
            )
            lone = asyncio.ensure_future(batcher.predict(tiny_model, x[:1]))
            await asyncio.sleep(0.05)
            assert not lone.done()  # waiting for company, up to max_wait_ms
        finally:
            await batcher.stop()  # stop scores what is pending
        probs, _, ood, _ = await asyncio.wait_for(lone, timeout=5)
        assert ood is None  # the tiny model has no OOD calibration
        assert probs.shape == (1, 10)

    asyncio.run(scenario())
    assert sizes == [2, 1]


def test_serving_never_imports_torch(tiny_model_dir: Path, tmp_path: Path) -> None:
    script = textwrap.dedent(
        f"""
        import io, json, sys
        from fastapi.testclient import TestClient
        from PIL import Image
        from visionops.serve.app import create_app
        from visionops.serve.service import ServeSettings

        settings = ServeSettings(model_uri={str(tiny_model_dir)!r},
                                 predlog_url={f"sqlite:///{tmp_path / 'p.db'}"!r}, threads=1)
        buf = io.BytesIO(); Image.new("L", (28, 28), 0).save(buf, "PNG")
        with TestClient(create_app(settings)) as c:
            for _ in range(400):
                if c.get("/readyz").status_code == 200:
                    break
                import time; time.sleep(0.05)
            r = c.post("/v1/predict", files=[("files", ("a.png", buf.getvalue(), "image/png"))])
            c.get("/")
            c.get("/metrics")
        print(json.dumps({{"status": r.status_code,
                           "torch": sorted(m for m in sys.modules if m.split(".")[0] == "torch")}}))
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=False
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result == {"status": 200, "torch": []}


# --------------------------------------------------------------------------- model URIs


def test_registry_uri_goes_through_the_registry(
    make_client: MakeClient,
    tiny_model_dir: Path,
    predlog_url: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from visionops import registry

    versions = iter(["3", "4"])
    seen: list[str] = []

    def fake_resolve(uri: str) -> registry.ServedModelRef:
        seen.append(uri)
        return registry.ServedModelRef(
            path=tiny_model_dir, name="visionops-mnist", version=next(versions), alias="champion"
        )

    monkeypatch.setattr(registry, "resolve_served_model", fake_resolve)
    c = make_client(model_uri="models:/visionops-mnist@champion", preload=False)
    wait_ready(c)
    r = c.post("/v1/predict", files=files_of(digit_png()))
    assert r.json()["model"] == {"name": "visionops-mnist", "version": "3", "alias": "champion"}
    info = c.get("/v1/model").json()
    assert (info["name"], info["version"], info["alias"]) == ("visionops-mnist", "3", "champion")
    assert 'version="3"' in c.get("/metrics").text

    # The alias moved: reload picks up version 4 (same file, so only the version differs).
    r = c.post("/v1/admin/reload", headers=AUTH)
    assert r.status_code == 200
    assert r.json()["changed"] is True
    assert r.json()["current"]["version"] == "4"
    assert seen == ["models:/visionops-mnist@champion"] * 2
    c.post("/v1/predict", files=files_of(digit_png()))
    c.__exit__(None, None, None)

    from visionops.serve.predlog import read_predictions

    df = read_predictions(predlog_url)
    assert list(df["model_version"]) == ["3", "4"]
    assert set(df["model_alias"]) == {"champion"}


def test_settings_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from visionops.serve.service import ServeSettings

    (tmp_path / "params.yaml").write_text("serve:\n  max_files: 7\n")
    monkeypatch.setenv("VISIONOPS_ADMIN_TOKEN", "s3cret")
    monkeypatch.delenv("VISIONOPS_PREDLOG_URL", raising=False)
    s = ServeSettings.from_environment(params_file=tmp_path / "params.yaml", root=tmp_path)
    assert s.model_uri == "models:/visionops-mnist@champion"
    assert s.serve.max_files == 7
    assert s.admin_token == "s3cret"
    assert s.predlog_url == f"sqlite:///{tmp_path.resolve() / 'predictions.db'}"
    explicit = ServeSettings.from_environment(
        "exported", tmp_path / "params.yaml", ["serve.max_files=9"]
    )
    assert explicit.model_uri == "exported" and explicit.serve.max_files == 9


def test_run_server_fails_fast_on_a_bad_model(tmp_path: Path) -> None:
    from visionops.errors import ModelError
    from visionops.serve.app import run_server

    (tmp_path / "params.yaml").write_text("seed: 1\n")
    with pytest.raises(ModelError, match="model folder not found"):
        run_server(model_uri=str(tmp_path / "nothing"), params_file=tmp_path / "params.yaml")


def test_metric_labels_stay_bounded_under_made_up_methods(client: TestClient) -> None:
    """Any token is a method to the HTTP parser; /metrics must not grow a series per token."""
    import random
    import string

    rng = random.Random(14)
    made_up = ["PROPFIND", "PURGE", "BREW"] + [
        "".join(rng.choices(string.ascii_uppercase, k=rng.randint(3, 12))) for _ in range(20)
    ]
    for method in made_up:
        assert client.request(method, "/v1/predict").status_code == 405
        client.request(method, f"/random/{method.lower()}")
    client.get("/healthz")
    m = metric_samples(client.get("/metrics").text)
    methods = {
        dict(labels)["method"]
        for (name, labels) in m
        if name.startswith("visionops_http_request") and "method" in dict(labels)
    }
    assert methods == {"GET", "other"}
    statuses = {dict(labels)["status"] for (name, labels) in m if "status" in dict(labels)}
    assert statuses <= {"200", "404", "405"}
    other = {"route": "/v1/predict", "method": "other", "status": "405"}
    assert m[("visionops_http_requests_total", tuple(sorted(other.items())))] == len(made_up)
