"""The reference profile: what the exported model sees and says on the validation split.

Written by the export stage beside ``model.onnx`` (so it travels with the registered
model) and read by drift detection, the monitoring report and the server:

- ``reference.json`` — per-image statistics (:data:`~visionops.monitor.stats.DIGIT_STATS`
  for digit models, :data:`~visionops.monitor.stats.PHOTO_STATS` (plus
  :data:`~visionops.monitor.stats.SIZE_STATS` when the original sizes are given) for
  models of photos, by ``spec.kind``; a seeded sample of at most ``max_samples`` images,
  rounded), the predicted-class counts, the confidence values, the validation accuracy
  when labels are given (and the confidence threshold of the accuracy estimate,
  ``atc_threshold``, computed on the whole split: :mod:`visionops.monitor.performance`),
  and which model it belongs to (``model_digest``: the sha256 prefix serving computes
  for ``model.onnx``; ``model_version``: null at export time, filled in from the
  registry when served).
- ``reference_embeddings.npy`` — a seeded sample of embeddings, float32 ``(M, D)``,
  written with ``np.save`` and read with ``allow_pickle=False``.
- ``ood_scores`` in ``reference.json`` (when the export gives its out-of-distribution
  detector, :class:`visionops.ood.OodDetector`): quantiles of the validation split's OOD
  scores per *predicted* class (:class:`OodScoreProfile`), what the class-conditional
  OOD-score check of :mod:`visionops.monitor.performance` compares a window's logged
  ``ood_score`` with. Profiles written before it have none; the check is then skipped.

No torch: ONNX Runtime runs the exported graph, as the server does.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from visionops.artifacts import read_array
from visionops.data.transforms import PreprocessSpec, normalize
from visionops.errors import DataError, ModelError
from visionops.monitor.stats import PHOTO_STATS, image_statistics, size_statistics

if TYPE_CHECKING:
    from visionops.ood import OodDetector

log = logging.getLogger(__name__)

REFERENCE_FILE = "reference.json"
EMBEDDINGS_FILE = "reference_embeddings.npy"
FORMAT = "visionops-reference/1"
MODEL_FILE = "model.onnx"
METADATA_FILE = "metadata.json"


#: Quantile levels of the per-class OOD-score profile.
OOD_SCORE_LEVELS: tuple[float, ...] = (0.5, 0.75, 0.9, 0.95, 0.99)
#: Fewest validation predictions of a class for quantiles of its own; a rarer class uses
#: the quantiles of the whole split (a 90th percentile of a handful of scores is noise).
MIN_CLASS_SCORES = 50


@dataclass(frozen=True)
class OodScoreProfile:
    """Quantiles of the validation split's out-of-distribution scores, per predicted class.

    ``by_class`` float64 ``(K, L)``: row ``k`` holds the ``levels`` quantiles of the kNN
    scores (:meth:`visionops.ood.OodDetector.score`) of the validation images predicted as
    class ``k`` — the pooled quantiles when fewer than :data:`MIN_CLASS_SCORES` were;
    ``pooled`` ``(L,)`` those of the whole split; ``counts`` int64 ``(K,)`` the images per
    predicted class. Conditioning on the predicted class keeps a change of the class mix
    (label shift) from looking like a change of the scores: classes differ in how far
    their images lie from the training bank (MNIST validation medians 0.13 for '1',
    0.30 for '2').
    """

    levels: tuple[float, ...]
    by_class: np.ndarray
    pooled: np.ndarray
    counts: np.ndarray
    k: int  # the detector's neighbour rank, so a reader can tell which score it profiles

    @classmethod
    def from_scores(
        cls,
        scores: np.ndarray,
        predicted: np.ndarray,
        n_classes: int,
        k: int,
        levels: Sequence[float] = OOD_SCORE_LEVELS,
    ) -> OodScoreProfile:
        """The profile of OOD ``scores`` float ``(N,)`` of images predicted as
        ``predicted`` int ``(N,)`` (class indices below ``n_classes``)."""
        s = np.asarray(scores, dtype=np.float64)
        p = np.asarray(predicted, dtype=np.int64)
        if s.shape != p.shape or s.ndim != 1 or s.size == 0:
            raise DataError(f"need one OOD score per prediction, got {s.shape} and {p.shape}")
        lv = tuple(float(q) for q in levels)
        pooled = np.quantile(s, lv)
        counts = np.bincount(p, minlength=n_classes).astype(np.int64)
        by_class = np.stack(
            [
                np.quantile(s[p == c], lv) if counts[c] >= MIN_CLASS_SCORES else pooled
                for c in range(n_classes)
            ]
        )
        return cls(levels=lv, by_class=by_class, pooled=pooled, counts=counts, k=int(k))

    def thresholds(self, level: float) -> np.ndarray | None:
        """float64 ``(K,)``: each class's ``level`` quantile; None when not profiled."""
        for j, q in enumerate(self.levels):
            if abs(q - level) < 1e-9:
                return np.asarray(self.by_class[:, j], dtype=np.float64)
        return None

    def to_json_dict(self) -> dict[str, Any]:
        return {
            "levels": list(self.levels),
            "by_class": [[round(float(v), 6) for v in row] for row in self.by_class],
            "pooled": [round(float(v), 6) for v in self.pooled],
            "counts": [int(c) for c in self.counts],
            "k": self.k,
            "min_class_scores": MIN_CLASS_SCORES,
        }

    @classmethod
    def from_json_dict(cls, raw: Any, n_classes: int, where: str) -> OodScoreProfile:
        """Read :meth:`to_json_dict`'s output; :class:`DataError` naming ``where``."""
        if not isinstance(raw, dict):
            raise DataError(f"{where}: 'ood_scores' must be an object")
        try:
            levels = tuple(float(q) for q in raw["levels"])
            by_class = np.asarray(raw["by_class"], dtype=np.float64)
            pooled = np.asarray(raw["pooled"], dtype=np.float64)
            counts = np.asarray(raw["counts"], dtype=np.int64)
            k = int(raw["k"])
        except KeyError as exc:
            raise DataError(f"{where}: 'ood_scores' has no {exc.args[0]!r}") from None
        except (TypeError, ValueError) as exc:
            raise DataError(f"{where}: malformed 'ood_scores' ({exc})") from None
        if (
            by_class.shape != (n_classes, len(levels))
            or pooled.shape != (len(levels),)
            or counts.shape != (n_classes,)
            or not np.isfinite(by_class).all()
        ):
            raise DataError(
                f"{where}: 'ood_scores' must hold {len(levels)} finite quantiles for each of "
                f"{n_classes} classes, got by_class {by_class.shape}"
            )
        return cls(levels=levels, by_class=by_class, pooled=pooled, counts=counts, k=k)


def model_digest(onnx_path: Path) -> str:
    """The sha256 prefix serving reports for a model file (``LoadedModel.digest``)."""
    return hashlib.sha256(onnx_path.read_bytes()).hexdigest()[:16]


@dataclass(frozen=True)
class ReferenceProfile:
    """The validation split as the model saw it; everything drift is measured against."""

    classes: tuple[str, ...]
    n_images: int
    stats: dict[str, np.ndarray]  # name -> per-image values (a sample of the split)
    confidence: np.ndarray  # top-class probability per image (same sample)
    class_counts: np.ndarray  # predicted-class counts over the whole split, (K,)
    embeddings: np.ndarray = field(repr=False)  # (M, D) float32 sample
    model_name: str | None = None
    model_version: str | None = None
    model_digest: str | None = None
    accuracy: float | None = None  # on the split, when labels were given
    #: The confidence above which the whole split's share of predictions equals its
    #: accuracy (average thresholded confidence); None without labels.
    atc_threshold: float | None = None
    created: str = ""
    source: str | None = None  # where it was read from
    #: Pictures per file format (PNG, JPEG, ...) over the whole split; None: not known
    #: (MNIST and CIFAR-10 arrays have no file format).
    format_counts: dict[str, int] | None = None
    #: Per-class quantiles of the validation split's OOD scores; None: the profile was
    #: written before they were recorded, or the model has no OOD detector.
    ood_scores: OodScoreProfile | None = None

    @property
    def class_distribution(self) -> np.ndarray:
        """Predicted-class shares on the reference split (sums to 1)."""
        total = float(self.class_counts.sum())
        return self.class_counts / total if total > 0 else self.class_counts.astype(float)

    @property
    def kind(self) -> str:
        """``natural`` for a model of photos (its profile holds the photo statistics),
        else ``digit``: which statistics a window of its traffic is measured by."""
        return "natural" if any(n in self.stats for n in PHOTO_STATS) else "digit"

    @property
    def embedding_dim(self) -> int:
        return int(self.embeddings.shape[1]) if self.embeddings.ndim == 2 else 0

    def info(self) -> dict[str, Any]:
        """What the API and reports say about the reference."""
        return {
            "model_name": self.model_name,
            "model_version": self.model_version,
            "model_digest": self.model_digest,
            "n_images": self.n_images,
            "n_samples": len(self.confidence),
            "n_embeddings": int(self.embeddings.shape[0]),
            "accuracy": self.accuracy,
            "created": self.created,
        }

    def summary(self) -> dict[str, float]:
        out = {
            "reference_images": float(self.n_images),
            "reference_samples": float(len(self.confidence)),
            "reference_embeddings": float(self.embeddings.shape[0]),
            "reference_mean_confidence": float(np.mean(self.confidence)),
        }
        if self.accuracy is not None:
            out["reference_accuracy"] = self.accuracy
        return out

    def describe(self) -> str:
        acc = f", accuracy {self.accuracy:.4f}" if self.accuracy is not None else ""
        return (
            f"reference of {self.n_images} images ({len(self.confidence)} sampled, "
            f"{self.embeddings.shape[0]} embeddings of size {self.embedding_dim}){acc}"
        )

    def to_json_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "created": self.created,
            "model_name": self.model_name,
            "model_version": self.model_version,
            "model_digest": self.model_digest,
            "classes": list(self.classes),
            "n_images": self.n_images,
            "accuracy": self.accuracy,
            "atc_threshold": self.atc_threshold,
            "class_counts": [int(c) for c in self.class_counts],
            "confidence": [round(float(v), 6) for v in self.confidence],
            "stats": {k: [round(float(v), 5) for v in vals] for k, vals in self.stats.items()},
            "embeddings_file": EMBEDDINGS_FILE,
            "format_counts": self.format_counts,
            "ood_scores": None if self.ood_scores is None else self.ood_scores.to_json_dict(),
        }

    def save(self, folder: Path) -> Path:
        """Write ``reference.json`` and ``reference_embeddings.npy`` into ``folder``."""
        folder.mkdir(parents=True, exist_ok=True)
        np.save(folder / EMBEDDINGS_FILE, np.ascontiguousarray(self.embeddings, np.float32))
        path = folder / REFERENCE_FILE
        path.write_text(json.dumps(self.to_json_dict(), separators=(",", ":")) + "\n")
        return path


# --------------------------------------------------------------------------- build


def open_onnx(path: Path, threads: int = 0) -> Any:
    """An ONNX Runtime CPU session for ``path`` (``threads=0``: ONNX Runtime decides)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.log_severity_level = 3
    try:
        return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    except Exception as exc:  # ORT raises its own exception types
        raise ModelError(f"{path}: ONNX Runtime cannot load the model ({exc})") from None


def score_images(
    session: Any, x_uint8_nhwc: np.ndarray, spec: PreprocessSpec, batch_size: int = 256
) -> tuple[np.ndarray, np.ndarray]:
    """``probabilities`` (N, K) and ``embedding`` (N, D) of model-sized uint8 images.

    Normalised with :func:`visionops.data.transforms.normalize`, exactly like serving.
    """
    probs, embs = [], []
    for i in range(0, len(x_uint8_nhwc), batch_size):
        x = normalize(x_uint8_nhwc[i : i + batch_size], spec)
        p, e = session.run(["probabilities", "embedding"], {"input": x})
        probs.append(np.asarray(p, np.float32))
        embs.append(np.asarray(e, np.float32).reshape(len(x), -1))
    if not probs:
        raise DataError("no images to score")
    return np.concatenate(probs), np.concatenate(embs)


def atc_threshold(confidence: np.ndarray, accuracy: float) -> float:
    """Average thresholded confidence (Garg et al., ICLR 2022): the confidence above which
    the share of predictions equals ``accuracy`` — the ``1 - accuracy`` quantile of the
    top-1 probabilities ``confidence`` (N,)."""
    c = np.asarray(confidence, dtype=np.float64)
    return float(np.quantile(c, min(max(1.0 - accuracy, 0.0), 1.0)))


def _read_metadata(export_dir: Path) -> dict[str, Any]:
    path = export_dir / METADATA_FILE
    if not path.is_file():
        return {}
    try:
        meta = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelError(f"{path}: unreadable metadata ({exc})") from None
    return meta if isinstance(meta, dict) else {}


def build_reference_profile(
    export_dir: Path,
    x_val_uint8_nhwc: np.ndarray,
    spec: PreprocessSpec,
    y_val: np.ndarray | None = None,
    *,
    classes: Sequence[str] | None = None,
    max_samples: int = 5000,
    embedding_samples: int = 1000,
    seed: int = 0,
    write: bool = True,
    original_sizes: np.ndarray | None = None,
    original_formats: Sequence[str] | None = None,
    ood_detector: OodDetector | None = None,
) -> ReferenceProfile:
    """Run ``export_dir/model.onnx`` over the validation images and profile what it sees.

    ``x_val_uint8_nhwc`` are the prepared validation images (uint8 ``(N, H, W, C)``, the
    model-sized pixels, as the server computes its statistics from); ``y_val`` their
    labels (optional: only for the recorded accuracy). Classes come from ``classes`` or
    ``export_dir/metadata.json``. With ``write`` the profile is saved beside the model.
    The statistics follow ``spec.kind`` (:func:`~visionops.monitor.stats.image_statistics`);
    ``original_sizes`` (``(N, 2)`` width, height in pixels of the pictures before
    preprocessing, optional) adds the size statistics, ``original_formats`` (``N`` file
    format names, optional) the format shares; ``ood_detector`` (the model's calibrated
    :class:`visionops.ood.OodDetector`, optional) the per-class quantiles of the split's
    OOD scores (:class:`OodScoreProfile`, from every image). Raises :class:`DataError` for
    images or sizes of the wrong shape, :class:`ModelError` for a model that does not fit.
    """
    export_dir = Path(export_dir)
    onnx_path = export_dir / MODEL_FILE
    if not onnx_path.is_file():
        raise ModelError(f"{onnx_path} not found: export the model before profiling it")
    x = np.asarray(x_val_uint8_nhwc)
    if x.ndim == 3:
        x = x[..., None]
    if x.dtype != np.uint8 or x.ndim != 4 or len(x) == 0:
        raise DataError(
            f"reference images must be non-empty uint8 (N, H, W, C), got {x.dtype} {x.shape}"
        )
    sizes = None
    if original_sizes is not None:
        sizes = np.asarray(original_sizes)
        if sizes.shape != (len(x), 2):
            raise DataError(
                f"original_sizes must be (N, 2) = ({len(x)}, 2) width, height, got {sizes.shape}"
            )
    formats = None
    if original_formats is not None:
        if len(original_formats) != len(x):
            raise DataError(f"{len(original_formats)} original formats for {len(x)} images")
        formats = dict(sorted(Counter(str(f) for f in original_formats).items()))
    meta = _read_metadata(export_dir)
    names = tuple(str(c) for c in (classes or meta.get("classes") or ()))

    probs, emb = score_images(open_onnx(onnx_path), x, spec)
    if not names:
        names = tuple(str(i) for i in range(probs.shape[1]))
    if probs.shape[1] != len(names):
        raise ModelError(
            f"{onnx_path}: {probs.shape[1]} probabilities per image but {len(names)} classes"
        )
    predicted = probs.argmax(axis=1)
    accuracy = atc = None
    if y_val is not None:
        y = np.asarray(y_val).reshape(-1)
        if len(y) != len(x):
            raise DataError(f"{len(y)} labels for {len(x)} reference images")
        accuracy = float((predicted == y).mean())
        # From every image, not the sample: a tail quantile needs all of them.
        atc = atc_threshold(probs[np.arange(len(x)), predicted], accuracy)

    ood_scores = None
    if ood_detector is not None:
        ood_scores = OodScoreProfile.from_scores(
            ood_detector.score(emb), predicted, len(names), ood_detector.k
        )

    rng = np.random.default_rng(seed)
    n = len(x)
    sample = np.sort(rng.choice(n, size=min(n, max_samples), replace=False))
    emb_sample = np.sort(rng.choice(n, size=min(n, embedding_samples), replace=False))
    stats = image_statistics(x[sample], spec.kind)
    if sizes is not None:
        stats.update(size_statistics(sizes[sample]))
    profile = ReferenceProfile(
        classes=names,
        n_images=n,
        stats=stats,
        confidence=probs[sample, predicted[sample]].astype(np.float64),
        class_counts=np.bincount(predicted, minlength=len(names)).astype(np.int64),
        embeddings=emb[emb_sample].astype(np.float32),
        model_name=str(meta["name"]) if meta.get("name") else None,
        model_version=None,
        model_digest=model_digest(onnx_path),
        accuracy=accuracy,
        atc_threshold=atc,
        created=datetime.now(UTC).isoformat(timespec="seconds"),
        source=str(export_dir / REFERENCE_FILE),
        format_counts=formats,
        ood_scores=ood_scores,
    )
    if write:
        profile.save(export_dir)
        log.info("wrote %s: %s", export_dir / REFERENCE_FILE, profile.describe())
    return profile


# --------------------------------------------------------------------------- load


def _float_array(value: Any, where: str) -> np.ndarray:
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise DataError(f"{where} must be a list of numbers") from None
    if arr.ndim != 1 or not np.isfinite(arr).all():
        raise DataError(f"{where} must be a flat list of finite numbers")
    return arr


def _format_counts(value: Any, json_path: Path) -> dict[str, int] | None:
    if value is None:
        return None
    if not isinstance(value, dict) or not all(
        isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value.values()
    ):
        raise DataError(f"{json_path}: 'format_counts' must map format names to counts")
    return {str(k): int(v) for k, v in value.items()}


def load_reference(path: str | Path) -> ReferenceProfile:
    """Read a profile from a model folder or a ``reference.json`` path.

    Raises :class:`DataError` naming the file for anything missing or malformed.
    """
    p = Path(path)
    json_path = p / REFERENCE_FILE if p.is_dir() else p
    if not json_path.is_file():
        raise DataError(
            f"no reference profile at {json_path}: the export stage writes it "
            "(build_reference_profile)"
        )
    try:
        raw = json.loads(json_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{json_path}: unreadable reference profile ({exc})") from None
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        got = raw.get("format") if isinstance(raw, dict) else type(raw).__name__
        raise DataError(f"{json_path}: not a reference profile (format {got!r}, want {FORMAT!r})")
    try:
        classes = tuple(str(c) for c in raw["classes"])
        stats_raw = raw["stats"]
        confidence = _float_array(raw["confidence"], f"{json_path}: 'confidence'")
        counts = np.asarray(raw["class_counts"], dtype=np.int64)
    except KeyError as exc:
        raise DataError(f"{json_path}: missing key {exc.args[0]!r}") from None
    except (TypeError, ValueError) as exc:
        raise DataError(f"{json_path}: malformed reference profile ({exc})") from None
    if not isinstance(stats_raw, dict):
        raise DataError(f"{json_path}: 'stats' must be an object of lists")
    stats = {str(k): _float_array(v, f"{json_path}: stats.{k}") for k, v in stats_raw.items()}
    bad = [k for k, v in stats.items() if len(v) != len(confidence)]
    if bad:
        raise DataError(f"{json_path}: stats {bad} do not have one value per sampled image")
    if counts.shape != (len(classes),):
        raise DataError(
            f"{json_path}: 'class_counts' has {counts.size} entries for {len(classes)} classes"
        )
    emb_path = json_path.parent / str(raw.get("embeddings_file") or EMBEDDINGS_FILE)
    embeddings = read_array(emb_path, DataError, f"written with {json_path.name}", "embeddings")
    if embeddings.ndim != 2 or not np.issubdtype(embeddings.dtype, np.floating):
        raise DataError(f"{emb_path}: expected a float (M, D) array, got {embeddings.shape}")
    accuracy = raw.get("accuracy")
    atc = raw.get("atc_threshold")
    ood_raw = raw.get("ood_scores")
    ood_scores = (
        None
        if ood_raw is None
        else OodScoreProfile.from_json_dict(ood_raw, len(classes), str(json_path))
    )
    return ReferenceProfile(
        classes=classes,
        n_images=int(raw.get("n_images") or len(confidence)),
        stats=stats,
        confidence=confidence,
        class_counts=counts,
        embeddings=embeddings.astype(np.float32, copy=False),
        model_name=raw.get("model_name"),
        model_version=None if raw.get("model_version") is None else str(raw["model_version"]),
        model_digest=raw.get("model_digest"),
        accuracy=float(accuracy) if isinstance(accuracy, int | float) else None,
        atc_threshold=float(atc) if isinstance(atc, int | float) else None,
        created=str(raw.get("created") or ""),
        source=str(json_path),
        format_counts=_format_counts(raw.get("format_counts"), json_path),
        ood_scores=ood_scores,
    )


def resolve_reference(source: str | Path) -> ReferenceProfile:
    """The profile of a model folder, a ``reference.json`` path, or a registry URI.

    ``models:/NAME@ALIAS`` and ``models:/NAME/VERSION`` go through
    :func:`visionops.registry.resolve_served_model` (imported only then: MLflow), and the
    registry version is filled in.
    """
    text = str(source)
    if not text.startswith("models:/"):
        return load_reference(Path(text))
    from visionops import registry

    ref = registry.resolve_served_model(text)
    profile = load_reference(Path(ref.path))
    if profile.model_version is None and ref.version is not None:
        return replace(profile, model_version=str(ref.version))
    return profile


class ReferenceStore:
    """The reference of the served model, read once per model folder and file version.

    ``for_model(model)`` takes anything with ``path`` (the model folder), ``version``
    and ``digest`` attributes (serving's ``LoadedModel``) and returns its profile with the
    registry version filled in, or ``None`` (with :attr:`last_error` saying why) when the
    folder has no readable profile or the profile belongs to another model file.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._cache: dict[tuple[str, int], ReferenceProfile] = {}
        self.last_error: str | None = None

    def require(self, model: Any) -> ReferenceProfile:
        """:meth:`for_model`, raising :class:`DataError` with the reason instead of None."""
        profile = self.for_model(model)
        if profile is None:
            raise DataError(self.last_error or "no reference profile")
        return profile

    def for_model(self, model: Any) -> ReferenceProfile | None:
        if model is None:
            self.last_error = "no model is being served"
            return None
        folder = Path(model.path)
        json_path = folder / REFERENCE_FILE
        try:
            key = (str(json_path), json_path.stat().st_mtime_ns)
        except OSError:
            self.last_error = f"the served model folder {folder} has no {REFERENCE_FILE}"
            return None
        with self._lock:
            profile = self._cache.get(key)
        if profile is None:
            try:
                profile = load_reference(json_path)
            except DataError as exc:
                self.last_error = str(exc)
                return None
            with self._lock:
                self._cache = {key: profile}  # only the served model's profile is kept
        digest = getattr(model, "digest", None)
        if profile.model_digest and digest and profile.model_digest != digest:
            self.last_error = (
                f"{json_path} was built for model {profile.model_digest}, but {digest} is served"
            )
            return None
        version = getattr(model, "version", None)
        self.last_error = None
        if profile.model_version is None and version is not None:
            return replace(profile, model_version=str(version))
        return profile
