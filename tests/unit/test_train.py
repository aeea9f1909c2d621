"""Training: outputs, determinism, resume after interruption, early stopping, augmentation.

The prepared splits are written here (a tiny, learnable synthetic task: the class says in
which quadrant a bright square sits), so these tests do not depend on the data stages.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from visionops.config import Params, params_from_dict
from visionops.errors import DataError, ModelError
from visionops.layout import Layout
from visionops.models.zoo import load_trained
from visionops.train import TrainResult, resolve_device, run_train, shift_batch, steps_per_epoch

CLASSES = ["ne", "nw", "se", "sw"]


def quadrant_images(
    n: int, seed: int, size: int = 16, channels: int = 1
) -> tuple[np.ndarray, np.ndarray]:
    """uint8 NHWC noise with a bright 5x5 square in the quadrant given by the label."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, len(CLASSES), n).astype(np.int64)
    x = rng.integers(0, 60, (n, size, size, channels)).astype(np.uint8)
    half = size // 2
    for i, label in enumerate(y):
        r, c = (label // 2) * half + rng.integers(0, 3), (label % 2) * half + rng.integers(0, 3)
        x[i, r : r + 5, c : c + 5] = 255
    return x, y


def write_prepared(
    root: Path,
    n_train: int = 256,
    n_val: int = 64,
    n_test: int = 64,
    size: int = 16,
    channels: int = 1,
    val: tuple[np.ndarray, np.ndarray] | None = None,
) -> Layout:
    """The files `prepare` writes: split npz files and meta.json (stats of train only)."""
    layout = Layout.at(root)
    layout.prepared_dir.mkdir(parents=True, exist_ok=True)
    splits = {
        "train": quadrant_images(n_train, 1, size, channels),
        "val": val or quadrant_images(n_val, 2, size, channels),
        "test": quadrant_images(n_test, 3, size, channels),
    }
    for split, (x, y) in splits.items():
        np.savez(layout.split_npz(split), x=x, y=y)
    x_train = splits["train"][0].astype(np.float64) / 255
    meta = {
        "classes": CLASSES,
        "image_size": size,
        "channels": channels,
        "mean": x_train.mean(axis=(0, 1, 2)).tolist(),
        "std": x_train.std(axis=(0, 1, 2)).tolist(),
        "n_train": n_train,
        "n_val": len(splits["val"][1]),
        "n_test": n_test,
        "source": "imagefolder",
        "preprocess": {"invert": "never", "center": False, "digit_box": 20},
    }
    layout.prepared_meta.write_text(json.dumps(meta))
    return layout


def small_params(**train: Any) -> Params:
    settings: dict[str, Any] = {
        "epochs": 2,
        "batch_size": 32,
        "lr": 0.01,
        "width": 8,
        "num_threads": 1,
        "patience": 5,
        "min_steps": 0,  # the epochs asked for, not those a tiny set would need
    }
    settings.update(train)
    seed = settings.pop("seed", 7)
    return params_from_dict({"seed": seed, "train": settings})


def weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_train_writes_every_output_with_sane_values(tmp_path: Path) -> None:
    layout = write_prepared(tmp_path)
    calls: list[tuple[dict[str, float], int]] = []
    result = run_train(small_params(), layout, "cnn", on_epoch=lambda m, s: calls.append((m, s)))

    assert isinstance(result, TrainResult)
    assert result.epochs_run == 2 and not result.stopped_early
    assert result.val_accuracy > 0.8  # chance is 0.25: it learned the task
    assert result.images_per_second > 0 and result.train_seconds > 0
    assert set(result.summary()) >= {"val_accuracy", "val_loss", "best_epoch", "train_seconds"}
    assert "cnn" in result.describe()

    # The callback got every epoch with the learning-curve metrics.
    assert [step for _, step in calls] == [1, 2]
    assert set(calls[0][0]) == {"train_loss", "train_accuracy", "val_loss", "val_accuracy", "lr"}

    model_dir = layout.model_dir("cnn")
    config = json.loads((model_dir / "config.json").read_text())
    assert config["architecture"] == "cnn" and config["classes"] == CLASSES
    assert config["in_channels"] == 1 and config["image_size"] == 16 and config["width"] == 8
    assert config["preprocess"]["mean"] == json.loads(layout.prepared_meta.read_text())["mean"]
    assert config["best_epoch"] == result.best_epoch

    # model.pt holds the best weights; reloaded, they reproduce the recorded val accuracy.
    model, _ = load_trained(model_dir)
    from visionops.data.transforms import PreprocessSpec, normalize

    with np.load(layout.split_npz("val")) as npz:
        x_val, y_val = npz["x"], npz["y"]
    spec = PreprocessSpec.from_dict(config["preprocess"])
    with torch.no_grad():
        pred = model(torch.from_numpy(normalize(x_val, spec))).argmax(1).numpy()
    assert float((pred == y_val).mean()) == pytest.approx(result.val_accuracy, abs=1e-6)

    metrics = json.loads(layout.train_metrics("cnn").read_text())
    assert metrics["val_accuracy"] == pytest.approx(result.val_accuracy)
    assert metrics["epochs_run"] == 2 and metrics["best_epoch"] in (1, 2)
    assert metrics["images_per_second"] > 0 and metrics["params"] == result.params

    curve = json.loads(layout.learning_curve("cnn").read_text())
    assert [row["epoch"] for row in curve] == [1, 2]
    for row in curve:
        assert set(row) == {
            "epoch",
            "train_loss",
            "train_accuracy",
            "val_loss",
            "val_accuracy",
            "lr",
        }
        assert 0 <= row["val_accuracy"] <= 1 and row["train_loss"] > 0 and row["lr"] > 0
    assert curve[1]["train_loss"] < curve[0]["train_loss"]
    assert max(r["val_accuracy"] for r in curve) == pytest.approx(result.val_accuracy)

    # The checkpoint is plain data: loadable with weights_only=True.
    ckpt = torch.load(model_dir / "checkpoints" / "last.pt", weights_only=True)
    assert ckpt["epoch"] == 2 and ckpt["finished"] is True
    assert {"model", "optimizer", "scheduler", "best_state", "history", "rng"} <= set(ckpt)
    assert ckpt["history"] == curve

    # TensorBoard got the same numbers.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(layout.tensorboard_dir / "cnn"))
    events.Reload()
    val_acc = events.Scalars("accuracy/val")
    assert [e.step for e in val_acc] == [1, 2]
    assert [e.value for e in val_acc] == pytest.approx([r["val_accuracy"] for r in curve])


def test_same_seed_same_weights_other_seed_other_weights(tmp_path: Path) -> None:
    runs = {}
    for name, seed in (("a", 7), ("b", 7), ("c", 8)):
        layout = write_prepared(tmp_path / name)
        result = run_train(small_params(seed=seed), layout, "cnn")
        runs[name] = (result, weights(layout.model_dir("cnn") / "model.pt"))
    assert_same_weights(runs["a"][1], runs["b"][1])
    assert runs["a"][0].history == runs["b"][0].history
    assert not torch.equal(runs["a"][1]["head.1.weight"], runs["c"][1]["head.1.weight"])


class Interrupt(KeyboardInterrupt):
    """Stands in for Ctrl-C (or a kill) after an epoch's checkpoint was written."""


@pytest.mark.parametrize("model_name", ["cnn", "mlp"])
def test_resume_after_interruption_equals_uninterrupted_run(
    tmp_path: Path, model_name: str
) -> None:
    params = small_params(epochs=3)
    straight_layout = write_prepared(tmp_path / "straight")
    straight = run_train(params, straight_layout, model_name)

    layout = write_prepared(tmp_path / "interrupted")

    def stop_after_first_epoch(metrics: dict[str, float], epoch: int) -> None:
        if epoch == 1:
            raise Interrupt

    with pytest.raises(Interrupt):
        run_train(params, layout, model_name, on_epoch=stop_after_first_epoch)
    ckpt = layout.model_dir(model_name) / "checkpoints" / "last.pt"
    assert torch.load(ckpt, weights_only=True)["epoch"] == 1
    assert not (layout.model_dir(model_name) / "model.pt").exists()

    seen: list[int] = []
    resumed = run_train(
        params, layout, model_name, resume=True, on_epoch=lambda m, s: seen.append(s)
    )
    assert seen == [2, 3]  # only the remaining epochs ran
    assert resumed.resumed_from_epoch == 1
    assert resumed.history == straight.history  # every float of every epoch
    assert (resumed.val_accuracy, resumed.best_epoch) == (
        straight.val_accuracy,
        straight.best_epoch,
    )
    assert_same_weights(
        weights(layout.model_dir(model_name) / "model.pt"),
        weights(straight_layout.model_dir(model_name) / "model.pt"),
    )
    final = torch.load(ckpt, weights_only=True)
    straight_final = torch.load(
        straight_layout.model_dir(model_name) / "checkpoints" / "last.pt", weights_only=True
    )
    assert_same_weights(final["model"], straight_final["model"])
    assert torch.equal(final["rng"]["shuffle"], straight_final["rng"]["shuffle"])


def test_resume_refuses_a_checkpoint_made_with_other_params_or_data(tmp_path: Path) -> None:
    layout = write_prepared(tmp_path)
    run_train(small_params(epochs=1), layout, "mlp")
    with pytest.raises(ModelError, match=r"lr: 0\.01 -> 0\.02"):
        run_train(small_params(epochs=1, lr=0.02), layout, "mlp", resume=True)
    x, y = quadrant_images(256, seed=99)  # re-prepared data, same shapes
    np.savez(layout.split_npz("train"), x=x, y=y)
    with pytest.raises(ModelError, match="data: "):
        run_train(small_params(epochs=1), layout, "mlp", resume=True)


def test_resume_without_checkpoint_trains_from_scratch(tmp_path: Path) -> None:
    a = run_train(small_params(epochs=1), write_prepared(tmp_path / "a"), "mlp", resume=True)
    b = run_train(small_params(epochs=1), write_prepared(tmp_path / "b"), "mlp")
    assert a.resumed_from_epoch == 0 and a.history == b.history


def test_early_stopping_keeps_the_best_weights(tmp_path: Path) -> None:
    # A validation set of one image repeated: accuracy is 0 or 1, so it stops improving
    # for good at some epoch and training must stop `patience` epochs later.
    x, y = quadrant_images(1, 9)
    layout = write_prepared(tmp_path, val=(np.repeat(x, 10, axis=0), np.repeat(y, 10)))
    result = run_train(small_params(epochs=12, patience=2), layout, "cnn")

    assert result.stopped_early
    assert result.epochs_run == result.best_epoch + 2 < 12
    assert len(result.history) == result.epochs_run
    best_row = result.history[result.best_epoch - 1]
    assert best_row["val_accuracy"] == max(r["val_accuracy"] for r in result.history)
    ckpt = torch.load(layout.model_dir("cnn") / "checkpoints" / "last.pt", weights_only=True)
    saved = weights(layout.model_dir("cnn") / "model.pt")
    assert_same_weights(saved, ckpt["best_state"])
    assert not torch.equal(saved["head.1.weight"], ckpt["model"]["head.1.weight"])


def test_rgb_images_and_resnet_train(tmp_path: Path) -> None:
    layout = write_prepared(tmp_path, channels=3, size=20)
    result = run_train(small_params(epochs=1), layout, "resnet")
    assert result.epochs_run == 1
    _, config = load_trained(layout.model_dir("resnet"))
    assert config["in_channels"] == 3 and len(config["preprocess"]["mean"]) == 3


def test_bad_inputs_are_readable_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"meta\.json"):
        run_train(small_params(), Layout.at(tmp_path), "cnn")
    layout = write_prepared(tmp_path)
    with pytest.raises(ModelError, match="unknown model 'vgg'"):
        run_train(small_params(), layout, "vgg")
    if not torch.cuda.is_available():
        with pytest.raises(ModelError, match="cuda"):
            run_train(small_params(device="cuda"), layout, "cnn")
        assert resolve_device("auto").type == "cpu"
    np.savez(layout.split_npz("val"), x=np.zeros((4, 16, 16, 1), np.uint8), y=np.full(4, 9))
    with pytest.raises(DataError, match=r"labels outside 0\.\.3"):
        run_train(small_params(), layout, "cnn")


def test_shift_batch_moves_each_image_within_the_limit() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.arange(6 * 2 * 9 * 9, dtype=torch.float32).reshape(6, 2, 9, 9)
    fill = torch.tensor([-1.0, -2.0])
    out = shift_batch(x, 2, fill, gen)
    assert out.shape == x.shape
    offsets = set()
    for i in range(len(x)):
        padded = torch.stack(
            [torch.nn.functional.pad(x[i, c], (2, 2, 2, 2), value=float(fill[c])) for c in range(2)]
        )
        matches = [
            (dy, dx)
            for dy in range(5)
            for dx in range(5)
            if torch.equal(out[i], padded[:, dy : dy + 9, dx : dx + 9])
        ]
        assert len(matches) == 1
        offsets.add(matches[0])
    assert len(offsets) > 1  # offsets are per image, not per batch
    assert torch.equal(shift_batch(x, 0, fill, gen), x)


def test_steps_per_epoch_never_leaves_a_batch_of_one() -> None:
    assert steps_per_epoch(256, 32) == 8
    assert steps_per_epoch(257, 32) == 8  # the lone 257th image would break BatchNorm
    assert steps_per_epoch(258, 32) == 9
    assert steps_per_epoch(5, 32) == 1
