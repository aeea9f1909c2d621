"""Validation: every check can fail, and failures name the offending files or indices."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from visionops.config import Params
from visionops.data.ingest import run_ingest, write_json, write_npz
from visionops.data.validate import DUPLICATE_TOLERANCE, run_validate
from visionops.errors import DataError, DataValidationError
from visionops.layout import Layout

REPO = Path(__file__).resolve().parents[2]
CHECK_NAMES = {
    "arrays",
    "shape",
    "label_range",
    "class_balance",
    "train_test_duplicates",
    "unreadable_files",
}


def distinct_images(n: int, offset: int = 0) -> np.ndarray:
    """n different 28x28x1 images (image i has a unique pixel pattern)."""
    x = np.zeros((n, 28, 28, 1), dtype=np.uint8)
    for i in range(n):
        k = i + offset
        x[i, k // 256 % 28, k % 28, 0] = 1 + k % 255
        x[i, 27 - k % 28, (k // 28) % 28, 0] = 200
        x[i, 0, 0, 0] = k // 784 % 256
    return x


def write_dataset(
    layout: Layout,
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_test: np.ndarray,
    y_test: np.ndarray,
    **meta: Any,
) -> None:
    write_npz(
        layout.dataset_npz,
        {"x_train": x_train, "y_train": y_train, "x_test": x_test, "y_test": y_test},
    )
    base = {
        "source": "mnist",
        "classes": [str(i) for i in range(10)],
        "image_size": int(x_train.shape[1]),
        "channels": int(x_train.shape[3]),
        "train_files": None,
        "test_files": None,
        "unreadable": [],
        "checksums": {},
    }
    write_json(layout.dataset_json, {**base, **meta})


def balanced(n_train: int = 200, n_test: int = 50) -> tuple[np.ndarray, ...]:
    x_train, x_test = distinct_images(n_train), distinct_images(n_test, offset=n_train)
    y_train = np.arange(n_train, dtype=np.int64) % 10
    y_test = np.arange(n_test, dtype=np.int64) % 10
    return x_train, y_train, x_test, y_test


def report_json(layout: Layout) -> dict[str, Any]:
    return json.loads((layout.reports_dir / "validation.json").read_text())


def check(layout: Layout, name: str) -> dict[str, Any]:
    return next(c for c in report_json(layout)["checks"] if c["name"] == name)


def test_clean_data_passes_and_every_check_is_reported(tmp_path: Path) -> None:
    layout = Layout(tmp_path)
    write_dataset(layout, *balanced())
    report = run_validate(Params(), layout)
    assert report.passed and report.summary()["failed_checks"] == 0.0
    data = report_json(layout)
    assert data["passed"] is True
    assert {c["name"] for c in data["checks"]} == CHECK_NAMES
    assert all(c["passed"] is True and isinstance(c["details"], dict) for c in data["checks"])
    assert check(layout, "class_balance")["details"]["train_counts"]["3"] == 20


def test_out_of_range_label_is_named_by_index(tmp_path: Path) -> None:
    layout = Layout(tmp_path)
    x_train, y_train, x_test, y_test = balanced()
    y_train[7] = 12
    y_test[2] = -1
    write_dataset(layout, x_train, y_train, x_test, y_test)
    with pytest.raises(
        DataValidationError, match=r"label_range: 2 label\(s\) outside \[0, 10\)"
    ) as e:
        run_validate(Params(), layout)
    assert "train[7] has label 12" in str(e.value) and "test[2] has label -1" in str(e.value)
    assert check(layout, "label_range")["passed"] is False
    assert check(layout, "label_range")["details"]["out_of_range"] == {"train": 1, "test": 1}


def test_out_of_range_label_is_named_by_file(tmp_path: Path) -> None:
    layout = Layout(tmp_path)
    x = distinct_images(6)
    y = np.array([0, 1, 0, 1, 5, 0], dtype=np.int64)
    files = [f"{'ab'[i % 2]}/{i}.png" for i in range(6)]
    write_dataset(
        layout, x[:4], y[:4], x[4:], y[4:], source="imagefolder", classes=["a", "b"],
        train_files=files[:4], test_files=files[4:],
    )  # fmt: skip
    params = Params.model_validate({"data": {"source": "imagefolder", "path": "x"}})
    with pytest.raises(DataValidationError, match=r"a/4\.png has label 5"):
        run_validate(params, layout)


def test_duplicates_across_train_and_test_fail_above_tolerance(tmp_path: Path) -> None:
    layout = Layout(tmp_path)
    x_train, y_train, x_test, y_test = balanced(40, 10)
    x_test[3] = x_train[17]
    x_test[8] = x_train[5]
    files_train = [f"{y}/train{i}.png" for i, y in enumerate(y_train)]
    files_test = [f"{y}/test{i}.png" for i, y in enumerate(y_test)]
    write_dataset(
        layout, x_train, y_train, x_test, y_test,
        train_files=files_train, test_files=files_test,
    )  # fmt: skip
    with pytest.raises(DataValidationError, match="train_test_duplicates: 2 test image") as e:
        run_validate(Params(), layout)
    assert "3/test3.png = 7/train17.png" in str(e.value)
    assert "8/test8.png = 5/train5.png" in str(e.value)
    details = check(layout, "train_test_duplicates")["details"]
    assert details["count"] == 2 and details["pairs"][0] == {"test": 3, "train": 17}


def test_few_duplicates_are_reported_but_tolerated(tmp_path: Path) -> None:
    layout = Layout(tmp_path)
    n_test = int(1 / DUPLICATE_TOLERANCE) * 2  # one duplicate = half the tolerance
    x_train, y_train, x_test, y_test = balanced(300, n_test)
    x_test[0] = x_train[9]
    write_dataset(layout, x_train, y_train, x_test, y_test)
    report = run_validate(Params(), layout)
    assert report.passed
    assert report.summary()["train_test_duplicates"] == 1.0
    assert check(layout, "train_test_duplicates")["details"]["examples"] == ["test[0] = train[9]"]


def test_class_imbalance_and_empty_class_fail(tmp_path: Path) -> None:
    layout = Layout(tmp_path)
    x_train, y_train, x_test, y_test = balanced(200)
    y_train[:] = np.where(np.arange(200) < 11, 1, 0)  # 189 zeros, 11 ones
    y_test[:] = y_test % 2
    write_dataset(layout, x_train, y_train, x_test, y_test, classes=["0", "1"])
    with pytest.raises(DataValidationError, match=r"class imbalance 17\.2 exceeds .*=10"):
        run_validate(Params(), layout)
    params = Params.model_validate({"data": {"max_class_imbalance": 20}})
    assert run_validate(params, layout).passed

    write_dataset(layout, x_train, y_train % 2, x_test, y_test, classes=["0", "1", "2"])
    with pytest.raises(DataValidationError, match=r"without training images: 2"):
        run_validate(params, layout)


def test_stale_shape_and_wrong_dtypes_fail(tmp_path: Path) -> None:
    layout = Layout(tmp_path)
    write_dataset(layout, *balanced())
    bigger = Params.model_validate({"data": {"image_size": 32}})
    with pytest.raises(DataValidationError, match=r"params ask for .*32, 32, 1.*re-run ingest"):
        run_validate(bigger, layout)

    x_train, y_train, x_test, y_test = balanced()
    write_dataset(layout, x_train, y_train.astype(np.float32), x_test, y_test[:-1])
    with pytest.raises(DataValidationError, match="y_train is float32") as e:
        run_validate(Params(), layout)
    assert "x_test has 50 images but y_test 49 labels" in str(e.value)


def test_unreadable_image_fails_validation_naming_the_file(tmp_path: Path) -> None:
    root = tmp_path / "pics"
    for cls in ("circle", "square"):
        for i in range(4):
            (root / cls).mkdir(parents=True, exist_ok=True)
            a = np.full((30, 30), 255, np.uint8)
            a[5 + i : 20, 8:20] = 0
            Image.fromarray(a).save(root / cls / f"{i}.png")
    (root / "square" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    params = Params.model_validate({"data": {"source": "imagefolder", "path": str(root)}})
    layout = Layout(tmp_path)
    result = run_ingest(params, layout)
    assert result.n_unreadable == 1 and result.n_train + result.n_test == 8
    with pytest.raises(
        DataValidationError, match=r"unreadable_files: 1 unreadable .*square/corrupt\.png"
    ):
        run_validate(params, layout)
    assert check(layout, "unreadable_files")["details"]["files"][0]["file"] == "square/corrupt.png"


def test_missing_ingest_outputs_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"dataset\.json not found: run `dvc repro ingest`"):
        run_validate(Params(), Layout(tmp_path))
    layout = Layout(tmp_path)
    write_dataset(layout, *balanced())
    layout.dataset_npz.write_bytes(b"not a zip")
    with pytest.raises(DataError, match=r"dataset\.npz is not a readable \.npz"):
        run_validate(Params(), layout)


def test_real_bundled_mnist_ingests_and_validates(tmp_path: Path) -> None:
    raw = REPO / "data" / "raw" / "mnist"
    params = Params.model_validate({"data": {"path": str(raw)}})
    layout = Layout(tmp_path)
    result = run_ingest(params, layout)
    assert (result.n_train, result.n_test, result.classes) == (
        60000,
        10000,
        [str(d) for d in range(10)],
    )
    meta = json.loads(layout.dataset_json.read_text())
    lines = (raw / "SHA256SUMS").read_text().splitlines()
    sums = {name: digest for digest, name in (line.split() for line in lines)}
    assert meta["checksums"] == sums
    report = run_validate(params, layout)
    assert report.passed
    assert check(layout, "train_test_duplicates")["details"]["count"] == 0
    counts = check(layout, "class_balance")["details"]["train_counts"]
    assert counts["1"] == 6742 and counts["5"] == 5421  # the well-known MNIST class counts
