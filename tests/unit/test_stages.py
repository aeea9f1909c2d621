"""Every DVC stage declares exactly the params it reads, and `--set` is never ignored.

``visionops.stages.STAGE_PARAMS`` is the one declaration: ``dvc.yaml`` must list the
same params per stage, a stage's code can read only those (a read of any other raises),
and a real run of every stage must read every param it declares.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from PIL import Image
from typer.testing import CliRunner

from visionops import stages
from visionops.cli import app
from visionops.config import Params
from visionops.errors import ConfigError
from visionops.stages import (
    STAGE_PARAMS,
    UndeclaredParamError,
    check_overrides,
    declared_view,
    readers_of,
)

REPO = Path(__file__).resolve().parents[2]
runner = CliRunner()


def _dvc_params() -> dict[str, list[str]]:
    dvc = yaml.safe_load((REPO / "dvc.yaml").read_text())
    out = {}
    for name, stage in dvc["stages"].items():
        body = stage.get("do", stage)  # foreach stages keep theirs under `do`
        out[name] = [str(p) for p in body.get("params", [])]
    return out


def test_dvc_yaml_declares_the_params_of_visionops_stages() -> None:
    declared = _dvc_params()
    assert set(declared) == set(STAGE_PARAMS)
    for stage, params in declared.items():
        assert params == list(STAGE_PARAMS[stage]), (
            f"dvc.yaml stage '{stage}' params must be {list(STAGE_PARAMS[stage])}"
        )


def test_every_declared_param_exists() -> None:
    raw = Params().model_dump()
    for command, keys in stages.COMMAND_PARAMS.items():
        for key in keys:
            node: Any = raw
            for part in key.split("."):
                assert isinstance(node, dict) and part in node, f"{command}: no param {key}"
                node = node[part]


def test_a_read_of_an_undeclared_param_raises() -> None:
    reads: set[str] = set()
    view = declared_view(Params(), "prepare", reads)
    assert view.data.limit is None and view.seed == 42
    assert reads == {"data.limit", "seed"}
    with pytest.raises(UndeclaredParamError, match=r"prepare` read param 'preprocess'"):
        _ = view.preprocess.digit_box
    with pytest.raises(UndeclaredParamError, match=r"data\.source"):
        _ = view.data.source
    with pytest.raises(UndeclaredParamError):
        view.model_dump()
    export = declared_view(Params(), "export", reads)
    assert export.model_name() == "visionops-mnist"  # methods read through the view
    with pytest.raises(UndeclaredParamError, match=r"data\.image_size"):
        export.data.shape()


def test_set_of_a_param_the_command_does_not_read_is_refused() -> None:
    check_overrides("prepare", ["data.limit=2000"])
    check_overrides("train", ["train.epochs=1", "seed=3", "train={epochs: 1}"])
    with pytest.raises(ConfigError, match=r"`visionops train` does not read data\.limit.*prepare"):
        check_overrides("train", ["train.epochs=1", "data.limit=2000"])
    with pytest.raises(ConfigError, match=r"`visionops tune` does not read data\.limit"):
        check_overrides("tune", ["data.limit=2000"])
    with pytest.raises(ConfigError, match=r"serve\.max_files"):
        check_overrides("evaluate", ["serve.max_files=3"])
    assert readers_of("data.limit") == ["prepare"]


def test_cli_exits_2_for_a_set_the_command_would_ignore(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["train", "cnn", "--set", "data.limit=2000"])
    assert result.exit_code == 2
    assert "data.limit" in result.output and "visionops prepare" in result.output
    assert "Traceback" not in result.output


# --------------------------------------------------------------------------- real run


def _image_folder(root: Path, per_class: int = 14) -> None:
    """Three classes of drawn shapes (ellipse, box, cross), each image its own proportions."""
    from PIL import ImageDraw

    for label in ("a", "b", "c"):
        folder = root / label
        folder.mkdir(parents=True)
        for i in range(per_class):
            img = Image.new("L", (64, 64), 255)
            draw = ImageDraw.Draw(img)
            w, h, pen = 8 + 3 * i, 52 - 2 * i, 2 + i % 4  # each its own shape and stroke
            box = (32 - w // 2, 32 - h // 2, 32 + w // 2, 32 + h // 2)
            if label == "a":
                draw.ellipse(box, outline=0, width=pen)
            elif label == "b":
                draw.rectangle(box, outline=0, width=pen)
            else:
                draw.line(box, fill=0, width=pen)
                draw.line((box[0], box[3], box[2], box[1]), fill=0, width=pen)
            img.save(folder / f"{i}.png")


@pytest.mark.slow
def test_each_stage_reads_exactly_what_it_declares(
    store: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Run every stage for real (a tiny image folder, so every declared param matters)."""
    _image_folder(tmp_path / "images")
    params = {
        "data": {"source": "imagefolder", "path": "images", "test_fraction": 0.25},
        "train": {"models": ["mlp"], "epochs": 1, "width": 8, "batch_size": 16},
        "evaluate": {"gallery_size": 4},
        "gate": {"latency_budget_ms": 10000.0},
    }
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    reads: dict[str, set[str]] = {}
    real_view = stages.declared_view

    def recording_view(p: Params, command: str, _: set[str] | None = None) -> Params:
        return real_view(p, command, reads.setdefault(command, set()))

    monkeypatch.setattr(stages, "declared_view", recording_view)
    for command in (
        ["ingest"],
        ["validate"],
        ["prepare"],
        ["train", "mlp"],
        ["evaluate", "mlp"],
        ["compare"],
        ["export"],
        ["register"],
        ["gate"],
        ["report"],
    ):
        result = runner.invoke(app, command)
        assert result.exit_code == 0, (command, result.output, result.exception)
    for stage, declared in STAGE_PARAMS.items():
        unread = [
            d for d in declared if not any(r == d or r.startswith(d + ".") for r in reads[stage])
        ]
        assert not unread, f"stage {stage} declares {unread} but never reads them"


# --------------------------------------------------------------------------- outputs


def test_stage_outputs_match_dvc_yaml() -> None:
    dvc = yaml.safe_load((REPO / "dvc.yaml").read_text())
    for name, stage in dvc["stages"].items():
        body = stage.get("do", stage)
        paths = []
        for kind in ("outs", "metrics", "plots"):
            for entry in body.get(kind, []):
                paths.append(next(iter(entry)) if isinstance(entry, dict) else str(entry))
        expected = [p.replace("${item}", "{item}") for p in paths]
        assert sorted(expected) == sorted(stages.STAGE_OUTPUTS[name]), name


@pytest.mark.parametrize(
    ("path", "stage"),
    [
        ("data/prepared/meta.json", "prepare"),
        ("/work/x/data/interim/dataset.npz", "ingest"),
        ("models/cnn/config.json", "train@cnn"),
        ("metrics/eval/resnet.json", "evaluate@resnet"),
        ("exported/model.onnx", "export"),
        ("metrics/gate.json", "gate"),
        ("data/raw/mnist/x.gz", None),
    ],
)
def test_producing_stage(path: str, stage: str | None) -> None:
    assert stages.producing_stage(path) == stage


@pytest.mark.parametrize(
    ("command", "fix"),
    [
        (["train", "cnn"], "`dvc repro prepare`"),
        (["evaluate", "cnn"], "`dvc repro train@cnn`"),
        (["tune", "--trials", "1"], "`dvc repro prepare`"),
        (["export"], "`dvc repro compare`"),
        (["serve", "--port", "1"], "`dvc repro`"),
    ],
)
def test_on_a_fresh_clone_each_command_names_the_one_command_that_makes_its_inputs(
    command: list[str], fix: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    result = runner.invoke(app, command)
    assert result.exit_code == 2, result.output
    assert fix in result.output and "Traceback" not in result.output
    assert "visionops prepare" not in result.output
