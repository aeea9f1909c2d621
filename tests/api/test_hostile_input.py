"""Hostile and broken input: always a JSON 4xx, never a 500, and the service carries on.

The corpus is generated here (no fixture files): broken images, bombs, wrong formats,
oversize and malformed bodies, and JSON of every wrong shape.
"""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from serve_fixtures import digit_png, encode, server_process, stroke_image, unit_instance

from conftest import MakeClient
from visionops.serve.predlog import count_predictions

# Small limits so the oversize cases stay small and fast.
LIMITS = {"max_body_bytes": 200_000, "max_files": 4, "max_pixels": 1_000_000}


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_with_header(width: int, height: int) -> bytes:
    """A PNG whose IHDR declares ``width``×``height`` but carries almost no data (a bomb)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + png_chunk(b"IDAT", idat)
        + png_chunk(b"IEND", b"")
    )


def corrupt_middle(data: bytes) -> bytes:
    mid = len(data) // 2
    return data[:mid] + bytes(b ^ 0xFF for b in data[mid : mid + 16]) + data[mid + 16 :]


def tiff_bytes() -> bytes:
    return encode(stroke_image("one", size=28), "TIFF")


def ico_bytes() -> bytes:
    return encode(stroke_image("one", size=32), "ICO")


def big_jpeg() -> bytes:
    return encode(stroke_image("one", size=300), "JPEG", quality=95)


def files(*items: tuple[str, bytes]) -> dict[str, Any]:
    return {"files": [("files", (name, data, "application/octet-stream")) for name, data in items]}


def raw(body: bytes, content_type: str | None) -> dict[str, Any]:
    headers = {"content-type": content_type} if content_type else {}
    return {"content": body, "headers": headers}


def jbody(text: str | bytes) -> dict[str, Any]:
    data = text.encode() if isinstance(text, str) else text
    return raw(data, "application/json")


def chunked(total: int) -> dict[str, Any]:
    """A body with no Content-Length (chunked): only counting the stream can stop it."""

    def gen() -> Iterator[bytes]:
        sent = 0
        while sent < total:
            yield b"x" * 10_000
            sent += 10_000

    return {"content": gen(), "headers": {"content-type": "application/json"}}


@dataclass(frozen=True)
class Case:
    name: str
    request: Callable[[], dict[str, Any]]
    statuses: tuple[int, ...]
    code: str | None = None
    method: str = "POST"
    path: str = "/v1/predict"


_PNG = digit_png("one")
_JPEG = encode(stroke_image("one"), "JPEG", quality=90)

CORPUS: list[Case] = [
    # ---- not images / broken images
    Case("zero-bytes", lambda: files(("empty.png", b"")), (400,), "invalid_image"),
    Case(
        "text-file",
        lambda: files(("notes.png", b"hello, I am not an image\n" * 10)),
        (400,),
        "invalid_image",
    ),
    Case(
        "html-file",
        lambda: files(("x.png", b"<html><script>alert(1)</script></html>")),
        (400,),
        "invalid_image",
    ),
    Case("png-signature-only", lambda: files(("sig.png", _PNG[:8])), (400,), "invalid_image"),
    Case(
        "truncated-png",
        lambda: files(("half.png", _PNG[: len(_PNG) // 2])),
        (400,),
        "invalid_image",
    ),
    Case(
        "corrupt-png-data",
        lambda: files(("bad.png", corrupt_middle(_PNG))),
        (400,),
        "invalid_image",
    ),
    Case(
        "truncated-jpeg",
        lambda: files(("half.jpg", _JPEG[: len(_JPEG) // 2])),
        (400,),
        "invalid_image",
    ),
    Case("jpeg-header-only", lambda: files(("head.jpg", _JPEG[:20])), (400,), "invalid_image"),
    Case("png-zero-width", lambda: files(("w0.png", png_with_header(0, 28))), (400,), None),
    Case(
        "random-bytes", lambda: files(("rnd.bin", bytes(range(256)) * 8)), (400,), "invalid_image"
    ),
    # ---- unsupported formats
    Case("tiff", lambda: files(("scan.tif", tiff_bytes())), (415,), "unsupported_media_type"),
    Case("ico", lambda: files(("fav.ico", ico_bytes())), (415,), "unsupported_media_type"),
    Case(
        "svg",
        lambda: files(("x.svg", b'<svg xmlns="http://www.w3.org/2000/svg"/>')),
        (415,),
        "unsupported_media_type",
    ),
    Case(
        "pdf",
        lambda: files(("doc.pdf", b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n")),
        (415,),
        "unsupported_media_type",
    ),
    # ---- decompression bombs: refused from the header, before decoding pixels
    Case(
        "bomb-100k-square",
        lambda: files(("bomb.png", png_with_header(100_000, 100_000))),
        (400, 413),
    ),
    Case(
        "bomb-just-over-limit",
        lambda: files(("big.png", png_with_header(1001, 1000))),
        (400, 413),
        "image_too_large",
    ),
    # ---- too many / too big
    Case(
        "too-many-files",
        lambda: files(*[(f"{i}.png", _PNG) for i in range(5)]),
        (413,),
        "too_many_files",
    ),
    Case(
        "oversize-body", lambda: files(("big.bin", b"\x00" * 250_000)), (413,), "payload_too_large"
    ),
    Case("oversize-chunked-body", lambda: chunked(400_000), (413,), "payload_too_large"),
    Case(
        "oversize-json",
        lambda: jbody('{"instances": [' + "0," * 150_000 + "0]}"),
        (413,),
        "payload_too_large",
    ),
    # ---- multipart shape
    Case(
        "multipart-wrong-field",
        lambda: {"files": [("file", ("a.png", _PNG, "image/png"))]},
        (422,),
        "missing_field",
    ),
    Case(
        "multipart-text-field",
        lambda: {
            "data": {"files": "not a file"},
            "files": [("other", ("a.png", _PNG, "image/png"))],
        },
        (422,),
        "invalid_field",
    ),
    Case(
        "multipart-no-boundary",
        lambda: raw(b"--x\r\n\r\n", "multipart/form-data"),
        (400,),
        "invalid_multipart",
    ),
    Case(
        "multipart-garbage",
        lambda: raw(b"\x00\x01garbage", "multipart/form-data; boundary=abc"),
        (400, 422),
    ),
    # ---- content types
    Case("no-content-type", lambda: raw(_PNG, None), (415,), "unsupported_media_type"),
    Case("text-plain", lambda: raw(b"1,2,3", "text/plain"), (415,), "unsupported_media_type"),
    Case("raw-image-png", lambda: raw(_PNG, "image/png"), (415,), "unsupported_media_type"),
    Case(
        "form-urlencoded",
        lambda: raw(b"instances=1", "application/x-www-form-urlencoded"),
        (415,),
        "unsupported_media_type",
    ),
    # ---- JSON of the wrong shape or values
    Case("json-syntax-error", lambda: jbody('{"instances": [[[0, 1]]'), (400,), "invalid_json"),
    Case("json-empty-body", lambda: jbody(""), (400,), "invalid_json"),
    Case("json-invalid-utf8", lambda: jbody(b'{"instances": "\xff\xfe"}'), (400, 422)),
    Case("json-top-level-list", lambda: jbody("[[[0, 1]]]"), (422,), "invalid_instances"),
    Case("json-missing-instances", lambda: jbody("{}"), (422,), "invalid_instances"),
    Case(
        "json-unknown-key",
        lambda: jbody('{"instances": [[[0]]], "extra": 1}'),
        (422,),
        "invalid_instances",
    ),
    Case("json-empty-instances", lambda: jbody('{"instances": []}'), (422,), "invalid_instances"),
    Case(
        "json-instances-not-list",
        lambda: jbody('{"instances": "zero"}'),
        (422,),
        "invalid_instances",
    ),
    Case(
        "json-2d-not-wrapped",
        lambda: jbody('{"instances": [[0, 1], [1, 0]]}'),
        (422,),
        "invalid_instances",
    ),
    Case("json-4d", lambda: jbody('{"instances": [[[[0, 1]]]]}'), (422,), "invalid_instances"),
    Case(
        "json-ragged-rows",
        lambda: jbody('{"instances": [[[0, 1], [1]]]}'),
        (422,),
        "invalid_instances",
    ),
    Case("json-empty-rows", lambda: jbody('{"instances": [[[]]]}'), (422,), "invalid_instances"),
    Case(
        "json-strings",
        lambda: jbody('{"instances": [[["0.5", "1"]]]}'),
        (422,),
        "invalid_instances",
    ),
    Case(
        "json-booleans",
        lambda: jbody('{"instances": [[[true, false]]]}'),
        (422,),
        "invalid_instances",
    ),
    Case("json-nulls", lambda: jbody('{"instances": [[[null, 1]]]}'), (422,), "invalid_instances"),
    Case(
        "json-nested-objects",
        lambda: jbody('{"instances": [{"pixels": [0, 1]}]}'),
        (422,),
        "invalid_instances",
    ),
    Case("json-nan", lambda: jbody('{"instances": [[[NaN, 0.5]]]}'), (422,), "invalid_instances"),
    Case(
        "json-infinity",
        lambda: jbody('{"instances": [[[Infinity, 0.5]]]}'),
        (422,),
        "invalid_instances",
    ),
    Case(
        "json-overflow",
        lambda: jbody('{"instances": [[[1e999, 0.5]]]}'),
        (422,),
        "invalid_instances",
    ),
    Case(
        "json-above-one",
        lambda: jbody('{"instances": [[[0.5, 2.0]]]}'),
        (422,),
        "invalid_instances",
    ),
    Case(
        "json-negative",
        lambda: jbody('{"instances": [[[-0.1, 0.5]]]}'),
        (422,),
        "invalid_instances",
    ),
    Case(
        "json-0-to-255-scale",
        lambda: jbody('{"instances": [[[0, 255], [128, 0]]]}'),
        (422,),
        "invalid_instances",
    ),
    Case(
        "json-too-many-instances",
        lambda: jbody('{"instances": ' + str([[[0.0]]] * 5) + "}"),
        (413,),
        "too_many_files",
    ),
    Case(
        "json-deeply-nested",
        lambda: jbody('{"instances": ' + "[" * 5000 + "]" * 5000 + "}"),
        (400, 422),
    ),
    Case(
        "json-huge-number-string",
        lambda: jbody('{"instances": [[[' + "9" * 5000 + "]]]}"),
        (400, 422),
    ),
    # ---- wrong routes and methods
    Case("get-predict", lambda: {}, (405,), "method_not_allowed", method="GET"),
    Case(
        "unknown-route", lambda: {}, (404,), "not_found", method="GET", path="/v1/../../etc/passwd"
    ),
    Case("reload-no-token", lambda: {}, (401,), "unauthorized", path="/v1/admin/reload"),
]


@pytest.fixture
def limited(make_client: MakeClient) -> TestClient:
    return make_client(serve=LIMITS)


def send(client: TestClient, case: Case) -> Any:
    return client.request(case.method, case.path, **case.request())


def assert_still_serving(client: TestClient) -> None:
    ok = client.post("/v1/predict", files=[("files", ("ok.png", digit_png("zero"), "image/png"))])
    assert ok.status_code == 200, ok.text
    assert ok.json()["predictions"][0]["label"] in [str(i) for i in range(10)]
    ok = client.post("/v1/predict", json={"instances": [unit_instance("one")]})
    assert ok.status_code == 200, ok.text


def test_corpus_is_big_enough() -> None:
    assert len(CORPUS) >= 25
    assert len({c.name for c in CORPUS}) == len(CORPUS)


@pytest.mark.parametrize("case", CORPUS, ids=[c.name for c in CORPUS])
def test_hostile_request_gets_a_json_4xx(limited: TestClient, case: Case) -> None:
    r = send(limited, case)
    assert r.status_code != 500, r.text
    assert r.status_code in case.statuses, (r.status_code, r.text)
    body = r.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"code", "message"}
    assert body["error"]["message"]
    if case.code is not None:
        assert body["error"]["code"] == case.code, body
    assert "traceback" not in r.text.lower()
    assert r.headers.get("x-request-id")
    assert_still_serving(limited)


def test_whole_corpus_then_valid_requests(make_client: MakeClient, predlog_url: str) -> None:
    """One service takes the whole corpus; only the valid requests reach the log."""
    client = make_client(serve=LIMITS)
    for case in CORPUS:
        r = send(client, case)
        assert r.status_code < 500, (case.name, r.status_code, r.text)
    assert_still_serving(client)
    client.__exit__(None, None, None)  # lifespan shutdown drains the prediction log
    assert count_predictions(predlog_url) == 2


def test_error_messages_name_the_file(limited: TestClient) -> None:
    r = limited.post("/v1/predict", **files(("fine.png", _PNG), ("broken.png", _PNG[:30])))
    assert r.status_code == 400
    assert "files[1] (broken.png)" in r.json()["error"]["message"]


def test_large_but_allowed_image_is_accepted(limited: TestClient) -> None:
    r = limited.post("/v1/predict", **files(("photo.jpg", big_jpeg())))
    assert r.status_code == 200, r.text


def test_bomb_is_refused_before_decoding(
    limited: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The pixel limit is checked from the header: Image.load is never reached."""
    loads: list[str] = []
    original = Image.Image.load

    def spy(self: Image.Image) -> Any:
        loads.append(self.format or "?")
        return original(self)

    monkeypatch.setattr(Image.Image, "load", spy)
    r = limited.post("/v1/predict", **files(("bomb.png", png_with_header(50_000, 50_000))))
    assert r.status_code in (400, 413)
    assert loads == []


def test_image_bytes_in_memory_stay_small() -> None:
    """Guard for the corpus itself: the bomb really is tiny on the wire."""
    assert len(png_with_header(100_000, 100_000)) < 200
    assert Image.open(io.BytesIO(png_with_header(100, 100))).size == (100, 100)


@pytest.mark.slow
def test_oversize_bodies_over_real_http(tiny_model_dir: Path, tmp_path: Path) -> None:
    """Through uvicorn: 413 by Content-Length and by counting a chunked stream, then 200."""
    (tmp_path / "params.yaml").write_text("serve:\n  max_body_bytes: 100000\n")
    env = {"VISIONOPS_PREDLOG_URL": f"sqlite:///{tmp_path / 'p.db'}"}
    with (
        server_process(tiny_model_dir, tmp_path, env=env) as server,
        httpx.Client(base_url=server.url, timeout=30) as client,
    ):
        for _ in range(2):
            big = [("files", ("big.png", b"\x00" * 1_000_000, "image/png"))]
            r = client.post("/v1/predict", files=big)
            assert r.status_code == 413 and r.json()["error"]["code"] == "payload_too_large"

            def stream() -> Iterator[bytes]:
                for _ in range(100):
                    yield b"x" * 10_000

            r = client.post(
                "/v1/predict", content=stream(), headers={"content-type": "application/json"}
            )
            assert r.status_code == 413 and r.json()["error"]["code"] == "payload_too_large"
            ok = client.post("/v1/predict", files=[("files", ("ok.png", _PNG, "image/png"))])
            assert ok.status_code == 200


@pytest.mark.slow
def test_a_client_that_sends_everything_before_reading_gets_the_413(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    """urllib writes the whole 6 MB body before it reads: it must read a JSON 413, not a
    connection reset (the server reads and discards the body before closing)."""
    import json
    import urllib.error
    import urllib.request

    (tmp_path / "params.yaml").write_text("serve:\n  max_body_bytes: 5242880\n")
    env = {"VISIONOPS_PREDLOG_URL": f"sqlite:///{tmp_path / 'p.db'}"}
    with server_process(tiny_model_dir, tmp_path, env=env) as server:
        for _ in range(3):
            request = urllib.request.Request(
                f"{server.url}/v1/predict",
                data=b"\x00" * (6 * 1024 * 1024),
                headers={"Content-Type": "multipart/form-data; boundary=x"},
                method="POST",
            )
            with pytest.raises(urllib.error.HTTPError) as caught:
                urllib.request.urlopen(request, timeout=60)
            assert caught.value.code == 413
            assert json.loads(caught.value.read())["error"]["code"] == "payload_too_large"
        r = httpx.post(
            f"{server.url}/v1/predict", files=[("files", ("a.png", digit_png(), "image/png"))]
        )
        assert r.status_code == 200
