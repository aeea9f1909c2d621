"""timm backbones in the zoo: build by name, load a local checkpoint, fine-tune, export
with parity and serve. Uses timm's tiny ``test_resnet`` and checkpoints the test writes:
nothing downloads."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_train import CLASSES, quadrant_images, small_params

from visionops.config import params_from_dict
from visionops.errors import ModelError
from visionops.export import check_parity, export_module, export_onnx
from visionops.layout import Layout
from visionops.models.timm_backbone import TimmModel
from visionops.models.zoo import build_model, load_trained
from visionops.train import run_train

TINY = "test_resnet"


def _checkpoint(path: Path, num_classes: int = 1000, seed: int = 3) -> dict[str, torch.Tensor]:
    """A 'pretrained' test_resnet state dict (another class count) saved at ``path``."""
    import timm

    torch.manual_seed(seed)
    state = timm.create_model(TINY, num_classes=num_classes).state_dict()
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save(state, path)
    return state


def _natural_prepared(root: Path, size: int = 32, n_train: int = 96) -> Layout:
    layout = Layout.at(root)
    layout.prepared_dir.mkdir(parents=True, exist_ok=True)
    splits = {
        "train": quadrant_images(n_train, 1, size, 3),
        "val": quadrant_images(32, 2, size, 3),
        "test": quadrant_images(32, 3, size, 3),
    }
    for split, (x, y) in splits.items():
        np.savez(layout.split_npz(split), x=x, y=y)
    meta = {
        "classes": CLASSES,
        "image_size": size,
        "channels": 3,
        "mean": [0.3, 0.3, 0.3],
        "std": [0.3, 0.3, 0.3],
        "source": "imagefolder",
        "preprocess": {"kind": "natural", "invert": "never", "center": False, "digit_box": 20},
    }
    layout.prepared_meta.write_text(json.dumps(meta))
    return layout


def test_any_timm_name_is_a_zoo_member_following_the_contract() -> None:
    params = params_from_dict({"train": {"models": ["cnn", TINY]}})
    assert params.train.models == ["cnn", TINY]
    model = build_model(TINY, in_channels=3, image_size=32, num_classes=4)
    assert isinstance(model, TimmModel)
    model.eval()
    x = torch.randn(2, 3, 32, 32)
    emb = model.forward_features(x)
    assert emb.shape == (2, model.embedding_dim)
    assert torch.allclose(model(x), model.head(emb))
    assert model(x).shape == (2, 4)


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_a_local_checkpoint_initialises_the_backbone(tmp_path: Path, suffix: str) -> None:
    state = _checkpoint(tmp_path / f"weights{suffix}")
    model = build_model(TINY, 3, 32, 4, pretrained=str(tmp_path / f"weights{suffix}"))
    mine = model.backbone.state_dict()
    classifier = {k for k in mine if mine[k].shape != state.get(k, mine[k]).shape}
    assert classifier, "the 1000-class head cannot fit 4 classes"
    body = [k for k in mine if k not in classifier and "num_batches" not in k]
    assert all(torch.equal(mine[k], state[k]) for k in body)
    assert model.head.out_features == 4


def test_pretrained_offline_and_missing_files_are_one_line_errors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-home"))
    with pytest.raises(ModelError, match=r"train\.pretrained to a local") as err:
        build_model(TINY, 3, 32, 4, pretrained=True)
    assert "\n" not in str(err.value)
    with pytest.raises(ModelError, match="not found"):
        build_model(TINY, 3, 32, 4, pretrained=str(tmp_path / "nothing.safetensors"))
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ModelError, match=r"junk\.pt"):
        build_model(TINY, 3, 32, 4, pretrained=str(tmp_path / "junk.pt"))


def test_fine_tunes_from_a_checkpoint_exports_with_parity_and_serves(tmp_path: Path) -> None:
    ckpt = tmp_path / "pretrained.safetensors"
    state = _checkpoint(ckpt)
    layout = _natural_prepared(tmp_path / "work")
    params = small_params(
        models=[TINY], epochs=2, lr=0.01, pretrained=str(ckpt), backbone_lr_scale=0.1
    )
    result = run_train(params, layout, TINY)
    assert result.epochs_run == 2
    config = json.loads((layout.model_dir(TINY) / "config.json").read_text())
    assert config["architecture"] == TINY
    assert config["recipe"]["pretrained"] == str(ckpt)
    assert config["recipe"]["backbone_lr_scale"] == 0.1
    assert {"horizontal_flip": 0.5} in config["recipe"]["augment"]
    model, _ = load_trained(layout.model_dir(TINY))
    # Fine-tuned, not trained from scratch: the stem moved only a little from the checkpoint.
    stem = model.backbone.state_dict()["stem.0.weight"] if "stem.0.weight" in state else None
    key = "stem.0.weight" if stem is not None else next(k for k in state if k.endswith("weight"))
    moved = (model.backbone.state_dict()[key] - state[key]).abs().max().item()
    assert 0 < moved < 0.5 * state[key].abs().max().item()

    x = quadrant_images(5, 9, 32, 3)[0]
    from visionops.data.transforms import PreprocessSpec, normalize

    spec = PreprocessSpec.from_dict(config["preprocess"])
    inputs = normalize(x, spec)
    module = export_module(model)
    onnx_path = tmp_path / "model.onnx"
    export_onnx(module, inputs[:1], onnx_path)
    assert check_parity(onnx_path, module, inputs, atol=1e-4) <= 1e-4

    # Served like every model: ONNX Runtime on the exported folder, uploads in, classes out.
    from fastapi.testclient import TestClient

    from visionops.artifacts import open_session, predict_probabilities
    from visionops.config import ServeParams
    from visionops.serve.app import create_app
    from visionops.serve.service import ServeSettings

    folder = tmp_path / "exported"
    folder.mkdir()
    onnx_path.replace(folder / "model.onnx")
    metadata = {
        "name": "visionops-timm-test",
        "architecture": TINY,
        "classes": CLASSES,
        "preprocess": spec.to_dict(),
        "metrics": {"accuracy": result.val_accuracy},
    }
    (folder / "metadata.json").write_text(json.dumps(metadata))
    expected = predict_probabilities(open_session(folder / "model.onnx"), inputs).argmax(1)
    app = create_app(ServeSettings(model_uri=str(folder), serve=ServeParams(), threads=1))
    with TestClient(app) as client:
        for _ in range(200):
            if client.get("/readyz").status_code == 200:
                break
        files = []
        for i, img in enumerate(x):
            buf = io.BytesIO()
            Image.fromarray(img).save(buf, format="PNG")
            files.append(("files", (f"{i}.png", buf.getvalue(), "image/png")))
        response = client.post("/v1/predict", files=files)
        assert response.status_code == 200, response.text
        got = [p["class_index"] for p in response.json()["predictions"]]
    assert got == expected.tolist()


def test_without_timm_params_naming_a_timm_model_still_load(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The torch-free serving install reads params.yaml; a timm name there is no error."""
    import importlib.util

    from visionops.models import names

    real = importlib.util.find_spec
    monkeypatch.setattr(
        names.importlib.util, "find_spec", lambda n, *a: None if n == "timm" else real(n, *a)
    )
    assert names.is_model_name("resnet18") and names.is_model_name("cnn")
    assert not names.is_model_name("Res Net!")
    assert params_from_dict({"train": {"models": ["resnet18"]}}).train.models == ["resnet18"]
