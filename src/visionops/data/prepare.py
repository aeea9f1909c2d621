"""Prepare stage: the train/validation split, test cap and normalisation statistics.

Reads the ingest outputs and writes ``layout.split_npz("train"|"val"|"test")`` (``x``
uint8 NHWC, ``y`` int64, and ``index``: each row's position in ``dataset.npz``'s
``x_train``/``x_test``, which maps back to ``dataset.json``'s file names; for an image
folder the validation and test splits also hold ``size``, int64 ``(N, 2)`` width, height
of each picture before preprocessing, and ``format``, each file's format, which export's
reference profile records) and
``layout.prepared_meta``.

Policy, all driven by ``seed`` (NumPy ``Generator``s) so the same params give the same
bytes:

1. Training images whose pixels equal a test image are dropped (see the duplicate policy
   in :mod:`visionops.data.validate`).
2. The remaining training pool is shuffled; ``data.limit`` caps the pool, i.e. the images
   train and validation are drawn from together.
3. Validation takes the pictures of an image folder's ``val/`` when it has one, else
   ``round(val_fraction * n)`` images, shared among the classes in
   proportion to their size (stratified, largest remainders first; a class never gives
   away its last image); the rest is the training split.
4. ``data.test_limit`` keeps a seeded random subset of the test set (a prefix could be a
   single class for an image folder sorted by class).
5. ``mean``/``std`` per channel on the ``[0, 1]`` scale come from the training split only,
   computed exactly from pixel histograms.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

from visionops.config import Params
from visionops.data.ingest import (
    DATASET_KEYS,
    EXTRA_KEYS,
    ORIGINAL_KEYS,
    read_json,
    read_npz,
    write_json,
    write_npz,
)
from visionops.data.validate import image_digests
from visionops.errors import DataError
from visionops.layout import Layout

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PrepareResult:
    source: str
    classes: list[str]
    n_train: int
    n_val: int
    n_test: int
    mean: list[float]
    std: list[float]
    dropped_duplicates: int

    def summary(self) -> dict[str, float]:
        out = {
            "n_train": float(self.n_train),
            "n_val": float(self.n_val),
            "n_test": float(self.n_test),
            "dropped_duplicates": float(self.dropped_duplicates),
        }
        for c, (m, s) in enumerate(zip(self.mean, self.std, strict=True)):
            out[f"mean_{c}"] = m
            out[f"std_{c}"] = s
        return out

    def describe(self) -> str:
        mean = ", ".join(f"{m:.4f}" for m in self.mean)
        std = ", ".join(f"{s:.4f}" for s in self.std)
        dropped = (
            f", {self.dropped_duplicates} train duplicate(s) of test images dropped"
            if self.dropped_duplicates
            else ""
        )
        return (
            f"{self.source}: {self.n_train} train / {self.n_val} val / {self.n_test} test, "
            f"mean [{mean}] std [{std}]{dropped}"
        )


def split_train_val(
    y: np.ndarray,
    pool: np.ndarray,
    val_fraction: float,
    rng: np.random.Generator,
    limit: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Seeded, per-class split of the indices ``pool`` into (train, validation), sorted."""
    order = rng.permutation(pool)
    if limit is not None:
        order = order[:limit]
    labels, sizes = np.unique(y[order], return_counts=True)
    # Largest-remainder allocation: the classes' shares add up to round(f * n) exactly.
    total = round(len(order) * val_fraction)
    quotas = sizes * (total / max(len(order), 1))
    n_vals = np.floor(quotas).astype(np.int64)
    by_remainder = np.argsort(-(quotas - n_vals), kind="stable")
    n_vals[by_remainder[: total - int(n_vals.sum())]] += 1
    val_parts = []
    for label, size, n_val in zip(labels, sizes, n_vals, strict=True):
        members = order[y[order] == label]
        # Every class keeps at least one training image.
        val_parts.append(members[: min(int(n_val), int(size) - 1)])
    val = np.sort(np.concatenate(val_parts)) if val_parts else np.zeros(0, dtype=np.int64)
    train = np.sort(np.setdiff1d(order, val))
    return train.astype(np.int64), val.astype(np.int64)


def channel_stats(x: np.ndarray) -> tuple[list[float], list[float]]:
    """Exact per-channel mean and std of uint8 NHWC images on the ``[0, 1]`` scale."""
    if len(x) == 0:
        raise DataError("cannot compute normalisation statistics of an empty training split")
    values = np.arange(256, dtype=np.float64)
    means, stds = [], []
    for c in range(x.shape[-1]):
        counts = np.bincount(np.ascontiguousarray(x[..., c]).reshape(-1), minlength=256)
        n = float(counts.sum())
        mean = float((counts * values).sum() / n)
        var = float((counts * (values - mean) ** 2).sum() / n)
        std = float(np.sqrt(var)) / 255.0
        if std < 1e-6:
            log.warning("channel %d is constant in the training split; using std=1", c)
            std = 1.0
        means.append(mean / 255.0)
        stds.append(std)
    return means, stds


def _extra_images(layout: Layout, shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """``x_extra``/``y_extra`` of ``dataset.npz``; empty when an older ingest wrote none."""
    try:
        a = read_npz(layout.dataset_npz, EXTRA_KEYS)
    except DataError:
        return np.zeros((0, *shape), np.uint8), np.zeros(0, np.int64)
    if a["x_extra"].ndim != 4 or tuple(a["x_extra"].shape[1:]) != tuple(shape):
        raise DataError(
            f"{layout.dataset_npz}: extra images of shape {a['x_extra'].shape[1:]}, "
            f"the dataset's are {tuple(shape)}; run ingest again"
        )
    return a["x_extra"].astype(np.uint8), a["y_extra"].astype(np.int64)


def _originals(layout: Layout) -> dict[str, np.ndarray] | None:
    """``dataset.npz``'s picture sizes and formats (image folders), None without them."""
    with np.load(layout.dataset_npz, allow_pickle=False) as npz:
        has = all(k in npz.files for k in ORIGINAL_KEYS)
    return read_npz(layout.dataset_npz, ORIGINAL_KEYS) if has else None


def _decided_preprocess(meta: dict[str, Any]) -> dict[str, Any]:
    """How ingest turned files into pictures (``dataset.json``), without its geometry and
    statistics (prepare records those itself): kind, invert, center, digit_box."""
    decided = meta["preprocess"]
    if not isinstance(decided, dict):
        raise DataError(f"dataset.json: 'preprocess' is not a mapping ({decided!r}); re-run ingest")
    return {k: v for k, v in decided.items() if k not in ("image_size", "channels", "mean", "std")}


def run_prepare(params: Params, layout: Layout) -> PrepareResult:
    """Split, cap and compute statistics from the ingest outputs; write data/prepared/."""
    meta = read_json(layout.dataset_json)
    a = read_npz(layout.dataset_npz, DATASET_KEYS)
    x_train, y_train, x_test, y_test = (a[k] for k in DATASET_KEYS)
    classes = [str(c) for c in meta.get("classes") or []]
    # Source and preprocessing are facts of the ingested data (params of ingest).
    missing = [k for k in ("source", "preprocess") if k not in meta]
    if missing:
        raise DataError(f"{layout.dataset_json}: no {missing}; run `dvc repro ingest`")
    source = str(meta["source"])
    if x_train.ndim != 4 or x_test.ndim != 4:
        raise DataError(f"{layout.dataset_npz}: images are not (N, H, W, C); run validate")

    # Never let an exact copy of a test image train the model.
    test_digests = set(image_digests(x_test))
    is_dup = np.fromiter((d in test_digests for d in image_digests(x_train)), dtype=bool)
    pool = np.flatnonzero(~is_dup).astype(np.int64)
    dropped = int(is_dup.sum())
    if dropped:
        log.info("dropping %d training image(s) identical to a test image", dropped)

    seed = params.seed % 2**63  # SeedSequence takes non-negative integers only
    rng_split = np.random.default_rng([seed, 0])
    rng_test = np.random.default_rng([seed, 1])
    predefined = meta.get("val_indices")
    if predefined:  # an image folder's val/: the validation split is given
        val_idx = np.intersect1d(np.asarray(predefined, dtype=np.int64), pool)
        order = rng_split.permutation(np.setdiff1d(pool, val_idx))
        if params.data.limit is not None:
            order = order[: params.data.limit]
        train_idx = np.sort(order).astype(np.int64)
    else:
        train_idx, val_idx = split_train_val(
            y_train, pool, params.data.val_fraction, rng_split, params.data.limit
        )
    if len(train_idx) == 0 or len(val_idx) == 0:
        raise DataError(
            f"{layout.dataset_npz}: {len(train_idx)} training and {len(val_idx)} validation "
            f"images after the split; need more images (data.limit={params.data.limit}, "
            f"data.val_fraction={params.data.val_fraction})"
        )
    test_idx = np.arange(len(y_test), dtype=np.int64)
    if params.data.test_limit is not None and params.data.test_limit < len(y_test):
        test_idx = np.sort(rng_test.choice(len(y_test), params.data.test_limit, replace=False))

    # Extra training images (data.extra_path, e.g. labelled served inputs): the training
    # split only, after the limit, never an exact copy of a test image.
    x_extra, y_extra = _extra_images(layout, x_train.shape[1:])
    extra_keep = np.fromiter(
        (d not in test_digests for d in image_digests(x_extra)), dtype=bool, count=len(x_extra)
    )
    x_extra, y_extra = x_extra[extra_keep], y_extra[extra_keep]
    if len(y_extra):
        log.info("adding %d extra training image(s) from data.extra_path", len(y_extra))

    x_fit = np.concatenate([x_train[train_idx], x_extra])
    y_fit = np.concatenate([y_train[train_idx], y_extra])
    # index: position in dataset.npz's x_train; -1 - i for the i-th extra image.
    fit_index = np.concatenate([train_idx, -1 - np.flatnonzero(extra_keep)]).astype(np.int64)
    mean, std = channel_stats(x_fit)
    write_npz(layout.split_npz("train"), {"x": x_fit, "y": y_fit, "index": fit_index})
    originals = _originals(layout)
    for split, x, y, idx, part in (
        ("val", x_train, y_train, val_idx, "train"),
        ("test", x_test, y_test, test_idx, "test"),
    ):
        arrays = {"x": x[idx], "y": y[idx], "index": idx}
        if originals is not None:
            arrays["size"] = originals[f"size_{part}"][idx]
            arrays["format"] = originals[f"format_{part}"][idx]
        write_npz(layout.split_npz(split), arrays)

    prepared: dict[str, Any] = {
        "classes": classes,
        "image_size": int(x_train.shape[1]),
        "channels": int(x_train.shape[3]),
        "mean": mean,
        "std": std,
        "n_train": len(y_fit),
        "n_extra": len(y_extra),
        "n_val": len(val_idx),
        "n_test": len(test_idx),
        "source": source,
        "preprocess": _decided_preprocess(meta),
        "seed": params.seed,
        "val_fraction": params.data.val_fraction,
        "limit": params.data.limit,
        "test_limit": params.data.test_limit,
        "dropped_train_duplicates": dropped,
    }
    write_json(layout.prepared_meta, prepared)
    result = PrepareResult(
        source=source,
        classes=classes,
        n_train=len(y_fit),
        n_val=len(val_idx),
        n_test=len(test_idx),
        mean=mean,
        std=std,
        dropped_duplicates=dropped,
    )
    log.info("prepared %s", result.describe())
    return result
