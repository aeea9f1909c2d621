"""Validate stage: check the ingested data before anything learns from it.

Checks (each written to ``reports/validation.json`` with ``name``, ``passed``, ``details``):

- ``arrays``: the four arrays exist with uint8 ``(N, H, W, C)`` images and int64 labels,
  matching lengths, non-empty splits, file lists as long as the splits;
- ``shape``: images are ``image_size × image_size × channels`` as recorded in
  ``dataset.json`` and as the params ask (a mismatch means ingest is stale);
- ``label_range``: every label in ``[0, len(classes))``;
- ``class_balance``: every class has training images and the largest/smallest count
  ratio is at most ``data.max_class_imbalance``;
- ``train_test_duplicates``: test images whose pixels equal a training image;
- ``unreadable_files``: image files that could not be decoded at ingest.

Duplicate policy. Exact train/test duplicates leak test answers into training. Prepare
always removes training images that equal a test image, so a few duplicates do no harm
and are only reported; validation fails when more than ``DUPLICATE_TOLERANCE`` (1%) of the
test set has a copy in training, which signals a mis-assembled dataset rather than
chance. The bundled MNIST has none (checked: 0 of 10,000 test images).

On failure the report is still written, then :class:`DataValidationError` is raised with
a message naming the offending files (or array indices for sources without files).
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from visionops.config import Params
from visionops.data.ingest import DATASET_KEYS, read_json, read_npz, write_json
from visionops.errors import DataValidationError
from visionops.layout import Layout

log = logging.getLogger(__name__)

#: Largest fraction of test images that may have an exact copy in the training split.
DUPLICATE_TOLERANCE = 0.01
# How many offending items a check lists in its details and in the error message.
_MAX_LISTED = 20


@dataclass(frozen=True)
class Check:
    name: str
    passed: bool
    details: dict[str, Any] = field(default_factory=dict)
    problem: str = ""  # one line naming the offending files/indices when failed

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "passed": self.passed, "details": self.details}
        if self.problem:
            out["problem"] = self.problem
        return out


@dataclass(frozen=True)
class ValidationReport:
    source: str
    checks: list[Check]
    path: Path
    #: What ingest decided (``PreprocessSpec.to_dict()``) and the folder profile behind it.
    preprocess: dict[str, Any] = field(default_factory=dict)
    profile: dict[str, Any] | None = None
    #: Why the source was ingested again before validating, or None.
    reingested: str | None = None

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)

    @property
    def failures(self) -> list[Check]:
        return [c for c in self.checks if not c.passed]

    def summary(self) -> dict[str, float]:
        dup = next((c for c in self.checks if c.name == "train_test_duplicates"), None)
        return {
            "checks": float(len(self.checks)),
            "failed_checks": float(len(self.failures)),
            "passed": 1.0 if self.passed else 0.0,
            "train_test_duplicates": float(dup.details.get("count", 0)) if dup else 0.0,
        }

    def describe(self) -> str:
        pre = describe_preprocess(self.preprocess)
        if self.passed:
            return f"{self.source}: all {len(self.checks)} checks passed ({self.path}); {pre}"
        names = ", ".join(c.name for c in self.failures)
        return (
            f"{self.source}: {len(self.failures)} of {len(self.checks)} checks failed: "
            f"{names}; {pre}"
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "passed": self.passed,
            "preprocess": self.preprocess,
            "preprocess_summary": describe_preprocess(self.preprocess),
            "profile": self.profile,
            "reingested": self.reingested,
            "checks": [c.to_dict() for c in self.checks],
        }


def _name(split: str, i: int, files: list[str] | None) -> str:
    """``cats/x.png`` where the source has files, else ``train[12]``."""
    if files is not None and 0 <= i < len(files):
        return files[i]
    return f"{split}[{i}]"


def _listed(items: list[str]) -> str:
    more = f" and {len(items) - _MAX_LISTED} more" if len(items) > _MAX_LISTED else ""
    return ", ".join(items[:_MAX_LISTED]) + more


def _check_arrays(a: dict[str, np.ndarray], meta: dict[str, Any]) -> Check:
    problems = []
    for split in ("train", "test"):
        x, y = a[f"x_{split}"], a[f"y_{split}"]
        if x.dtype != np.uint8 or x.ndim != 4:
            problems.append(f"x_{split} is {x.dtype} {x.shape}, expected uint8 (N, H, W, C)")
        if y.dtype != np.int64 or y.ndim != 1:
            problems.append(f"y_{split} is {y.dtype} {y.shape}, expected int64 (N,)")
        if len(x) != len(y):
            problems.append(f"x_{split} has {len(x)} images but y_{split} {len(y)} labels")
        if len(y) == 0:
            problems.append(f"the {split} split is empty")
        files = meta.get(f"{split}_files")
        if files is not None and len(files) != len(y):
            problems.append(f"{split}_files lists {len(files)} names for {len(y)} images")
    details = {k: {"dtype": str(v.dtype), "shape": list(v.shape)} for k, v in sorted(a.items())}
    return Check("arrays", not problems, details, "; ".join(problems))


def _check_shape(a: dict[str, np.ndarray], meta: dict[str, Any], params: Params) -> Check:
    recorded = (meta.get("image_size"), meta.get("image_size"), meta.get("channels"))
    decided = meta.get("preprocess") or {}
    size = params.data.image_size or decided.get("image_size")
    channels = params.data.channels or decided.get("channels")
    if size is None or channels is None:  # written before the decision was recorded
        size, channels = params.data.shape()
    wanted = (size, size, channels)
    problems = []
    for split in ("train", "test"):
        x = a[f"x_{split}"]
        if x.ndim == 4 and tuple(x.shape[1:]) != recorded:
            problems.append(f"x_{split} images are {x.shape[1:]} but dataset.json says {recorded}")
    if recorded != wanted:
        problems.append(
            f"dataset.json records {recorded} but params ask for {wanted}; re-run ingest"
        )
    return Check(
        "shape",
        not problems,
        {"expected": list(wanted), "recorded": list(recorded)},
        "; ".join(problems),
    )


def _check_labels(a: dict[str, np.ndarray], meta: dict[str, Any], classes: list[str]) -> Check:
    k = len(classes)
    bad: list[str] = []
    counts: dict[str, int] = {}
    for split in ("train", "test"):
        y = a[f"y_{split}"].reshape(-1)
        idx = np.flatnonzero((y < 0) | (y >= k) | (y != np.floor(y)))
        counts[split] = len(idx)
        files = meta.get(f"{split}_files")
        bad.extend(f"{_name(split, int(i), files)} has label {int(y[i])}" for i in idx)
    passed = not bad and k >= 2 and len(set(classes)) == k
    problem = ""
    if bad:
        problem = f"{len(bad)} label(s) outside [0, {k}): {_listed(bad)}"
    elif k < 2 or len(set(classes)) != k:
        problem = f"classes must be at least 2 distinct names, got {classes}"
    return Check(
        "label_range",
        passed,
        {"num_classes": k, "out_of_range": counts, "examples": bad[:_MAX_LISTED]},
        problem,
    )


def _check_balance(y_train: np.ndarray, classes: list[str], max_ratio: float) -> Check:
    k = len(classes)
    y = np.asarray(y_train).reshape(-1)
    if k == 0 or y.dtype.kind not in "iu":
        return Check("class_balance", False, {}, f"cannot count classes ({k} names, {y.dtype})")
    y = y[(y >= 0) & (y < k)].astype(np.int64)
    counts = np.bincount(y, minlength=k)
    per_class = {c: int(n) for c, n in zip(classes, counts, strict=True)}
    empty = [c for c, n in per_class.items() if n == 0]
    ratio = float(counts.max() / counts.min()) if counts.min() > 0 else float("inf")
    problem = ""
    if empty:
        problem = f"class(es) without training images: {_listed(empty)}"
    elif ratio > max_ratio:
        big = classes[int(counts.argmax())]
        small = classes[int(counts.argmin())]
        problem = (
            f"class imbalance {ratio:.1f} exceeds data.max_class_imbalance={max_ratio:g} "
            f"('{big}': {counts.max()} images, '{small}': {counts.min()})"
        )
    details = {
        "train_counts": per_class,
        "ratio": ratio if np.isfinite(ratio) else None,
        "max_ratio": max_ratio,
    }
    return Check("class_balance", not problem, details, problem)


def image_digests(x: np.ndarray) -> list[bytes]:
    """A 128-bit digest of each image's pixel bytes."""
    return [hashlib.blake2b(img.tobytes(), digest_size=16).digest() for img in x]


def train_test_duplicates(x_train: np.ndarray, x_test: np.ndarray) -> list[tuple[int, int]]:
    """``(test_index, train_index)`` pairs of images with identical pixels."""
    first_in_train: dict[bytes, int] = {}
    for i, d in enumerate(image_digests(x_train)):
        first_in_train.setdefault(d, i)
    return [
        (j, first_in_train[d]) for j, d in enumerate(image_digests(x_test)) if d in first_in_train
    ]


def _check_duplicates(a: dict[str, np.ndarray], meta: dict[str, Any]) -> Check:
    x_train, x_test = a["x_train"], a["x_test"]
    if x_train.shape[1:] != x_test.shape[1:]:
        return Check("train_test_duplicates", True, {"count": 0, "skipped": "shapes differ"})
    pairs = train_test_duplicates(x_train, x_test)
    n_test = max(len(x_test), 1)
    fraction = len(pairs) / n_test
    listed = [
        f"{_name('test', j, meta.get('test_files'))} = {_name('train', i, meta.get('train_files'))}"
        for j, i in pairs
    ]
    passed = fraction <= DUPLICATE_TOLERANCE
    problem = ""
    if not passed:
        problem = (
            f"{len(pairs)} test image(s) ({fraction:.1%}, tolerance {DUPLICATE_TOLERANCE:.0%}) "
            f"have an identical copy in training: {_listed(listed)}"
        )
    details = {
        "count": len(pairs),
        "fraction_of_test": fraction,
        "tolerance": DUPLICATE_TOLERANCE,
        "pairs": [{"test": j, "train": i} for j, i in pairs[:_MAX_LISTED]],
        "examples": listed[:_MAX_LISTED],
        "policy": "prepare drops training images identical to a test image",
    }
    return Check("train_test_duplicates", passed, details, problem)


def _check_unreadable(meta: dict[str, Any]) -> Check:
    bad = meta.get("unreadable") or []
    listed = [f"{b.get('file')} ({b.get('reason')})" for b in bad]
    problem = f"{len(bad)} unreadable image file(s): {_listed(listed)}" if bad else ""
    return Check("unreadable_files", not bad, {"count": len(bad), "files": bad}, problem)


def describe_preprocess(decided: dict[str, Any]) -> str:
    """One line saying how pictures become model inputs (the decisions of ingest)."""
    if not decided:
        return "preprocessing: not recorded (re-run ingest)"
    size, channels = decided.get("image_size"), decided.get("channels")
    colour = "colour" if channels == 3 else "grey"
    if decided.get("kind") == "natural":
        how = "natural pictures: resize the shorter side, centre-crop; no inversion, no centring"
    else:
        centre = "digit centring" if decided.get("center") else "no centring"
        how = f"digits: invert {decided.get('invert')}, {centre}"
    return f"preprocessing: {size}x{size} {colour}, {how}"


def run_validate(params: Params, layout: Layout) -> ValidationReport:
    """Run every check, write ``reports/validation.json``; raise if any check failed.

    When the ingested data is stale (params or the image folder changed since ingest,
    see :func:`~visionops.data.ingest.stale_reason`) the source is ingested again first.
    """
    from visionops.data.ingest import run_ingest, stale_reason

    reason = stale_reason(params, layout)
    if reason is not None:
        log.info("re-reading %s: %s", params.data.path, reason)
        run_ingest(params, layout)
    meta = read_json(layout.dataset_json)
    arrays = read_npz(layout.dataset_npz, DATASET_KEYS)
    classes = [str(c) for c in meta.get("classes") or []]
    source = str(meta.get("source", params.data.source))

    checks = [_check_arrays(arrays, meta), _check_shape(arrays, meta, params)]
    checks.append(_check_labels(arrays, meta, classes))
    checks.append(_check_balance(arrays["y_train"], classes, params.data.max_class_imbalance))
    checks.append(_check_duplicates(arrays, meta))
    checks.append(_check_unreadable(meta))

    path = layout.reports_dir / "validation.json"
    report = ValidationReport(
        source=source,
        checks=checks,
        path=path,
        preprocess=dict(meta.get("preprocess") or {}),
        profile=meta.get("profile"),
        reingested=reason,
    )
    write_json(path, report.to_dict())
    if not report.passed:
        lines = "; ".join(f"{c.name}: {c.problem}" for c in report.failures)
        raise DataValidationError(f"data validation failed (see {path}): {lines}")
    log.info("validated %s", report.describe())
    return report
