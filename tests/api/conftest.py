"""Fixtures for the API tests: the real app on a tiny real ONNX model."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from serve_fixtures import build_tiny_model

from visionops.config import ServeParams
from visionops.serve.app import create_app
from visionops.serve.model import LoadedModel, ResolvedModel, load_model
from visionops.serve.service import ServeSettings

ADMIN_TOKEN = "test-admin-token"


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-model") / "exported")


@pytest.fixture(scope="session")
def tiny_model(tiny_model_dir: Path) -> LoadedModel:
    """Loaded once per session; an ORT session is safe to share between apps."""
    return load_model(ResolvedModel(tiny_model_dir, None, None, None), threads=1)


@pytest.fixture
def predlog_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'predictions.db'}"


def wait_ready(client: TestClient, attempts: int = 200) -> None:
    """Poll /readyz (the model loads in the background when not passed in)."""
    for _ in range(attempts):
        if client.get("/readyz").status_code == 200:
            return
        time.sleep(0.05)
    raise AssertionError(f"never ready: {client.get('/readyz').json()}")


MakeClient = Callable[..., TestClient]


@pytest.fixture
def make_client(
    tiny_model_dir: Path, tiny_model: LoadedModel, predlog_url: str
) -> Iterator[MakeClient]:
    """Build an app with overridden serve params/settings and enter its lifespan."""
    stack: list[TestClient] = []

    def make(
        serve: dict[str, Any] | None = None,
        preload: bool = True,
        raise_server_exceptions: bool = True,
        **settings: Any,
    ) -> TestClient:
        base: dict[str, Any] = {
            "model_uri": str(tiny_model_dir),
            "serve": ServeParams(**(serve or {})),
            "admin_token": ADMIN_TOKEN,
            "predlog_url": predlog_url,
            "threads": 1,
        }
        base.update(settings)
        app = create_app(ServeSettings(**base), model=tiny_model if preload else None)
        client = TestClient(app, raise_server_exceptions=raise_server_exceptions)
        client.__enter__()
        stack.append(client)
        if preload:
            assert client.get("/readyz").status_code == 200
        return client

    yield make
    for client in reversed(stack):
        client.__exit__(None, None, None)


@pytest.fixture
def client(make_client: MakeClient) -> TestClient:
    return make_client()
