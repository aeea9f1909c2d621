"""docs/http-api.md's error table is the one list of error codes: checked both ways.

Every ``(status, code)`` the service's source can answer with is in the table with that
status, every row of the table is raised somewhere, and a real request for each case
the table describes gets the documented status and code from the real app.
"""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from serve_fixtures import digit_png, encode, stroke_image, unit_instance

from conftest import MakeClient

REPO = Path(__file__).resolve().parents[2]
DOC = REPO / "docs" / "http-api.md"
SOURCES = [*(REPO / "src/visionops/serve").glob("*.py"), REPO / "src/visionops/monitor/api.py"]
_ROW = re.compile(r"^\| (\d{3}) \| `([a-z_]+)` \| (.+) \|$")


def documented() -> dict[str, int]:
    """``{code: status}`` from the error table of docs/http-api.md."""
    rows: dict[str, int] = {}
    for line in DOC.read_text().splitlines():
        if m := _ROW.match(line):
            assert m[2] not in rows, f"code {m[2]} is in the table twice"
            rows[m[2]] = int(m[1])
    assert len(rows) >= 10, "the error table of docs/http-api.md was not found"
    return rows


def raised() -> tuple[dict[str, set[int]], set[str]]:
    """``({code: statuses}, codes without a literal status)`` found in the service's source.

    ``ApiError(status, "code", ...)`` and ``_error(status, "code", ...)`` give both;
    ``error_body("code", ...)`` gives the code (its status is set beside it).
    """
    with_status: dict[str, set[int]] = {}
    bare: set[str] = set()
    for path in SOURCES:
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Call):
                continue
            name = ast.unparse(node.func)
            args = [a.value if isinstance(a, ast.Constant) else None for a in node.args]
            if name in {"ApiError", "_error"} and len(args) >= 2:
                if isinstance(args[0], int) and isinstance(args[1], str):
                    with_status.setdefault(args[1], set()).add(args[0])
            elif name == "error_body" and args and isinstance(args[0], str):
                bare.add(args[0])
    return with_status, bare


def test_every_error_the_source_raises_is_documented_with_its_status() -> None:
    docs = documented()
    with_status, bare = raised()
    assert len(with_status) >= 15  # the scan still finds the raise sites
    wrong = {c: (s, docs.get(c)) for c, s in with_status.items() if docs.get(c) not in s}
    assert not wrong, f"code: (status in the source, status in {DOC.name}): {wrong}"
    assert all(len(s) == 1 for s in with_status.values()), with_status
    assert bare <= set(docs), f"undocumented codes: {bare - set(docs)}"


def test_every_documented_code_exists() -> None:
    from visionops.serve.app import _HTTP_CODES

    with_status, bare = raised()
    known = set(with_status) | bare | set(_HTTP_CODES.values())
    assert set(documented()) <= known, set(documented()) - known


def _json(body: str) -> dict[str, object]:
    return {"content": body, "headers": {"content-type": "application/json"}}


def _instances(value: object) -> dict[str, object]:
    return _json(json.dumps({"instances": value}, allow_nan=True))


def _files(*parts: tuple[str, bytes, str]) -> dict[str, object]:
    return {"files": [("files", p) for p in parts]}


# Each documented client error, as requests a user could send: (method, path, kwargs).
Case = tuple[str, str, dict[str, object]]
EXAMPLES: dict[str, list[Case]] = {
    "invalid_image": [
        ("POST", "/v1/predict", _files(("a.png", b"not an image at all", "image/png"))),
        ("POST", "/v1/predict", _files(("a.png", digit_png()[:40], "image/png"))),
    ],
    "invalid_json": [
        ("POST", "/v1/predict", _json('{"instances": [')),
        ("POST", "/v1/predict", _json("")),
    ],
    "invalid_multipart": [
        (
            "POST",
            "/v1/predict",
            {
                "content": b"--x\r\n\r\n",
                "headers": {"content-type": "multipart/form-data"},  # no boundary
            },
        )
    ],
    "unauthorized": [
        ("POST", "/v1/admin/reload", {"headers": {"Authorization": "Bearer wrong"}}),
        ("POST", "/v1/admin/reload", {}),
    ],
    "not_found": [("GET", "/no/such/route", {})],
    "unknown_request": [("POST", "/v1/feedback", _json('{"request_id": "nope", "label": "1"}'))],
    "method_not_allowed": [("DELETE", "/v1/predict", {}), ("POST", "/healthz", {})],
    "too_many_files": [
        ("POST", "/v1/predict", _instances([unit_instance()] * 3)),
        (
            "POST",
            "/v1/predict",
            _files(*[(f"{i}.png", digit_png(), "image/png") for i in range(3)]),
        ),
    ],
    "image_too_large": [
        ("POST", "/v1/predict", _instances([[[0.0] * 40] * 40])),
        ("POST", "/v1/predict", _files(("big.png", encode(stroke_image("one", size=60)), "x"))),
    ],
    "payload_too_large": [("POST", "/v1/predict", _json(" " * 70_000))],
    "unsupported_media_type": [
        ("POST", "/v1/predict", {"content": b"x", "headers": {"content-type": "text/plain"}}),
        ("POST", "/v1/predict", _files(("a.tif", encode(stroke_image("one"), "TIFF"), "x"))),
    ],
    "invalid_instances": [
        ("POST", "/v1/predict", _instances([[[float("nan"), 0.5]]])),
        ("POST", "/v1/predict", _instances([[[float("inf"), 0.5]]])),
        ("POST", "/v1/predict", _instances([[[1.5, 0.5]]])),
        ("POST", "/v1/predict", _instances([[[-0.1, 0.5]]])),
        ("POST", "/v1/predict", _json('{"pixels": []}')),
    ],
    "missing_field": [
        ("POST", "/v1/predict", {"files": [("file", ("a.png", digit_png(), "image/png"))]}),
    ],
    "invalid_field": [
        (
            "POST",
            "/v1/predict",
            {"data": {"files": "text"}, "files": [("other", ("a.png", digit_png(), "image/png"))]},
        )
    ],
    "invalid_request": [
        ("GET", "/v1/monitoring/drift?window=many", {}),
        ("POST", "/v1/feedback", _json('{"label": "1"}')),
    ],
}
AUTHORIZED: dict[str, object] = {"headers": {"Authorization": "Bearer test-admin-token"}}


@pytest.fixture
def limited(make_client: MakeClient) -> TestClient:
    # Small limits so the "too large" cases stay tiny.
    return make_client(serve={"max_files": 2, "max_pixels": 1024, "max_body_bytes": 65_536})


def _check(client: TestClient, code: str, case: Case) -> None:
    method, path, kwargs = case
    r: httpx.Response = client.request(method, path, **kwargs)  # type: ignore[arg-type]
    status = documented()[code]
    assert (r.status_code, r.json()["error"]["code"]) == (status, code), (case, r.text)


@pytest.mark.parametrize("code", sorted(EXAMPLES))
def test_documented_cases_get_the_documented_answer(limited: TestClient, code: str) -> None:
    assert code in documented()
    for case in EXAMPLES[code]:
        _check(limited, code, case)


def test_admin_and_logging_errors_match_the_table(make_client: MakeClient) -> None:
    cases: list[tuple[TestClient, str, Case]] = [
        (make_client(admin_token=None), "admin_disabled", ("POST", "/v1/admin/reload", {})),
        (
            make_client(predlog_url=None),
            "predlog_disabled",
            ("POST", "/v1/feedback", _json('{"request_id": "r", "label": "1"}')),
        ),
        (
            make_client(model_uri="/no/such/model"),
            "reload_refused",
            ("POST", "/v1/admin/reload", AUTHORIZED),
        ),
        (
            make_client(preload=False, model_uri="/no/such/model"),
            "model_not_ready",
            ("POST", "/v1/predict", _instances([unit_instance()])),
        ),
    ]
    for client, code, case in cases:
        _check(client, code, case)


def test_a_logged_prediction_with_a_wrong_label_is_invalid_label(client: TestClient) -> None:
    r = client.post("/v1/predict", **_instances([unit_instance()]))  # type: ignore[arg-type]
    assert r.status_code == 200
    predlog = client.app.state.service.predlog  # type: ignore[attr-defined]
    predlog.flush()  # rows are written by a background thread
    body = {"request_id": r.headers["x-request-id"], "label": "not-a-class"}
    _check(client, "invalid_label", ("POST", "/v1/feedback", _json(json.dumps(body))))
