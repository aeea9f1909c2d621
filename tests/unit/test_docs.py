"""The documentation: `mkdocs build --strict` offline, reference pages generated from the
code, and the files and links the README and docs promise."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def _hooks() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "visionops_docs_hooks", REPO / "docs" / "hooks.py"
    )
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class _Loader(yaml.SafeLoader):
    """mkdocs.yml with its !!python/name tags read as plain strings."""


_Loader.add_multi_constructor("tag:yaml.org,2002:python/name:", lambda loader, suffix, node: suffix)


def _mkdocs_config() -> dict:
    return yaml.load((REPO / "mkdocs.yml").read_text(), Loader=_Loader)


def _nav_files(nav: list) -> list[str]:
    out = []
    for item in nav:
        value = next(iter(item.values())) if isinstance(item, dict) else item
        out += _nav_files(value) if isinstance(value, list) else [value]
    return out


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("site")
    env = {
        **os.environ,
        # The build must not need the network.
        "HTTP_PROXY": "http://127.0.0.1:9",
        "HTTPS_PROXY": "http://127.0.0.1:9",
        "http_proxy": "http://127.0.0.1:9",
        "https_proxy": "http://127.0.0.1:9",
        "NO_MKDOCS_2_WARNING": "1",
    }
    started = time.perf_counter()
    proc = subprocess.run(
        [str(BIN / "mkdocs"), "build", "--strict", "-f", str(REPO / "mkdocs.yml"), "-d", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert time.perf_counter() - started < 60
    return out


def test_site_builds_strict_with_every_nav_page(site: Path) -> None:
    generated = set(_hooks().GENERATED)
    for page in _nav_files(_mkdocs_config()["nav"]):
        assert (REPO / "docs" / page).is_file() or page in generated, page
        html = site / ("index.html" if page == "index.md" else page.removesuffix(".md"))
        assert (html / "index.html" if html.suffix != ".html" else html).is_file(), page


def test_nav_has_the_promised_pages() -> None:
    pages = set(_nav_files(_mkdocs_config()["nav"]))
    assert {
        "getting-started.md",
        "concepts/pipeline.md",
        "concepts/registry-and-gate.md",
        "concepts/serving.md",
        "concepts/monitoring.md",
        "http-api.md",
        "reference/cli.md",
        "reference/configuration.md",
        "architecture.md",
        "scaling.md",
        "development.md",
        "example-pr-report.md",
    } <= pages


def test_cli_reference_lists_every_command(site: Path) -> None:
    hooks = _hooks()
    markdown = hooks.cli_markdown()
    commands = hooks.command_paths()[1:]
    assert "visionops report compare" in commands and "visionops monitor check" in commands
    assert len(commands) >= 20
    for command in commands:
        assert f"## `{command}`" in markdown, command
    assert "--base <str>" in markdown and "-s, --set" in markdown
    html = (site / "reference" / "cli" / "index.html").read_text()
    assert "visionops report compare" in html


def test_configuration_reference_lists_every_param_with_a_description(site: Path) -> None:
    from pydantic import BaseModel

    from visionops.config import Params

    markdown = _hooks().config_markdown()
    for name, field in Params.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            for key in annotation.model_fields:
                assert f"| `{name}.{key}` |" in markdown, f"{name}.{key}"
        else:
            assert f"| `{name}` |" in markdown, name
    # pydantic descriptions, and params.yaml comments where a field has none
    assert "cap on training images" in markdown
    assert "mnist | cifar10 | imagefolder".replace("|", "\\|") in markdown
    assert "≥ 1" in markdown
    html = (site / "reference" / "configuration" / "index.html").read_text()
    assert "train.epochs" in html


def test_params_yaml_comments_are_keyed_by_dotted_path(tmp_path: Path) -> None:
    params = tmp_path / "params.yaml"
    params.write_text("seed: 1  # the seed\ndata:\n  source: x  # where\n  n: 2\nb:\n  c: 3 # c\n")
    assert _hooks().params_yaml_comments(params) == {
        "seed": "the seed",
        "data.source": "where",
        "b.c": "c",
    }


def test_http_reference_lists_the_routes(site: Path) -> None:
    markdown = _hooks().http_api_markdown()
    for route in ("/v1/predict", "/healthz", "/readyz", "/v1/model", "/metrics"):
        assert f"`{route}`" in markdown, route


def test_architecture_diagram_is_a_mermaid_block(site: Path) -> None:
    html = (site / "architecture" / "index.html").read_text()
    assert '<pre class="mermaid">' in html


def test_example_pr_report_and_its_images(site: Path) -> None:
    report = (REPO / "docs" / "example-pr-report.md").read_text()
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report)
    assert links and all(link.startswith("img/pr-report/") for link in links)
    for link in links:
        assert (REPO / "docs" / link).read_bytes()[:4] == b"\x89PNG", link
        assert (site / link).is_file(), link
    for heading in ("## Metrics", "## Params", "## Promotion gate", "## Models", "## Plots"):
        assert heading in report


def test_readme_and_contributing_links_resolve() -> None:
    for doc in (REPO / "README.md", REPO / "CONTRIBUTING.md"):
        text = doc.read_text()
        for link in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", text):
            if link.startswith(("http://", "https://", "mailto:")):
                continue
            assert (doc.parent / link).exists(), f"{doc.name}: {link}"


def test_make_help_lists_every_target() -> None:
    makefile = (REPO / "Makefile").read_text()
    phony = set(re.search(r"^\.PHONY: (.+)$", makefile, re.M).group(1).split())  # type: ignore[union-attr]
    proc = subprocess.run(["make", "-s", "help"], cwd=REPO, capture_output=True, text=True)
    listed = set(re.findall(r"^\s+(?:\x1b\[\d+m)?([\w-]+)", proc.stdout, re.M))
    assert "docs" in phony
    assert phony <= listed, sorted(phony - listed)
