"""Distributed training: the data split, device selection, the launcher, and a real
2-process CPU DDP run through torchrun (gloo) on a tiny slice."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from test_train import small_params, write_prepared
from typer.testing import CliRunner

from visionops import distributed
from visionops.distributed import DistContext
from visionops.errors import ConfigError, ModelError
from visionops.models.zoo import load_trained
from visionops.train import (
    mixed_precision_dtype,
    rank_device,
    resolve_device,
    run_train,
    steps_per_epoch,
)


def test_shard_bounds_split_every_batch_exactly_once() -> None:
    for n in (0, 1, 5, 64, 67):
        for world in (1, 2, 3, 4):
            chunks = [distributed.shard_bounds(n, rank, world) for rank in range(world)]
            covered = [i for lo, hi in chunks for i in range(lo, hi)]
            assert covered == list(range(n))  # disjoint, in order, complete
            sizes = [hi - lo for lo, hi in chunks]
            assert sizes == [len(c) for c in torch.tensor_split(torch.arange(n), world)]
    with pytest.raises(ValueError, match="rank 2"):
        distributed.shard_bounds(4, 2, 2)


def test_steps_per_epoch_gives_every_process_two_images() -> None:
    assert steps_per_epoch(256, 32, 2) == 8
    assert steps_per_epoch(259, 32, 2) == 8  # 3 left over: one process would get 1
    assert steps_per_epoch(260, 32, 2) == 9
    assert steps_per_epoch(257, 32) == 8 and steps_per_epoch(258, 32) == 9  # alone: as before


def test_threads_per_rank_share_the_cores() -> None:
    assert distributed.threads_per_rank(16, 4) == 4
    assert distributed.threads_per_rank(2, 2) == 1
    assert distributed.threads_per_rank(2, 4) == 1
    assert distributed.threads_per_rank(8, 1) == 8


def test_backend_and_torchrun_command() -> None:
    assert distributed.backend_for("cpu") == "gloo"
    assert distributed.backend_for("cuda") == "nccl"
    cmd = distributed.torchrun_command(2, ["-m", "visionops.train", "cnn"])
    assert cmd[:3] == [sys.executable, "-m", "torch.distributed.run"]
    assert cmd[cmd.index("--nproc-per-node") + 1] == "2" and "--standalone" in cmd
    assert cmd[-3:] == ["-m", "visionops.train", "cnn"]
    with pytest.raises(ConfigError):
        distributed.torchrun_command(0, [])


def test_outside_torchrun_nothing_is_distributed(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in distributed.TORCHRUN_ENV:
        monkeypatch.delenv(name, raising=False)
    assert not distributed.launched_by_torchrun()
    with distributed.process_group("cpu") as ctx:
        assert ctx is None and distributed.current() is None
    assert distributed.all_reduce_sums([1.5, 2], None) == [1.5, 2.0]
    assert distributed.all_agree(False, None)


def test_device_selection(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto").type == "cuda"
    assert resolve_device("cuda").type == "cuda"
    assert resolve_device("cpu").type == "cpu"
    ctx = DistContext(rank=3, world_size=4, local_rank=1, local_world_size=2, backend="nccl")
    assert rank_device(torch.device("cuda"), ctx) == torch.device("cuda", 1)
    assert rank_device(torch.device("cpu"), ctx) == torch.device("cpu")
    assert rank_device(torch.device("cuda"), None) == torch.device("cuda")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto").type == "cpu"
    with pytest.raises(ModelError, match="no CUDA device"):
        resolve_device("cuda")


def test_mixed_precision_only_on_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    assert mixed_precision_dtype(True, torch.device("cpu")) is None
    assert mixed_precision_dtype(False, torch.device("cuda")) is None
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert mixed_precision_dtype(True, torch.device("cuda")) == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert mixed_precision_dtype(True, torch.device("cuda")) == torch.float16


def test_amp_and_compile_do_not_change_cpu_training(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="visionops.train"):
        a = run_train(
            small_params(epochs=1, amp=True, compile=True), write_prepared(tmp_path / "a"), "mlp"
        )
    b = run_train(small_params(epochs=1), write_prepared(tmp_path / "b"), "mlp")
    assert a.history == b.history
    assert "train.amp applies on CUDA only" in caplog.text
    assert "train.compile applies on CUDA only" in caplog.text


def test_train_nproc_launches_torchrun_with_the_same_params(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from visionops.cli import app

    for name in distributed.TORCHRUN_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)
    calls: list[list[str]] = []
    codes = iter([0, 1])
    monkeypatch.setattr(distributed, "launch", lambda cmd: calls.append(cmd) or next(codes))
    runner = CliRunner()
    result = runner.invoke(app, ["train", "cnn", "--nproc", "2", "--set", "train.epochs=1"])
    assert result.exit_code == 0, result.output
    (cmd,) = calls
    assert cmd[cmd.index("--nproc-per-node") + 1] == "2"
    tail = cmd[cmd.index("-m", 3) :]
    assert tail == [
        *["-m", "visionops.train", "cnn", "--params", "params.yaml"],
        *["--set", "train.epochs=1", "--set", "train.nproc=2"],
    ]
    # A failing rank: one red line naming torchrun's exit code, exit code 2.
    result = runner.invoke(app, ["train", "cnn", "--set", "train.nproc=2"])
    assert result.exit_code == 2 and "torchrun exit code 1" in result.output
    # Inside torchrun, another torchrun is refused.
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    result = runner.invoke(app, ["train", "cnn", "--nproc", "2"])
    assert result.exit_code == 2 and "already running under torchrun" in result.output


def test_two_process_ddp_run_trains_and_only_rank_0_writes(tmp_path: Path) -> None:
    """torchrun --nproc-per-node 2 -m visionops.train on CPU (gloo), 256 images, 2 epochs."""
    from mlflow import MlflowClient

    layout = write_prepared(tmp_path)
    raw = small_params(epochs=2, num_threads=0).model_dump(mode="json")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "VISIONOPS_"))}
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env.update(MLFLOW_TRACKING_URI=tracking, MLFLOW_DISABLE_TELEMETRY="true")
    cmd = distributed.torchrun_command(2, ["-m", "visionops.train", "cnn"])
    proc = subprocess.run(
        cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240, check=False
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert proc.stdout.count("trained cnn") == 1, proc.stdout  # rank 0 reports, alone

    metrics = json.loads(layout.train_metrics("cnn").read_text())
    assert metrics["epochs_run"] == 2 and metrics["images_per_second"] > 0
    assert metrics["val_accuracy"] > 0.8  # chance is 0.25: the two ranks learned together
    ckpt = torch.load(layout.model_dir("cnn") / "checkpoints" / "last.pt", weights_only=True)
    assert ckpt["fingerprint"]["world_size"] == 2
    assert ckpt["images_seen"] == 2 * 256  # every image once per epoch, over both ranks
    assert [row["epoch"] for row in ckpt["history"]] == [1, 2]

    # The model loads and evaluates to the validation accuracy it was selected with.
    model, config = load_trained(layout.model_dir("cnn"))
    from visionops.data.transforms import PreprocessSpec, normalize

    with np.load(layout.split_npz("val")) as npz:
        x_val, y_val = npz["x"], npz["y"]
    spec = PreprocessSpec.from_dict(config["preprocess"])
    with torch.no_grad():
        pred = model(torch.from_numpy(normalize(x_val, spec))).argmax(1).numpy()
    assert float((pred == y_val).mean()) == pytest.approx(metrics["val_accuracy"], abs=1e-6)
    from visionops.evaluate import run_evaluate

    evaluated = run_evaluate(small_params(), layout, "cnn")
    assert evaluated.accuracy > 0.8

    # Only rank 0 wrote: one TensorBoard event file, one tracked MLflow run.
    assert len(list((layout.tensorboard_dir / "cnn").glob("events.out.tfevents.*"))) == 1
    client = MlflowClient(tracking_uri=tracking)
    experiment = client.get_experiment_by_name("visionops")
    runs = client.search_runs(
        [experiment.experiment_id], filter_string="tags.`visionops.stage` = 'train-cnn'"
    )
    assert len(runs) == 1
    assert runs[0].data.tags["visionops.world_size"] == "2"
    curve = client.get_metric_history(runs[0].info.run_id, "val_accuracy")
    assert sorted(m.step for m in curve) == [0, 1, 2]  # per epoch, and the summary at 0
