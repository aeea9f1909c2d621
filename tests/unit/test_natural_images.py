"""Image folders of photos: decisions that follow the data, ImageFolder conventions,
natural-picture preprocessing and the recipe that scales with the data."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from visionops.config import TrainParams, load_params
from visionops.data.ingest import run_ingest
from visionops.data.natural import natural_to_array
from visionops.data.prepare import run_prepare
from visionops.data.shapes import write_shapes_folder
from visionops.data.transforms import PreprocessSpec, image_to_array
from visionops.data.validate import run_validate
from visionops.errors import DataValidationError
from visionops.layout import Layout
from visionops.recipe import early_stop_patience, planned_epochs, scaled_batch_size

REPO = Path(__file__).resolve().parents[2]


def _params(path: Path, *extra: str):
    return load_params(
        REPO / "params.yaml", ["data.source=imagefolder", f"data.path={path}", *extra]
    )


def _digits_folder(root: Path, per_class: int = 6) -> None:
    """Grey pictures of dark strokes on white paper (two classes: bar and plus)."""
    for cls in ("bar", "plus"):
        (root / cls).mkdir(parents=True)
        for i in range(per_class):
            a = np.full((40, 40), 255, np.uint8)
            a[4 + 2 * i : 34, 18 : 20 + i] = 0  # strokes of different lengths and widths
            if cls == "plus":
                a[18 : 20 + i, 4 + i : 36] = 0
            Image.fromarray(a, "L").save(root / cls / f"{i}.png")


def test_colour_shapes_are_natural_colour_at_the_natural_size(tmp_path: Path) -> None:
    write_shapes_folder(tmp_path / "shapes", per_class=10, seed=1)
    params = _params(tmp_path / "shapes")
    layout = Layout.at(tmp_path / "work")
    run_ingest(params, layout)
    report = run_validate(params, layout)
    decided = report.preprocess
    assert decided["kind"] == "natural" and decided["channels"] == 3
    assert decided["image_size"] == params.data.natural_size
    assert decided["center"] is False and decided["invert"] == "never"
    saved = json.loads((layout.reports_dir / "validation.json").read_text())
    assert saved["preprocess"] == decided
    assert "natural pictures" in saved["preprocess_summary"]
    assert "natural pictures" in report.describe()
    run_prepare(params, layout)
    meta = json.loads(layout.prepared_meta.read_text())
    assert meta["preprocess"]["kind"] == "natural" and meta["channels"] == 3
    # Colour survived: the three channels of the pictures differ.
    x = np.load(layout.split_npz("train"))["x"]
    assert x.shape[1:] == (params.data.natural_size, params.data.natural_size, 3)
    assert np.abs(x[..., 0].astype(int) - x[..., 1]).mean() > 10


def test_grey_strokes_on_paper_are_digits(tmp_path: Path) -> None:
    _digits_folder(tmp_path / "digits")
    params = _params(tmp_path / "digits", "data.test_fraction=0.34")
    layout = Layout.at(tmp_path / "work")
    run_ingest(params, layout)
    decided = run_validate(params, layout).preprocess
    assert decided["kind"] == "digit" and decided["channels"] == 1
    assert decided["image_size"] == 28 and decided["center"] is True
    # Dark on light was inverted: the background is black, the strokes bright.
    x = np.load(layout.dataset_npz)["x_train"]
    assert x[:, 0, 0, 0].max() == 0 and x.max() == 255


def test_params_override_what_the_data_says(tmp_path: Path) -> None:
    write_shapes_folder(tmp_path / "shapes", per_class=6, seed=2)
    params = _params(
        tmp_path / "shapes", "data.channels=1", "data.image_size=24", "preprocess.kind=natural"
    )
    layout = Layout.at(tmp_path / "work")
    run_ingest(params, layout)
    decided = run_validate(params, layout).preprocess
    assert (decided["channels"], decided["image_size"], decided["kind"]) == (1, 24, "natural")


def test_natural_preprocessing_keeps_the_aspect_ratio_by_centre_cropping() -> None:
    # 80x40: a red left quarter, green middle half, blue right quarter.
    a = np.zeros((40, 80, 3), np.uint8)
    a[:, :20, 0] = 255
    a[:, 20:60, 1] = 255
    a[:, 60:, 2] = 255
    out = natural_to_array(Image.fromarray(a), 20)
    assert out.shape == (20, 20, 3)
    # The shorter side became 20 (width 40), the middle 20 columns are the green half.
    assert out[..., 1].min() > 240 and out[..., 0].max() < 15 and out[..., 2].max() < 15
    spec = PreprocessSpec(image_size=20, channels=3, kind="natural", center=False)
    assert np.array_equal(image_to_array(Image.fromarray(a), spec), out)


def test_imagefolder_conventions_hidden_case_and_val_folder(tmp_path: Path) -> None:
    root = tmp_path / "pics"
    rng = np.random.default_rng(0)
    for split, n in (("train", 8), ("val", 3), ("test", 3)):
        for cls in ("cat", "dog"):
            (root / split / cls).mkdir(parents=True)
            for i in range(n):
                img = Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8))
                ext = ".PNG" if i % 2 else ".png"
                img.save(root / split / cls / f"{i}{ext}", format="PNG")
    (root / "train" / "cat" / ".hidden.png").write_bytes(b"not an image")
    (root / "train" / ".cache").mkdir()
    (root / "train" / "cat" / "notes.txt").write_text("ignored")
    params = _params(root)
    layout = Layout.at(tmp_path / "work")
    run_ingest(params, layout)
    report = run_validate(params, layout)
    assert report.passed
    meta = json.loads(layout.dataset_json.read_text())
    assert meta["classes"] == ["cat", "dog"]  # .cache is not a class
    assert meta["unreadable"] == []  # the hidden file was never read
    assert meta["n_train"] == 2 * (8 + 3)
    result = run_prepare(params, layout)
    assert result.n_val == 6  # exactly val/
    val = np.load(layout.split_npz("val"))
    files = [meta["train_files"][i] for i in val["index"]]
    assert all(f.startswith("val/") for f in files)


def test_an_empty_class_folder_fails_validation_naming_it(tmp_path: Path) -> None:
    write_shapes_folder(tmp_path / "shapes", per_class=6, seed=3)
    (tmp_path / "shapes" / "hexagon").mkdir()
    params = _params(tmp_path / "shapes")
    layout = Layout.at(tmp_path / "work")
    run_ingest(params, layout)
    with pytest.raises(DataValidationError, match="hexagon"):
        run_validate(params, layout)


def test_validate_reads_the_folder_again_when_it_changed(tmp_path: Path) -> None:
    write_shapes_folder(tmp_path / "shapes", per_class=6, seed=4)
    params = _params(tmp_path / "shapes")
    layout = Layout.at(tmp_path / "work")
    run_ingest(params, layout)
    assert run_validate(params, layout).reingested is None
    extra = tmp_path / "shapes" / "circle" / "extra.png"
    Image.new("RGB", (64, 64), (200, 10, 10)).save(extra)
    os.utime(extra)
    report = run_validate(params, layout)
    assert report.reingested and "changed" in report.reingested
    meta = json.loads(layout.dataset_json.read_text())
    assert "circle/extra.png" in meta["train_files"] + meta["test_files"]
    # Changed params make the ingested data stale too.
    report = run_validate(_params(tmp_path / "shapes", "data.natural_size=40"), layout)
    assert report.reingested and "natural_size" in report.reingested
    assert report.preprocess["image_size"] == 40


def test_recipe_scales_batch_and_epochs_with_the_data() -> None:
    assert scaled_batch_size(128, 60_000) == 128
    assert scaled_batch_size(128, 324) == 32  # 324 / 8 = 40 -> 32
    assert scaled_batch_size(128, 50) == 16
    assert scaled_batch_size(8, 50) == 8
    tp = TrainParams(epochs=4, min_steps=600, max_epochs=200)
    assert planned_epochs(tp, 10) == 60
    assert planned_epochs(TrainParams(epochs=4, min_steps=1200), 422) == 4
    assert planned_epochs(tp, 422) == 4  # MNIST: 4 epochs are already 1688 steps
    assert planned_epochs(tp, 1) == 200
    assert planned_epochs(TrainParams(epochs=4, min_steps=0), 1) == 4
    assert early_stop_patience(TrainParams(epochs=4, patience=3), 4) == 3
    assert early_stop_patience(TrainParams(epochs=4, patience=3), 110) == 28


def test_natural_augmentation_is_identity_at_neutral_draws_and_varies_otherwise() -> None:
    import torch

    from visionops.recipe import augment_natural, draw_natural

    g = torch.Generator().manual_seed(0)
    x = torch.rand((4, 3, 16, 16), generator=g) * 2 - 1
    mean, std = torch.tensor([0.5, 0.4, 0.3]), torch.tensor([0.2, 0.25, 0.3])
    neutral = torch.tensor([[1.0, 0.0, 0.5, 0.5, 0.0, 1.0, 1.0, 1.0]] * 4)
    pix = (x * std.view(1, 3, 1, 1) + mean.view(1, 3, 1, 1)).clamp(0, 1)
    expected = (pix - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)
    assert torch.allclose(augment_natural(x, neutral, mean, std), expected, atol=1e-5)
    flipped = neutral.clone()
    flipped[:, 4] = 1.0
    assert torch.allclose(augment_natural(x, flipped, mean, std), expected.flip(3), atol=1e-5)
    tp = TrainParams()
    a = draw_natural(4, tp, torch.Generator().manual_seed(1))
    b = draw_natural(4, tp, torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and a.shape == (4, 8)
    assert (a[:, 0] >= tp.crop_scale).all() and (a[:, 0] <= 1).all()
    assert not torch.allclose(augment_natural(x, a, mean, std), expected, atol=1e-2)
    no_flip = draw_natural(64, TrainParams(hflip=False), torch.Generator().manual_seed(2))
    assert (no_flip[:, 4] == 0).all()


def test_grey_photos_without_a_plain_background_are_natural(tmp_path: Path) -> None:
    from visionops.data.profile import decide_kind, profile_images

    rng = np.random.default_rng(0)
    files = []
    for i in range(6):
        # A grey gradient with texture: no plain border, no colour.
        a = np.clip(np.linspace(40, 220, 48)[None, :] + rng.normal(0, 25, (48, 48)), 0, 255)
        path = tmp_path / f"{i}.jpg"
        Image.fromarray(a.astype(np.uint8), "L").save(path)
        files.append(path)
    profile = profile_images(files, max_pixels=10**6)
    assert not profile.colour and profile.plain_background_share == 0.0
    assert decide_kind(profile) == "natural"
    assert (profile.median_width, profile.median_height) == (48, 48)


def test_picture_sizes_and_formats_travel_from_ingest_to_the_prepared_splits(
    tmp_path: Path,
) -> None:
    rng = np.random.default_rng(3)
    root = tmp_path / "photos"
    expected: dict[str, tuple[int, int]] = {}
    for c, cls in enumerate(("sky", "sea")):
        (root / cls).mkdir(parents=True)
        for i in range(8):
            w, h = 40 + 3 * i + c, 30 + 2 * i  # every picture a size of its own
            a = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            ext, fmt = (".jpg", "JPEG") if i % 3 == 0 else (".png", "PNG")
            Image.fromarray(a, "RGB").save(root / cls / f"{i}{ext}")
            expected[f"{cls}/{i}{ext}"] = (w, h, fmt)
    params = _params(root, "data.val_fraction=0.25", "data.test_fraction=0.25")
    layout = Layout.at(tmp_path / "work")
    run_ingest(params, layout)
    run_prepare(params, layout)
    meta = json.loads(layout.dataset_json.read_text())
    for split, files in (("val", meta["train_files"]), ("test", meta["test_files"])):
        arrays = np.load(layout.split_npz(split))
        assert len(arrays["x"]) > 0
        assert arrays["size"].dtype == np.int64 and arrays["size"].shape == (len(arrays["x"]), 2)
        got = [
            (int(s[0]), int(s[1]), str(f))
            for s, f in zip(arrays["size"], arrays["format"], strict=True)
        ]
        assert got == [expected[files[i]] for i in arrays["index"]]
