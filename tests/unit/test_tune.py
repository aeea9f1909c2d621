"""Tuning: the search space in params, sampled values, the best-params file, and a real
Optuna study of a few tiny trials with pruning, nested MLflow runs and a second worker."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import optuna
import pytest
import yaml
from optuna.trial import FixedTrial, TrialState
from test_train import write_prepared
from typer.testing import CliRunner

from visionops.config import Params, load_params, params_from_dict
from visionops.errors import ConfigError
from visionops.tune import (
    TuningPaths,
    apply_values,
    baseline_values,
    best_params_text,
    default_study_name,
    dvc_exp_command,
    patch_yaml_text,
    resolve_storage,
    run_tune,
    suggest_values,
)

REPO = Path(__file__).resolve().parents[2]


def tiny_params(space: dict[str, Any] | None = None, **tune: Any) -> Params:
    return params_from_dict(
        {
            "seed": 7,
            "train": {
                "models": ["cnn"],
                "epochs": 2,
                "batch_size": 32,
                "lr": 0.01,
                "width": 8,
                "num_threads": 1,
                "patience": 5,
                "min_steps": 0,
            },
            "tune": {
                "space": space
                or {
                    "lr": {"low": 1e-6, "high": 0.03, "log": True},
                    "dropout": {"low": 0.0, "high": 0.3},
                    "model": {"choices": ["cnn", "mlp"]},
                },
                "random_trials": 2,
                "prune_after_trials": 1,
                **tune,
            },
        }
    )


@pytest.mark.parametrize(
    ("space", "message"),
    [
        ({"epochz": {"low": 1, "high": 2}}, "space.epochz: not a tunable train param"),
        ({"device": {"choices": ["cpu"]}}, "space.device: not a tunable"),
        ({"lr": {"low": 0.1, "high": 0.01}}, "above high"),
        ({"lr": {"low": 0.0, "high": 0.01, "log": True}}, "log range needs low > 0"),
        ({"epochs": {"low": 1.5, "high": 3}}, "integer bounds"),
        ({"batch_size": {"choices": [0, 32]}}, "0 is not a valid train.batch_size"),
        ({"augment": {"low": 0, "high": 1}}, "give a list of choices"),
        ({"model": {"choices": ["vgg"]}}, "unknown model"),
        ({"lr": {"low": 0.001}}, "tune.space.lr"),
    ],
)
def test_search_space_errors_name_the_key(space: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        tiny_params(space)


def test_sampled_values_become_train_params() -> None:
    params = tiny_params(
        {
            "model": {"choices": ["cnn", "mlp"]},
            "lr": {"low": 0.001, "high": 0.1, "log": True},
            "epochs": {"low": 1, "high": 4},
            "augment": {"choices": [True, False]},
        }
    )
    trial = FixedTrial({"model": "mlp", "lr": 0.02, "epochs": 3, "augment": False})
    values = suggest_values(trial, params)
    assert values == {"model": "mlp", "lr": 0.02, "epochs": 3, "augment": False}
    assert isinstance(values["epochs"], int)
    tuned = apply_values(params, values, num_threads=2)
    assert tuned.train.models == ["mlp"] and tuned.train.lr == 0.02
    assert tuned.train.epochs == 3 and tuned.train.augment is False
    assert tuned.train.num_threads == 2 and tuned.train.width == params.train.width
    # The baseline: the current train params, for the keys whose value lies in the space.
    assert baseline_values(params) == {"model": "cnn", "lr": 0.01, "epochs": 2, "augment": True}
    assert "lr" not in baseline_values(tiny_params({"lr": {"low": 0.5, "high": 0.9}}))


def test_default_study_name_follows_the_params_that_shape_a_trial() -> None:
    params = tiny_params()
    name = default_study_name(params)
    assert name.startswith("visionops-mnist-")
    assert default_study_name(tiny_params()) == name
    assert default_study_name(apply_values(params, {}, num_threads=2)) == name  # runtime only
    assert default_study_name(apply_values(params, {"epochs": 3})) != name


def test_storage_comes_from_the_option_then_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from visionops.layout import Layout

    layout = Layout.at(tmp_path)
    monkeypatch.delenv("VISIONOPS_TUNE_STORAGE", raising=False)
    assert resolve_storage(None, layout) == f"sqlite:///{tmp_path.resolve()}/tuning/optuna.db"
    monkeypatch.setenv("VISIONOPS_TUNE_STORAGE", "postgresql://u@db/optuna")
    assert resolve_storage(None, layout) == "postgresql+psycopg://u@db/optuna"  # psycopg 3
    assert resolve_storage("sqlite:///x.db", layout) == "sqlite:///x.db"


def test_best_params_file_keeps_the_comments_and_loads_back(tmp_path: Path) -> None:
    source = REPO / "params.yaml"
    params = load_params(source)
    best = apply_values(
        params, {"model": "mlp", "lr": 0.0042, "batch_size": 64, "weight_decay": 1.5e-05}
    )
    text = best_params_text(best, source)
    out = tmp_path / "best.yaml"
    out.write_text(text)
    assert load_params(out) == best
    before, after = source.read_text().splitlines(), text.splitlines()
    changed = [(a, b) for a, b in zip(before, after, strict=True) if a != b]
    assert [b.split("#")[0].rstrip() for _, b in changed] == [
        "  models: [mlp]",
        "  batch_size: 64",
        "  lr: 0.0042",
        "  weight_decay: 1.5e-05",
    ]
    assert dvc_exp_command(params, best) == (
        "dvc exp run -S 'train.models=[mlp]' -S train.batch_size=64 -S train.lr=0.0042 "
        "-S train.weight_decay=1.5e-05"
    )
    # A changed range inside a one-line mapping rewrites that mapping.
    wider = apply_values(params, {})
    raw = wider.model_dump(mode="json")
    raw["tune"]["space"]["width"] = {"choices": [8, 16]}
    wider = params_from_dict(raw)
    text = best_params_text(wider, source)
    assert "    width: {choices: [8, 16]}" in text.splitlines()
    out.write_text(text)
    assert load_params(out) == wider
    # A file it cannot patch in place (flow style): the full params, still exact.
    flow = tmp_path / "flow.yaml"
    flow.write_text(json.dumps({"train": {"lr": 0.1}}))
    assert params_from_dict(yaml.safe_load(best_params_text(best, flow))) == best
    assert params_from_dict(yaml.safe_load(best_params_text(best, None))) == best


def test_patch_yaml_text_replaces_one_line_values_only() -> None:
    text = "a: 1  # one\nb: 'x # y'\nc:\n  d: 2\n  e: {low: 1, high: 2}\nf:\n  - 1\n"
    target = {"a": 22, "b": "z", "c": {"d": [1, 2], "e": {"low": 1, "high": 3}}, "f": [1]}
    patched = patch_yaml_text(text, target, [("a",), ("b",), ("c", "d"), ("c", "e", "high")])
    assert patched == "a: 22 # one\nb: z\nc:\n  d: [1, 2]\n  e: {low: 1, high: 3}\nf:\n  - 1\n"
    assert patch_yaml_text(text, target, [("c", "x")]) is None  # no such key
    assert patch_yaml_text(text, target, [("f",)]) is None  # a block list, not one line


def _study(paths: TuningPaths, name: str) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=f"sqlite:///{paths.storage_db}")


def test_tuning_prunes_completes_and_records_every_trial(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mlflow import MlflowClient

    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking)
    for name in ("VISIONOPS_PARENT_RUN_ID", "VISIONOPS_TUNE_STORAGE"):
        monkeypatch.delenv(name, raising=False)
    layout = write_prepared(tmp_path)
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(tiny_params().model_dump(mode="json")))
    params = load_params(params_file, ["train.patience=4"])  # a `--set` for the search
    # Trial 0: the baseline (lr 0.01); trial 1: a learning rate that cannot learn in an
    # epoch, pruned after epoch 1 against the baseline; trial 2: sampled.
    result = run_tune(params, layout, trials=3, params_file=params_file, enqueue=[{"lr": 1e-6}])

    paths = TuningPaths.of(layout)
    study = _study(paths, result.study_name)
    states = [t.state for t in study.trials]
    assert len(states) == 3 and result.trials_run == 3
    assert states[0] == TrialState.COMPLETE and study.trials[0].user_attrs["baseline"]
    assert states[1] == TrialState.PRUNED and study.trials[1].params["lr"] == 1e-6
    assert states[2] in (TrialState.COMPLETE, TrialState.PRUNED)
    assert sorted(study.trials[1].intermediate_values) == [1]  # stopped after one epoch
    # Pruning saves epochs; a trial that ran them all completes.
    assert all(t.last_step == 1 for t in study.trials if t.state == TrialState.PRUNED)
    assert (result.complete, result.pruned) == (
        states.count(TrialState.COMPLETE),
        states.count(TrialState.PRUNED),
    )
    assert result.baseline_value == study.trials[0].value > 0.5
    assert result.best_value == study.best_value >= result.baseline_value
    assert result.best_values == study.best_params

    # The best params file: the params file with the best trial's values (and without
    # the search's own overrides, which best.json lists).
    best = load_params(paths.best_params)
    assert best == apply_values(load_params(params_file), study.best_params)
    assert best.train.models == [study.best_params["model"]]
    assert best.train.lr == study.best_params["lr"]
    assert best.train.patience == 5 and best.train.width == 8  # untouched
    summary = json.loads(paths.best_json.read_text())
    assert summary["best_trial"] == study.best_trial.number
    assert summary["trials"]["pruned"] >= 1 and summary["baseline_trial"] == 0
    assert summary["searched_with"] == {"train.patience": 4}
    command = summary["dvc_exp_run"]
    assert command == dvc_exp_command(load_params(params_file), best)
    assert "patience" not in command  # relative to the file: `dvc exp run` starts from it
    assert ("train.lr=" in command) == (study.best_params["lr"] != 0.01)
    for png in (paths.history_png, paths.importances_png):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert paths.report_html.read_text().count("data:image/png;base64,") == 2

    # MLflow: one parent for the study, one nested run per trial with its curve.
    client = MlflowClient(tracking_uri=tracking)
    parent = client.get_run(result.mlflow_run_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["visionops.kind"] == "tune"
    assert parent.data.metrics["best_value"] == pytest.approx(result.best_value)
    children = client.search_runs(
        [parent.info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'",
    )
    by_trial = {int(r.data.tags["optuna.trial"]): r for r in children}
    assert sorted(by_trial) == [0, 1, 2]
    assert by_trial[1].data.tags["visionops.trial_state"] == "PRUNED"
    assert by_trial[0].data.tags["visionops.trial_state"] == "COMPLETE"
    assert all(r.info.status == "FINISHED" for r in children)
    assert by_trial[1].data.params["lr"] == "1e-06"
    curve = client.get_metric_history(by_trial[0].info.run_id, "val_accuracy")
    assert sorted(m.step for m in curve) == [1, 2]

    # A second worker with the same params joins the study and the MLflow parent.
    again = run_tune(params, layout, trials=1, params_file=params_file)
    assert again.study_name == result.study_name and again.mlflow_run_id == parent.info.run_id
    assert len(_study(paths, result.study_name).trials) == 4
    children = client.search_runs(
        [parent.info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'",
    )
    assert len(children) == 4

    # A trial that breaks: its run and the study's run end FAILED, with the error as a tag.
    from visionops import registry

    with (
        pytest.raises(RuntimeError),
        registry.tuning_run(result.study_name, params, layout, parent.info.run_id) as tuning,
        registry.nested_run(tuning, "trial-broken", finished_on=(optuna.TrialPruned,)),
    ):
        raise RuntimeError("boom")
    (broken,) = client.search_runs(
        [parent.info.experiment_id], filter_string="attributes.run_name = 'trial-broken'"
    )
    assert broken.info.status == "FAILED"
    assert broken.data.tags["visionops.error"] == "RuntimeError: boom"
    assert client.get_run(parent.info.run_id).info.status == "FAILED"


def test_tune_without_prepared_data_is_one_line_and_no_study(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from visionops.cli import app

    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["tune", "--trials", "1"])
    assert result.exit_code == 2
    assert "`dvc repro prepare`" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "tuning").exists()
