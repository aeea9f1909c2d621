"""POST /v1/predict in front of FastAPI (visionops.serve.hotpath) answers as the route does.

Each request goes once to an app as served (the hot path takes it) and once to an app
whose FastAPI middleware stack and routes answer it (the hot path left out): status,
body, and headers must agree, and both count the request in the same metric series.
"""

from __future__ import annotations

from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from serve_fixtures import digit_png, unit_instance

from conftest import MakeClient
from visionops.serve.hotpath import PredictEndpoint

ONE = {"files": [("files", ("one.png", digit_png("one"), "image/png"))]}
CASES: dict[str, tuple[str, dict[str, Any]]] = {
    "one image": ("/v1/predict", ONE),
    "two images": (
        "/v1/predict",
        {
            "files": [
                ("files", ("a.png", digit_png("one"), "image/png")),
                ("files", ("b.png", digit_png("zero"), "image/png")),
            ]
        },
    ),
    "return_input": ("/v1/predict?return_input=yes", ONE),
    "json instances": ("/v1/predict", {"json": {"instances": [unit_instance()]}}),
    "bad flag": ("/v1/predict?return_input=maybe", ONE),
    "not an image": (
        "/v1/predict",
        {"files": [("files", ("a.png", b"not an image", "image/png"))]},
    ),
    "wrong content type": (
        "/v1/predict",
        {"content": b"abc", "headers": {"content-type": "text/plain"}},
    ),
    "bad json": (
        "/v1/predict",
        {"content": b'{"instances": [', "headers": {"content-type": "application/json"}},
    ),
    "body over the limit": (
        "/v1/predict",
        {"files": [("files", ("big.png", b"\0" * 5000, "image/png"))]},
    ),
    "bad content-length": (
        "/v1/predict",
        {"content": b"{}", "headers": {"content-length": "x", "content-type": "application/json"}},
    ),
}
SERVE = {"max_body_bytes": 4000}


@pytest.fixture
def clients(make_client: MakeClient) -> tuple[TestClient, TestClient]:
    hot = make_client(serve=SERVE)
    plain = make_client(serve=SERVE)
    # The app without the hot path: FastAPI's own stack, as before it existed.
    plain.app.middleware_stack = FastAPI.build_middleware_stack(plain.app)  # type: ignore[union-attr,arg-type]
    assert isinstance(hot.app.middleware_stack, PredictEndpoint)  # type: ignore[union-attr]
    assert not isinstance(plain.app.middleware_stack, PredictEndpoint)  # type: ignore[union-attr]
    return hot, plain


def _answer(client: TestClient, url: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    extra = dict(kwargs.get("headers", {}))
    extra["x-request-id"] = "same-id-for-both"
    r = client.post(url, **{**kwargs, "headers": extra})
    return {
        "status": r.status_code,
        "body": r.json(),
        "headers": {
            k: r.headers.get(k)
            for k in ("content-type", "x-request-id", "x-content-type-options", "connection")
        },
    }


@pytest.mark.parametrize("case", list(CASES))
def test_hot_path_answers_as_the_fastapi_route(
    clients: tuple[TestClient, TestClient], case: str
) -> None:
    hot, plain = clients
    url, kwargs = CASES[case]
    a, b = _answer(hot, url, kwargs), _answer(plain, url, kwargs)
    assert a == b
    assert a["headers"]["x-request-id"] == "same-id-for-both"
    assert a["headers"]["x-content-type-options"] == "nosniff"


def test_hot_path_answers_each_kind_of_request(clients: tuple[TestClient, TestClient]) -> None:
    """The cases above cover success, 4xx from every layer and the 413."""
    hot, _ = clients
    statuses = {case: _answer(hot, *CASES[case])["status"] for case in CASES}
    assert statuses == {
        "one image": 200,
        "two images": 200,
        "return_input": 200,
        "json instances": 200,
        "bad flag": 422,
        "not an image": 400,
        "wrong content type": 415,
        "bad json": 400,
        "body over the limit": 413,
        "bad content-length": 400,
    }
    body = _answer(hot, *CASES["return_input"])["body"]
    assert body["predictions"][0]["input_png"].startswith("data:image/png;base64,")


def _predict_counts(client: TestClient) -> dict[str, float]:
    out = {}
    for line in client.get("/metrics").text.splitlines():
        if line.startswith("visionops_http_requests_total{") and 'route="/v1/predict"' in line:
            labels, value = line.rsplit(" ", 1)
            out[labels] = float(value)
    return out


def test_hot_path_counts_requests_like_the_middleware(
    clients: tuple[TestClient, TestClient],
) -> None:
    hot, plain = clients
    for client in (hot, plain):
        for case in ("one image", "not an image", "body over the limit", "bad flag"):
            _answer(client, *CASES[case])
    counts = _predict_counts(hot)
    key = 'visionops_http_requests_total{{method="POST",route="/v1/predict",status="{}"}}'
    assert counts == {key.format(s): 1.0 for s in ("200", "400", "413", "422")}
    # FastAPI's stack refuses a declared oversize body before routing ("unmatched"); the
    # hot path knows the route. Everything else is counted alike.
    assert _predict_counts(plain) == {key.format(s): 1.0 for s in ("200", "400", "422")}


def test_other_methods_and_paths_pass_through(clients: tuple[TestClient, TestClient]) -> None:
    hot, _ = clients
    assert hot.get("/v1/predict").status_code == 405
    assert hot.get("/v1/predict").json()["error"]["code"] == "method_not_allowed"
    assert hot.get("/healthz").json() == {"status": "ok"}
