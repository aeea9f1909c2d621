"""The model zoo: shapes, the features/head split, capacity, and loading trained folders."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from visionops.errors import ModelError
from visionops.models import MODEL_NAMES
from visionops.models.zoo import BUILD_KEYS, build_model, count_parameters, load_trained

ALL = sorted(MODEL_NAMES)


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize(("channels", "size"), [(1, 28), (3, 32), (1, 16), (3, 20)])
def test_output_and_embedding_shapes(name: str, channels: int, size: int) -> None:
    torch.manual_seed(0)
    model = build_model(name, channels, size, num_classes=7, width=8, dropout=0.1).eval()
    x = torch.randn(5, channels, size, size)
    with torch.no_grad():
        logits = model(x)
        emb = model.forward_features(x)
    assert logits.shape == (5, 7)
    assert emb.shape == (5, model.embedding_dim)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("name", ALL)
def test_forward_is_head_of_features(name: str) -> None:
    torch.manual_seed(0)
    model = build_model(name, 1, 28, 10, width=8, dropout=0.5)
    # One training step so BatchNorm statistics are no longer at their initial values.
    model.train()
    model(torch.randn(16, 1, 28, 28)).sum().backward()
    model.eval()
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(model(x), model.head(model.forward_features(x)))


@pytest.mark.parametrize("name", ALL)
def test_each_model_overfits_a_tiny_batch(name: str) -> None:
    """32 random images with random labels: enough capacity to memorise them."""
    torch.manual_seed(1)
    x = torch.randn(32, 1, 28, 28)
    y = torch.randint(0, 10, (32,))
    model = build_model(name, 1, 28, 10, width=8, dropout=0.0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    first = None
    for _ in range(60):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        first = first if first is not None else float(loss.detach())
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        logits = model(x)  # train mode: batch statistics, as during the steps
    final = float(torch.nn.functional.cross_entropy(logits, y))
    assert first is not None and first > 1.5
    assert final < 0.05
    assert (logits.argmax(1) == y).all()


def test_default_cnn_size_and_parameter_count() -> None:
    cnn = build_model("cnn", 1, 28, 10, width=32, dropout=0.1)
    # ~320k parameters at MNIST size: small enough to train fast on two CPU cores.
    assert 250_000 < count_parameters(cnn) < 450_000
    assert cnn.embedding_dim == 256
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in cnn.modules())


def test_unknown_model_lists_the_choices() -> None:
    with pytest.raises(ModelError) as err:
        build_model("vit", 1, 28, 10)
    for name in ALL:
        assert name in str(err.value)


def test_too_small_images_and_bad_settings_are_model_errors() -> None:
    with pytest.raises(ModelError, match="image_size >= 16"):
        build_model("cnn", 1, 12, 10)
    with pytest.raises(ModelError, match="num_classes=1"):
        build_model("mlp", 1, 28, 1)


def _save_trained(model_dir: Path, name: str = "cnn") -> torch.nn.Module:
    torch.manual_seed(3)
    model = build_model(name, 3, 16, 4, width=8, dropout=0.1)
    model.train()
    model(torch.randn(8, 3, 16, 16))  # move the BatchNorm running statistics
    model_dir.mkdir(parents=True)
    torch.save(model.state_dict(), model_dir / "model.pt")
    config = {"architecture": name, "in_channels": 3, "image_size": 16, "num_classes": 4}
    config |= {"width": 8, "dropout": 0.1, "classes": ["a", "b", "c", "d"]}
    (model_dir / "config.json").write_text(json.dumps(config))
    return model.eval()


def test_load_trained_restores_weights_in_eval_mode(tmp_path: Path) -> None:
    original = _save_trained(tmp_path / "m")
    loaded, config = load_trained(tmp_path / "m")
    assert not loaded.training
    assert config["classes"] == ["a", "b", "c", "d"]
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(loaded(x), original(x))


def test_load_trained_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match=r"config\.json"):
        load_trained(tmp_path / "nothing")
    _save_trained(tmp_path / "m")
    (tmp_path / "m" / "model.pt").write_bytes(b"not a torch file")
    with pytest.raises(ModelError, match=r"model\.pt"):
        load_trained(tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    del config["width"]
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelError, match="width"):
        load_trained(tmp_path / "m")
    assert "width" in BUILD_KEYS


def test_load_trained_refuses_weights_of_another_architecture(tmp_path: Path) -> None:
    _save_trained(tmp_path / "m", name="cnn")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    config["architecture"] = "resnet"
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelError, match="resnet"):
        load_trained(tmp_path / "m")
