"""The CLI's edges: every subcommand has --help; bad input is one line and exit code 2."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from visionops.cli import app

runner = CliRunner()

COMMANDS = [
    ["ingest"],
    ["download"],
    ["validate"],
    ["prepare"],
    ["train"],
    ["tune"],
    ["evaluate"],
    ["compare"],
    ["export"],
    ["register"],
    ["gate"],
    ["promote"],
    ["rollback"],
    ["report"],
    ["report", "compare"],
    ["pipeline", "run"],
    ["pipeline", "summary"],
    ["serve"],
    ["predlog", "export"],
]


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c))
def test_every_subcommand_has_help(command: list[str]) -> None:
    result = runner.invoke(app, [*command, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage" in result.output


def test_wrong_param_key_exits_2_with_the_key_named(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["prepare", "--set", "train.epochz=1"])
    assert result.exit_code == 2
    assert "train.epochz" in result.output
    assert "Traceback" not in result.output


def test_missing_params_file_exits_2(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["validate", "--params", "missing.yaml"])
    assert result.exit_code == 2
    assert "missing.yaml" in result.output


def test_download_from_a_local_mirror_restores_a_missing_file(tmp_path: Path, monkeypatch) -> None:
    """`visionops download` fetches a missing MNIST file from a mirror and checks its sum."""
    import shutil

    repo_mnist = Path(__file__).resolve().parents[2] / "data" / "raw" / "mnist"
    mirror = tmp_path / "mirror"
    shutil.copytree(repo_mnist, mirror)
    local = tmp_path / "data" / "raw" / "mnist"
    shutil.copytree(repo_mnist, local)
    (local / "t10k-labels-idx1-ubyte.gz").unlink()
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["download", "--mirror", mirror.as_uri()])
    assert result.exit_code == 0, result.output
    assert "1 file(s) fetched" in result.output
    restored = (local / "t10k-labels-idx1-ubyte.gz").read_bytes()
    assert restored == (repo_mnist / "t10k-labels-idx1-ubyte.gz").read_bytes()
    # An altered mirror is refused and leaves nothing behind.
    (local / "t10k-labels-idx1-ubyte.gz").unlink()
    (mirror / "t10k-labels-idx1-ubyte.gz").write_bytes(b"not mnist")
    result = runner.invoke(app, ["download", "--mirror", mirror.as_uri()])
    assert result.exit_code == 2
    assert "sha256" in result.output
    assert not (local / "t10k-labels-idx1-ubyte.gz").exists()
