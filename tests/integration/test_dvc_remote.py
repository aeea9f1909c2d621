"""The DVC remote: the committed `.dvc/config` names a default remote outside the
repository, `dvc push` fills it, and a fresh `git clone` next to the repository gets
identical files with `dvc pull`, with nothing to configure.

A tiny repository (a few files, one of them binary) stands in for the project: the
mechanism is the same and it takes seconds, not a pipeline run.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
DVC = str(Path(sys.executable).parent / "dvc")


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DVC_")}
    env.update(
        GIT_AUTHOR_NAME="t",
        GIT_AUTHOR_EMAIL="t@example.com",
        GIT_COMMITTER_NAME="t",
        GIT_COMMITTER_EMAIL="t@example.com",
        DVC_NO_ANALYTICS="1",
        # Nothing here may need the network.
        HTTP_PROXY="http://127.0.0.1:9",
        HTTPS_PROXY="http://127.0.0.1:9",
    )
    return env


def _run(args: list[str], cwd: Path) -> str:
    proc = subprocess.run(args, cwd=cwd, env=_env(), capture_output=True, text=True)
    assert proc.returncode == 0, f"{args}:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def _digests(folder: Path) -> dict[str, str]:
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _remote_url() -> str:
    """The default remote's URL, read the way DVC reads its config (configobj)."""
    from configobj import ConfigObj

    config = ConfigObj(str(REPO / ".dvc" / "config"))
    default = config["core"]["remote"]
    return str(config[f'remote "{default}"']["url"])


def test_the_committed_default_remote_lies_outside_the_repository() -> None:
    url = _remote_url()
    assert "://" not in url, "the default is a local folder"
    resolved = (REPO / ".dvc" / url).resolve()
    assert REPO.resolve() not in resolved.parents and resolved != REPO.resolve()
    assert resolved.parent == REPO.resolve().parent  # beside the repository


def test_push_then_pull_in_a_fresh_clone_gives_identical_files(tmp_path: Path) -> None:
    origin = tmp_path / "project"
    data = origin / "data" / "images"
    data.mkdir(parents=True)
    (data / "a.txt").write_text("alpha\n")
    (data / "b.bin").write_bytes(os.urandom(4096))
    (data / "nested").mkdir()
    (data / "nested" / "c.txt").write_text("gamma\n")
    (origin / "model.bin").write_bytes(os.urandom(1024))

    _run(["git", "init", "-q", "-b", "main"], origin)
    _run([DVC, "init", "-q"], origin)
    # The project's own remote configuration, verbatim.
    shutil.copy(REPO / ".dvc" / "config", origin / ".dvc" / "config")
    _run([DVC, "add", "-q", "data/images", "model.bin"], origin)
    _run(["git", "add", "-A"], origin)
    _run(["git", "commit", "-qm", "data"], origin)
    _run([DVC, "push", "-q"], origin)

    remote = (origin / ".dvc" / _remote_url()).resolve()
    assert remote == tmp_path / "visionops-dvc-remote"
    assert any(p.is_file() for p in remote.rglob("*")), "dvc push wrote nothing"

    clone = tmp_path / "clone"
    _run(["git", "clone", "-q", str(origin), str(clone)], tmp_path)
    assert not (clone / "data" / "images").exists() and not (clone / "model.bin").exists()
    _run([DVC, "pull", "-q"], clone)
    assert _digests(clone / "data" / "images") == _digests(data)
    assert (clone / "model.bin").read_bytes() == (origin / "model.bin").read_bytes()
    status = _run([DVC, "status", "--cloud", "--json"], clone)
    assert status.strip() in {"{}", ""}
