"""Typed params: defaults, overrides, and errors that name the offending key."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from visionops.config import Params, apply_overrides, load_params, params_to_yaml
from visionops.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]


def test_repository_params_yaml_is_valid_and_matches_defaults() -> None:
    params = load_params(REPO / "params.yaml")
    assert params == Params()
    assert params.data.shape() == (28, 1)
    assert params.model_name() == "visionops-mnist"


def test_overrides_are_typed_and_nested() -> None:
    params = load_params(
        REPO / "params.yaml",
        ["train.epochs=1", "data.limit=2000", "train.models=[mlp]", "train.augment=false"],
    )
    assert params.train.epochs == 1
    assert params.data.limit == 2000
    assert params.train.models == ["mlp"]
    assert params.train.augment is False


def test_unknown_key_is_named(tmp_path: Path) -> None:
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["train"]["epochz"] = 3
    bad = tmp_path / "params.yaml"
    bad.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match=r"unknown key 'train\.epochz'"):
        load_params(bad)


def test_mistyped_value_is_named() -> None:
    with pytest.raises(ConfigError, match=r"'train\.epochs'.*'three'"):
        load_params(REPO / "params.yaml", ["train.epochs=three"])


def test_unknown_source_and_model_are_rejected() -> None:
    with pytest.raises(ConfigError, match=r"data\.source"):
        load_params(REPO / "params.yaml", ["data.source=svhn"])
    with pytest.raises(ConfigError, match=r"unknown model\(s\) \['vgg'\]"):
        load_params(REPO / "params.yaml", ["train.models=[cnn, vgg]"])


def test_malformed_override_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="key=value"):
        load_params(REPO / "params.yaml", ["train.epochs"])
    with pytest.raises(ConfigError, match="params file not found"):
        load_params(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="'train' is not a section"):
        apply_overrides({"train": 3}, ["train.epochs=1"])


def test_imagefolder_gets_its_own_model_name(tmp_path: Path) -> None:
    folder = tmp_path / "My Flowers"
    params = load_params(REPO / "params.yaml", ["data.source=imagefolder", f"data.path={folder}"])
    assert params.model_name() == "visionops-my-flowers"
    assert params.data.shape() == (28, 1)
    cifar = load_params(REPO / "params.yaml", ["data.source=cifar10"])
    assert cifar.data.shape() == (32, 3)


def test_params_round_trip_through_yaml(tmp_path: Path) -> None:
    params = load_params(REPO / "params.yaml", ["seed=7", "gate.latency_budget_ms=3.5"])
    path = tmp_path / "p.yaml"
    path.write_text(params_to_yaml(params))
    assert load_params(path) == params


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("postgresql://u:p@db:5432/x", "postgresql+psycopg://u:p@db:5432/x"),
        ("postgres://u@db/x", "postgresql+psycopg://u@db/x"),
        ("postgresql+psycopg2://u@/x?host=/tmp", "postgresql+psycopg://u@/x?host=/tmp"),
        ("postgresql+psycopg://u@db/x", "postgresql+psycopg://u@db/x"),
        ("sqlite:///tmp/mlflow.db", "sqlite:///tmp/mlflow.db"),
        ("http://mlflow:5000", "http://mlflow:5000"),
    ],
)
def test_database_urls_use_the_installed_postgres_driver(url: str, expected: str) -> None:
    from visionops.config import database_url

    assert database_url(url) == expected


def test_every_postgres_url_the_project_opens_gets_an_engine(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """psycopg 3 is the installed driver: a plain postgresql:// URL must not need psycopg2."""
    import sqlalchemy as sa

    from visionops.config import load_settings
    from visionops.layout import Layout
    from visionops.serve.predlog import create_predlog_engine
    from visionops.tune import resolve_storage

    url = "postgresql://u@db.invalid/x"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
    monkeypatch.setenv("VISIONOPS_PREDLOG_URL", url)
    monkeypatch.setenv("VISIONOPS_TUNE_STORAGE", url)
    settings = load_settings(tmp_path)
    layout = Layout.at(tmp_path)
    for opened in (settings.tracking_uri, settings.predlog_url, resolve_storage(None, layout)):
        assert sa.create_engine(opened).dialect.driver == "psycopg"  # no connection is made
    assert create_predlog_engine(url).dialect.driver == "psycopg"
    assert resolve_storage(url, layout).startswith("postgresql+psycopg://")


def test_ood_params_are_checked() -> None:
    params = load_params(REPO / "params.yaml", ["ood.false_rejection_rate=0.01", "ood.k=3"])
    assert (params.ood.false_rejection_rate, params.ood.k) == (0.01, 3)
    with pytest.raises(ConfigError, match=r"k \(50\) must not exceed bank_size \(20\)"):
        load_params(REPO / "params.yaml", ["ood.k=50", "ood.bank_size=20"])
    with pytest.raises(ConfigError, match=r"ood\.false_rejection_rate"):
        load_params(REPO / "params.yaml", ["ood.false_rejection_rate=0"])
