"""`visionops report compare`: the pull-request report.

Pure pieces (directions, verdicts, params diff, metrics-file bases) are checked on
hand-made values. The end-to-end test builds a real base and a real change: the
pipeline's cheap stages (ingest, prepare, train, evaluate, compare) on 300 MNIST images,
one epoch of the small MLP, in a temporary git repository whose ``main`` commits the
base's metrics and plots; the change trains with other params. The report must show
the true deltas with the right directions and link image files that exist.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from visionops.cli import app
from visionops.compare_report import (
    MetricDelta,
    confusion_from_csv,
    metric_direction,
    param_changes,
)
from visionops.snapshot import Snapshot, flatten_numbers, snapshot_from_metrics_file

REPO = Path(__file__).resolve().parents[2]
runner = CliRunner()


# --------------------------------------------------------------------------- pure


@pytest.mark.parametrize(
    ("name", "direction"),
    [
        ("accuracy", "higher"),
        ("val_accuracy", "higher"),
        ("macro_f1", "higher"),
        ("macro_precision", "higher"),
        ("per_class.3.recall", "higher"),
        ("images_per_second", "higher"),
        ("ece", "lower"),
        ("nll", "lower"),
        ("val_loss", "lower"),
        ("latency_p95_ms", "lower"),
        ("train_seconds", "lower"),
        ("errors", "lower"),
        ("parity_max_abs_diff", "lower"),
        ("params", None),
        ("n_test", None),
        ("best_epoch", None),
        ("mcnemar_p_value", None),
    ],
)
def test_metric_direction(name: str, direction: str | None) -> None:
    assert metric_direction(name) == direction


def test_verdicts_follow_the_direction() -> None:
    assert MetricDelta("eval", "cnn", "accuracy", 0.9, 0.95).verdict == "better"
    assert MetricDelta("eval", "cnn", "accuracy", 0.95, 0.9).verdict == "worse"
    assert MetricDelta("eval", "cnn", "ece", 0.02, 0.01).verdict == "better"
    assert MetricDelta("eval", "cnn", "nll", 0.01, 0.02).verdict == "worse"
    assert MetricDelta("train", "cnn", "params", 10, 20).verdict == "changed"
    assert MetricDelta("eval", "cnn", "accuracy", 0.9, 0.9).verdict == "same"
    assert MetricDelta("eval", "cnn", "accuracy", None, 0.9).verdict == "added"
    assert MetricDelta("eval", "cnn", "accuracy", 0.9, None).verdict == "removed"
    assert MetricDelta("eval", "cnn", "accuracy", 0.9, 0.95).delta == pytest.approx(0.05)


def test_flatten_keeps_numbers_only() -> None:
    flat = flatten_numbers(
        {"a": 1, "b": {"c": 0.5, "d": True, "e": "x", "f": [1, 2]}, "g": float("nan")}
    )
    assert flat == {"a": 1.0, "b.c": 0.5}


def test_param_changes_lists_changed_added_and_removed_keys() -> None:
    base = Snapshot("main", "git", {"params.yaml": {"seed": 1, "train": {"lr": 0.1, "x": 1}}})
    new = Snapshot("ws", "directory", {"params.yaml": {"seed": 1, "train": {"lr": 0.2, "y": 2}}})
    changes = {c.key: (c.base, c.new, c.status) for c in param_changes(base, new) or []}
    assert changes == {
        "train.lr": (0.1, 0.2, "changed"),
        "train.y": (None, 2, "added"),
        "train.x": (1, None, "removed"),
    }
    assert param_changes(Snapshot("m", "metrics-file", {}), new) is None


def test_dvc_metrics_show_json_is_a_base(tmp_path: Path) -> None:
    shown = {
        "workspace": {
            "data": {
                "metrics/eval/cnn.json": {"data": {"accuracy": 0.9, "ece": 0.01}},
                "metrics/train/cnn.json": {"data": {"val_accuracy": 0.91}},
            }
        }
    }
    path = tmp_path / "base.json"
    path.write_text(json.dumps(shown))
    snap = snapshot_from_metrics_file(path)
    assert snap.matching("metrics/eval/*.json") == {"cnn": {"accuracy": 0.9, "ece": 0.01}}
    plain = tmp_path / "plain.json"
    plain.write_text(json.dumps({"metrics/eval/mlp.json": {"accuracy": 0.5}}))
    assert snapshot_from_metrics_file(plain).matching("metrics/eval/*.json") == {
        "mlp": {"accuracy": 0.5}
    }


def test_git_base_of_a_project_below_the_repository_top(tmp_path: Path) -> None:
    from visionops.snapshot import snapshot_from_git

    project = tmp_path / "ml" / "digits"
    (project / "metrics" / "eval").mkdir(parents=True)
    (project / "metrics" / "eval" / "cnn.json").write_text('{"accuracy": 0.5}')
    (project / "params.yaml").write_text("seed: 3\n")
    (tmp_path / "metrics").mkdir()  # outside the project: not its metrics
    (tmp_path / "metrics" / "gate.json").write_text("{}")
    _git(tmp_path, "init", "-q", "-b", "main")
    _git(tmp_path, "add", "-A")
    _git(tmp_path, "commit", "-qm", "base")
    snap = snapshot_from_git("main", project)
    assert snap.files == {"metrics/eval/cnn.json": {"accuracy": 0.5}, "params.yaml": {"seed": 3}}


def test_confusion_from_csv_orders_numeric_classes() -> None:
    cm, classes = confusion_from_csv("actual,predicted\n10,10\n2,10\n2,2\n", None)
    assert classes == ["2", "10"]
    assert cm.tolist() == [[1, 1], [0, 1]]


def test_plain_report_command_still_runs_the_pipeline_report(tmp_path: Path, monkeypatch) -> None:
    """`visionops report` (dvc.yaml's report stage) keeps working beside `report compare`."""
    from visionops import report

    seen: dict[str, Any] = {}

    class Done:
        def describe(self) -> str:
            return "stub report written"

    def fake_run_report(params: Any, layout: Any) -> Done:
        seen["source"] = params.data.source
        return Done()

    monkeypatch.setattr(report, "run_report", fake_run_report)
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["report", "--set", "data.source=cifar10"])
    assert result.exit_code == 0, result.output
    assert seen == {"source": "cifar10"}
    assert "stub report written" in result.output


def test_unknown_base_is_one_line_and_exit_2(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "metrics").mkdir()
    (tmp_path / "metrics" / "gate.json").write_text("{}")
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["report", "compare", "--base", "no-such-ref"])
    assert result.exit_code == 2
    assert "no-such-ref" in result.output
    assert "Traceback" not in result.output


def test_workspace_without_metrics_is_refused(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["report", "compare", "--base", str(tmp_path)])
    assert result.exit_code == 2
    assert "dvc repro" in result.output


# --------------------------------------------------------------------------- end to end

TINY: dict[str, Any] = {
    "data": {"path": str(REPO / "data" / "raw" / "mnist"), "limit": 300, "test_limit": 200},
    "train": {
        "models": ["mlp"],
        "epochs": 1,
        "width": 8,
        "batch_size": 32,
        "num_threads": 1,
        "min_steps": 0,
    },
    "evaluate": {"gallery_size": 4},
}
CHANGE = {"train": {"lr": 0.0003, "label_smoothing": 0.1}}


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        out[key] = _merge(out.get(key, {}), value) if isinstance(value, dict) else value
    return out


def _git(ws: Path, *args: str) -> str:
    env = {
        **os.environ,
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@example.com",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@example.com",
    }
    proc = subprocess.run(["git", *args], cwd=ws, env=env, check=True, capture_output=True)
    return proc.stdout.decode().strip()


def _stages(ws: Path, raw: dict[str, Any], first: bool) -> None:
    """The cheap pipeline stages, in-process, without MLflow; then a gate decision."""
    from visionops.config import params_from_dict
    from visionops.data.ingest import run_ingest
    from visionops.data.prepare import run_prepare
    from visionops.evaluate import run_compare, run_evaluate
    from visionops.layout import Layout
    from visionops.train import run_train

    (ws / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    params, layout = params_from_dict(raw), Layout.at(ws)
    if first:
        run_ingest(params, layout)
        run_prepare(params, layout)
    run_train(params, layout, "mlp")
    result = run_evaluate(params, layout, "mlp")
    run_compare(params, layout)
    gate = {
        "promoted": first,
        "challenger_version": 1 if first else 2,
        "champion_version_before": None if first else 1,
        "challenger_accuracy": result.accuracy,
        "latency_p95_ms": 0.5 if first else 0.25,
        "reasons": ["no champion yet"] if first else ["accuracy lower than the champion's"],
        "checks": {"latency": {"passed": True, "value": 0.5, "threshold": 10.0}},
    }
    # As the gate writes them: headline numbers in metrics/, the decision in reports/.
    layout.gate_report.parent.mkdir(parents=True, exist_ok=True)
    layout.gate_report.write_text(json.dumps(gate))
    headline = {k: v for k, v in gate.items() if k not in {"reasons", "checks"}}
    layout.gate_json.write_text(json.dumps(headline))


@pytest.fixture(scope="module")
def change_workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A git repo: ``main`` commits the base's outputs; the worktree holds the change's."""
    ws = tmp_path_factory.mktemp("compare")
    base_raw = _merge(yaml.safe_load((REPO / "params.yaml").read_text()), TINY)
    _stages(ws, base_raw, first=True)
    (ws / "base-copy").mkdir()
    for folder in ("metrics", "plots"):
        subprocess.run(["cp", "-r", str(ws / folder), str(ws / "base-copy")], check=True)
    (ws / "base-copy" / "params.yaml").write_text((ws / "params.yaml").read_text())
    _git(ws, "init", "-q", "-b", "main")
    _git(ws, "add", "metrics", "plots", "params.yaml")
    _git(ws, "commit", "-qm", "base")
    _stages(ws, _merge(base_raw, CHANGE), first=False)
    return ws


def _table_rows(report: str) -> dict[tuple[str, str, str], list[str]]:
    rows = {}
    for line in report.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 7 and cells[1] in {"eval", "train", "gate"}:
            rows[(cells[0], cells[1], cells[2])] = cells[3:]
    return rows


def _expected_verdict(name: str, base: float, new: float) -> str:
    if new == base:
        return "same"
    if name in {"accuracy", "macro_f1", "val_accuracy"}:
        return "better" if new > base else "worse"
    if name in {"ece", "nll", "val_loss", "latency_p95_ms"}:
        return "better" if new < base else "worse"
    raise AssertionError(name)


@pytest.mark.slow
def test_report_against_main_shows_deltas_directions_params_gate_and_images(
    change_workspace: Path, monkeypatch
) -> None:
    ws = change_workspace
    monkeypatch.chdir(ws)
    result = runner.invoke(app, ["report", "compare", "--base", "main", "--out", "out/report.md"])
    assert result.exit_code == 0, result.output
    report = (ws / "out" / "report.md").read_text()

    base_eval = json.loads((ws / "base-copy" / "metrics" / "eval" / "mlp.json").read_text())
    new_eval = json.loads((ws / "metrics" / "eval" / "mlp.json").read_text())
    base_train = json.loads((ws / "base-copy" / "metrics" / "train" / "mlp.json").read_text())
    new_train = json.loads((ws / "metrics" / "train" / "mlp.json").read_text())
    assert new_eval["nll"] != base_eval["nll"], "the change must change the model"

    rows = _table_rows(report)
    checked = [
        ("eval", name, base_eval[name], new_eval[name])
        for name in ("accuracy", "macro_f1", "ece", "nll")
    ] + [
        ("train", name, base_train[name], new_train[name]) for name in ("val_accuracy", "val_loss")
    ]
    for source, name, base, new in checked:
        cells = rows[("mlp", source, name)]
        assert float(cells[0]) == pytest.approx(base, abs=5e-5), name
        assert float(cells[1]) == pytest.approx(new, abs=5e-5), name
        if new != base:
            delta = float(cells[2].split()[0])
            assert delta == pytest.approx(new - base, abs=5e-5, rel=0.05), name
        assert _expected_verdict(name, base, new) in cells[3], (name, base, new, cells)
    # The gate file's latency halved: lower is better.
    assert "better" in rows[("", "gate", "latency_p95_ms")][3]
    # The per-class table holds every class of every metric.
    assert report.count("| mlp | eval | per_class.") == 10 * 4

    # Changed params, and only those.
    params_section = report.split("## Params", 1)[1].split("##", 1)[0]
    assert "| train.lr | `0.003` | `0.0003` |" in params_section
    assert "| train.label_smoothing | `0.0` | `0.1` |" in params_section
    assert "train.epochs" not in params_section

    # The gate's decision and the comparison table.
    assert "**Not promoted**: version 2 stays `challenger`" in report
    assert "accuracy lower than the champion's" in report
    models_section = report.split("## Models", 1)[1].split("## Plots", 1)[0]
    assert f"{base_eval['accuracy']:.2%} → {new_eval['accuracy']:.2%}" in models_section

    # Images: side by side, relative links to PNG files that exist.
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report)
    assert len(links) == 4, links  # confusion matrix and learning curves, base and new
    for link in links:
        assert not Path(link).is_absolute()
        image = (ws / "out" / link).resolve()
        assert image.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", link
    assert {Path(link).parent.name for link in links} == {"report-img"}
    confusion = sorted(link for link in links if "confusion" in link)
    assert (ws / "out" / confusion[0]).read_bytes() != (ws / "out" / confusion[1]).read_bytes()


@pytest.mark.slow
def test_a_folder_and_a_metrics_file_are_bases_too(change_workspace: Path, monkeypatch) -> None:
    ws = change_workspace
    monkeypatch.chdir(ws)
    result = runner.invoke(
        app, ["report", "compare", "--base", "base-copy", "--out", "out/folder.md"]
    )
    assert result.exit_code == 0, result.output
    from_folder = (ws / "out" / "folder.md").read_text()
    from_git = (ws / "out" / "report.md").read_text() if (ws / "out" / "report.md").exists() else ""
    assert "(folder)" in from_folder
    if from_git:
        assert _table_rows(from_folder) == _table_rows(from_git)

    base_eval = json.loads((ws / "base-copy" / "metrics" / "eval" / "mlp.json").read_text())
    (ws / "base.json").write_text(json.dumps({"metrics/eval/mlp.json": base_eval}))
    result = runner.invoke(
        app, ["report", "compare", "--base", "base.json", "--out", "out/file.md"]
    )
    assert result.exit_code == 0, result.output
    from_file = (ws / "out" / "file.md").read_text()
    accuracy = _table_rows(from_file)[("mlp", "eval", "accuracy")]
    assert float(accuracy[0]) == pytest.approx(base_eval["accuracy"], abs=5e-5)
    assert "(no data)" in from_file  # a metrics file has no plots
    assert "Params not compared" in from_file


@pytest.mark.slow
def test_a_base_without_committed_metrics_says_how_to_commit_them(
    change_workspace: Path, tmp_path: Path, monkeypatch
) -> None:
    ws = change_workspace
    # A branch whose commit holds nothing (the worktree is left alone).
    empty_tree = _git(ws, "hash-object", "-w", "-t", "tree", "/dev/null")
    _git(ws, "update-ref", "refs/heads/empty", _git(ws, "commit-tree", empty_tree, "-m", "none"))
    monkeypatch.chdir(ws)
    result = runner.invoke(
        app, ["report", "compare", "--base", "empty", "--out", str(tmp_path / "r.md")]
    )
    assert result.exit_code == 0, result.output
    text = (tmp_path / "r.md").read_text()
    assert "git add dvc.lock metrics plots params.yaml" in text
    assert "| mlp | eval | accuracy | — |" in text
