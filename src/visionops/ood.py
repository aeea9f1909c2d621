"""Knowing when not to answer: out-of-distribution (OOD) signals beside softmax confidence.

Softmax confidence alone accepts anything: a blank page or random noise can come back as
a confident class. Three tests run beside it:

- **no ink** (before the model): a single-channel, ink-bright model input with fewer than
  ``min_ink_pixels`` pixels at half ink or more (``>= 128`` of 255) holds no stroke to
  read. MNIST's training split has at least 15 such pixels in every image.
- **no strokes** (before the model): ink whose edge density (summed absolute
  differences of neighbouring pixels over summed intensity) is below what the
  validation split shows is a smooth field — a gradient or a blurred scene — rather
  than pen strokes, which rise from and fall back to the background within a few
  pixels. The bound is the validation split's ``EDGE_SHARE * false_rejection_rate``
  quantile; the ratio does not depend on contrast, so faint strokes keep it high.
- **embedding distance** (after the model): the k-th nearest-neighbour distance of the
  L2-normalised embedding to a bank of L2-normalised training embeddings (Sun et al.,
  "Out-of-Distribution Detection with Deep Nearest Neighbors", ICML 2022). The export
  calibrates its threshold on the validation split at a set false-rejection rate
  (``ood.false_rejection_rate`` in params.yaml) and stores it in ``metadata.json``;
  the bank goes beside the model as ``ood_bank.npy`` (float32 ``(M, D)``, ``np.save``,
  read with ``allow_pickle=False``).

  With ``ood.dims`` > 0 the distances are taken in the bank's top ``dims`` principal
  directions (PCA of the unit bank rows): the bank is stored projected, ``(M, dims)``,
  beside the projection ``ood_projection.npy`` (float32 ``(D, dims)``). The score is one
  matrix product with the bank per batch, and the bank is streamed from memory each time,
  so its cost grows with ``M * dims``. On the bundled MNIST model, calibrated as the
  export does, 160 of 256 dimensions take the same decisions in number as all 256 on
  the 95 real handwritten digits (none rejected), the 53 generated non-digits (51
  flagged) and the MNIST test set (0.25 % rejected against 0.28 %) and halve the
  score's time for a 4-image batch (0.28 to 0.14 ms); 64 dimensions were faster still
  (0.07 ms) but rejected two real, right 8s.

The module needs NumPy (and threadpoolctl to keep the matrix product on one BLAS
thread): the export calibrates with it, both without torch and without importing each
other. The server scores through ONNX Runtime instead (:meth:`OodDetector.knn_onnx`, the
same product as a graph, built with the ``onnx`` package when the model loads).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from visionops.artifacts import read_array
from visionops.errors import ModelError

#: Why a prediction was not accepted (``null`` in the API when it was).
Reason = Literal["no_ink", "out_of_distribution", "low_confidence"]
REASONS: tuple[str, ...] = ("no_ink", "out_of_distribution", "low_confidence")

BANK_FILE = "ood_bank.npy"
PROJECTION_FILE = "ood_projection.npy"
METHOD = "knn"
#: uint8 level from which a pixel counts as ink (half of full ink).
INK_LEVEL = 128
#: Default ink-pixel minimum (MNIST training split: 15 at the least, 101 the median).
MIN_INK_PIXELS = 8
#: Share of the false-rejection budget given to the edge-density test; the embedding
#: test gets the rest. Measured on MNIST: at 0.1 % of validation it rejects 5 of 14
#: inked generated non-digits (gradients, blurred scenes) and none of the real digits.
EDGE_SHARE = 0.2
_EPS = 1e-12


# --------------------------------------------------------------------------- no ink


def ink_pixel_counts(pixels: np.ndarray, level: int = INK_LEVEL) -> np.ndarray:
    """Pixels at ``level`` or above per image: int64 ``(N,)`` of uint8 ``(N, H, W, C)``.

    A channel mean is taken first for multi-channel images. ``(H, W, C)`` counts as N = 1.
    """
    x = np.asarray(pixels)
    if x.ndim == 3:
        x = x[None]
    if x.ndim != 4:
        raise ValueError(f"expected uint8 (N, H, W, C) pixels, got shape {x.shape}")
    ink = x[..., 0] >= level if x.shape[3] == 1 else x.mean(axis=3) >= level
    return ink.reshape(len(x), -1).sum(axis=1).astype(np.int64)


def no_ink(pixels: np.ndarray, min_ink_pixels: int = MIN_INK_PIXELS) -> np.ndarray:
    """bool ``(N,)``: True where the ink-bright model input holds no stroke to read.

    ``pixels`` are the preprocessed model-sized uint8 ``(N, H, W, C)`` images (ink high,
    as :func:`visionops.data.transforms.image_to_array` returns them).
    """
    return ink_pixel_counts(pixels) < int(min_ink_pixels)


def edge_density(pixels: np.ndarray) -> np.ndarray:
    """float64 ``(N,)``: summed |horizontal| + |vertical| neighbour differences over the
    summed intensity of each uint8 ``(N, H, W, C)`` image (0 for an empty image).

    Strokes a few pixels wide score high (MNIST validation: median 1.0, 0.1 % below
    0.44); smooth fields score low (a linear gradient block about 0.39).
    """
    x = np.asarray(pixels)
    if x.ndim == 3:
        x = x[None]
    if x.ndim != 4:
        raise ValueError(f"expected uint8 (N, H, W, C) pixels, got shape {x.shape}")
    a = x.mean(axis=3, dtype=np.float32) if x.shape[3] > 1 else x[..., 0].astype(np.float32)
    flat = a.reshape(len(a), -1)
    edges = np.abs(a[:, :, 1:] - a[:, :, :-1]).reshape(len(a), -1).sum(axis=1)
    edges += np.abs(a[:, 1:, :] - a[:, :-1, :]).reshape(len(a), -1).sum(axis=1)
    total = flat.sum(axis=1)
    return np.where(total > 0, edges / np.maximum(total, _EPS), 0.0).astype(np.float64)


@dataclass(frozen=True)
class PixelScreen:
    """The pixel tests that run before the model: bool ``(N,)`` each."""

    no_ink: np.ndarray
    no_strokes: np.ndarray  # ink present but too smooth to be strokes


def screen_pixels(pixels: np.ndarray, min_ink_pixels: int, min_edge_density: float) -> PixelScreen:
    """Both pixel tests on model-sized uint8 ``(N, H, W, C)`` images (ink bright)."""
    blank = no_ink(pixels, min_ink_pixels)
    if min_edge_density > 0:
        smooth = (edge_density(pixels) < min_edge_density) & ~blank
    else:
        smooth = np.zeros(len(blank), dtype=bool)
    return PixelScreen(no_ink=blank, no_strokes=smooth)


# --------------------------------------------------------------------------- kNN score


def l2_normalise(embeddings: np.ndarray) -> np.ndarray:
    """float32 rows of unit length (a zero row stays zero)."""
    e = np.asarray(embeddings, dtype=np.float32)
    if e.ndim != 2:
        raise ValueError(f"expected (N, D) embeddings, got shape {e.shape}")
    norms = np.linalg.norm(e, axis=1, keepdims=True)
    return e / np.maximum(norms, _EPS)


@functools.cache
def _blas_controller() -> Any:
    from threadpoolctl import ThreadpoolController

    return ThreadpoolController()


def knn_distance(
    embeddings: np.ndarray,
    bank_t: np.ndarray,
    k: int,
    exclude_self: bool = False,
    *,
    projection: np.ndarray | None = None,
    bank_sq: np.ndarray | None = None,
) -> np.ndarray:
    """Euclidean distance of each normalised embedding to its k-th nearest bank row.

    ``embeddings`` float ``(N, D)`` (normalised here), ``bank_t`` the transposed bank
    float32: unit rows ``(D, M)``, or with ``projection`` (float32 ``(D, d)``) the
    projected unit rows ``(d, M)`` and ``bank_sq`` their squared norms ``(M,)``; the
    embeddings are then projected too. Returns float64 ``(N,)`` in ``[0, 2]``. One matrix
    product and one partial sort per batch: no Python loop over images.
    ``exclude_self`` skips the nearest row (scoring the bank against itself).
    """
    z = l2_normalise(embeddings)
    # One BLAS thread: products this small gain nothing from more, and OpenBLAS threads
    # spin for a while after each parallel call: on a busy server they burn a core.
    with _blas_controller().limit(limits=1, user_api="blas"):
        if projection is not None:
            z = z @ projection
        sims = z @ bank_t  # (N, M): similarities (cosine, for unit rows)
    m = sims.shape[1]
    kth = min(k + int(exclude_self), m)
    if m == 0:
        raise ValueError("the OOD bank is empty")
    if projection is None:
        # The k-th largest similarity is the k-th nearest neighbour on the unit sphere.
        return distance_from_bracket(_kth_largest(sims, kth), None)
    if bank_sq is None:
        raise ValueError("a projected bank needs its squared row norms (bank_sq)")
    # |z - b|^2 = |z|^2 - 2 (z.b - |b|^2 / 2): the nearest rows have the largest bracket.
    sims -= 0.5 * bank_sq
    return distance_from_bracket(_kth_largest(sims, kth), np.einsum("nd,nd->n", z, z))


def distance_from_bracket(top: np.ndarray, z_sq: np.ndarray | None) -> np.ndarray:
    """The k-th nearest-neighbour distance float64 ``(N,)`` in ``[0, 2]`` from the k-th
    largest bracket ``top`` ``(N,)`` of :func:`knn_distance`: a cosine similarity
    (``z_sq`` None: unit rows, no projection) or, with a projection, ``z.b - |b|^2 / 2``
    with ``z_sq`` the squared norms ``(N,)`` of the projected embeddings."""
    top = np.asarray(top, dtype=np.float64)
    if z_sq is None:
        return np.sqrt(np.clip(2.0 - 2.0 * top, 0.0, 4.0))
    return np.sqrt(np.clip(np.asarray(z_sq, dtype=np.float64) - 2.0 * top, 0.0, 4.0))


def _kth_largest(a: np.ndarray, k: int) -> np.ndarray:
    """The k-th largest value of each row of ``a`` (a row maximum for k = 1)."""
    if k == 1:
        return a.max(axis=1)
    m = a.shape[1]
    return np.partition(a, m - k, axis=1)[:, m - k]


def pca_projection(unit_bank: np.ndarray, dims: int) -> tuple[np.ndarray, float]:
    """The top ``dims`` principal directions of ``unit_bank`` (float ``(M, D)``) as float32
    ``(D, dims)`` columns, and the share of the bank's variance they keep.

    Distances are unchanged by a shift, so the directions of the centred rows serve
    uncentred rows too. Raises ValueError unless ``0 < dims < D``.
    """
    d = unit_bank.shape[1]
    if not 0 < dims < d:
        raise ValueError(f"dims must lie in (0, {d}), got {dims}")
    centred = np.asarray(unit_bank, dtype=np.float64)
    centred = centred - centred.mean(axis=0)
    _, s, vt = np.linalg.svd(centred, full_matrices=False)
    var = s**2
    kept = float(var[:dims].sum() / max(var.sum(), _EPS))
    return np.ascontiguousarray(vt[:dims].T, dtype=np.float32), kept


@dataclass(frozen=True)
class OodDetector:
    """A calibrated kNN embedding-distance test; higher score = further from training.

    ``threshold`` is the score above which an input is out of distribution. Built by
    :func:`calibrate` at export, read back by :meth:`load` in the server.
    """

    k: int
    threshold: float
    false_rejection_rate: float
    # float32 (M, D) unit rows; with a projection, those rows projected: (M, d)
    bank: np.ndarray = field(repr=False)
    min_ink_pixels: int = MIN_INK_PIXELS
    min_edge_density: float = 0.0  # 0: the edge-density test is off
    calibration: dict[str, Any] = field(default_factory=dict)
    projection: np.ndarray | None = field(default=None, repr=False)  # float32 (D, d)
    _bank_t: np.ndarray = field(init=False, repr=False, compare=False)
    _bank_sq: np.ndarray | None = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_bank_t", np.ascontiguousarray(self.bank.T, np.float32))
        sq = None
        if self.projection is not None:
            if self.projection.ndim != 2 or self.projection.shape[1] != self.bank.shape[1]:
                raise ValueError(
                    f"projection {self.projection.shape} does not match the bank's "
                    f"{self.bank.shape[1]} columns"
                )
            sq = np.einsum("md,md->m", self.bank, self.bank).astype(np.float32)
        object.__setattr__(self, "_bank_sq", sq)

    @property
    def dim(self) -> int:
        """The embedding size D the detector scores."""
        return int(self.projection.shape[0] if self.projection is not None else self.bank.shape[1])

    def score(self, embeddings: np.ndarray) -> np.ndarray:
        """OOD score float64 ``(N,)`` of embeddings float ``(N, D)`` (see :func:`knn_distance`)."""
        e = np.asarray(embeddings)
        if e.ndim != 2 or e.shape[1] != self.dim:
            raise ValueError(f"expected (N, {self.dim}) embeddings, got shape {e.shape}")
        return knn_distance(
            e, self._bank_t, self.k, projection=self.projection, bank_sq=self._bank_sq
        )

    def knn_onnx(self, opset: int = 17) -> bytes:
        """:meth:`score`'s matrix work as a serialised ONNX graph, for ONNX Runtime.

        Input ``z``: float32 ``(N, D)`` unit rows (:func:`l2_normalise`). Outputs ``top``:
        float32 ``(N, k)``, the k largest brackets of :func:`knn_distance` per row,
        descending, and with a projection ``z_sq``: float32 ``(N,)``, the squared norms of
        the projected rows; :meth:`score_from_graph` makes the scores of them.
        ONNX Runtime packs the constant bank once when the session is built; on the
        serving benchmark's batches (4 embeddings against 5,000 × 160) its MatMul took
        59 µs where NumPy's OpenBLAS product took 128 µs. Needs the ``onnx`` package.
        """
        from onnx import TensorProto, helper, numpy_helper

        k = min(self.k, int(self.bank.shape[0]))
        inits = [
            numpy_helper.from_array(self._bank_t, "ood_bank_t"),
            numpy_helper.from_array(np.asarray([k], np.int64), "ood_k"),
        ]
        outputs = [helper.make_tensor_value_info("top", TensorProto.FLOAT, ["N", k])]
        if self.projection is None:
            nodes = [helper.make_node("MatMul", ["z", "ood_bank_t"], ["sims"])]
        else:
            assert self._bank_sq is not None
            inits += [
                numpy_helper.from_array(np.ascontiguousarray(self.projection), "ood_projection"),
                numpy_helper.from_array(0.5 * self._bank_sq, "ood_half_bank_sq"),
            ]
            nodes = [
                helper.make_node("MatMul", ["z", "ood_projection"], ["zp"]),
                helper.make_node("ReduceSumSquare", ["zp"], ["z_sq"], axes=[1], keepdims=0),
                helper.make_node("MatMul", ["zp", "ood_bank_t"], ["dots"]),
                helper.make_node("Sub", ["dots", "ood_half_bank_sq"], ["sims"]),
            ]
            outputs.append(helper.make_tensor_value_info("z_sq", TensorProto.FLOAT, ["N"]))
        nodes.append(helper.make_node("TopK", ["sims", "ood_k"], ["top", "top_index"], axis=1))
        graph = helper.make_graph(
            nodes,
            "visionops_ood_knn",
            [helper.make_tensor_value_info("z", TensorProto.FLOAT, ["N", self.dim])],
            outputs,
            inits,
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
        return model.SerializeToString()

    def score_from_graph(self, z: np.ndarray, session: Any) -> np.ndarray:
        """:meth:`score` of unit rows ``z`` float32 ``(N, D)`` through an ONNX Runtime
        ``session`` of :meth:`knn_onnx`: the same float64 ``(N,)`` scores, up to float32
        rounding."""
        if self.projection is None:
            (top,) = session.run(["top"], {"z": z})
            return distance_from_bracket(top[:, -1], None)
        top, z_sq = session.run(["top", "z_sq"], {"z": z})
        return distance_from_bracket(top[:, -1], z_sq)

    def is_out(self, scores: np.ndarray) -> np.ndarray:
        """bool ``(N,)``: score above the calibrated threshold."""
        return np.asarray(scores) > self.threshold

    def to_metadata(self) -> dict[str, Any]:
        """The ``ood`` entry of ``metadata.json`` (the bank is saved separately)."""
        return {
            "method": METHOD,
            "k": self.k,
            "threshold": self.threshold,
            "false_rejection_rate": self.false_rejection_rate,
            "bank_file": BANK_FILE,
            "bank_size": int(self.bank.shape[0]),
            "embedding_dim": self.dim,
            "dims": int(self.bank.shape[1]) if self.projection is not None else 0,
            **({"projection_file": PROJECTION_FILE} if self.projection is not None else {}),
            "min_ink_pixels": self.min_ink_pixels,
            "ink_level": INK_LEVEL,
            "min_edge_density": self.min_edge_density,
            "calibration": self.calibration,
        }

    def save_bank(self, folder: Path) -> Path:
        """Write the bank (and the projection, if any) into ``folder``; the bank's path."""
        path = Path(folder) / BANK_FILE
        np.save(path, np.ascontiguousarray(self.bank, np.float32))
        if self.projection is not None:
            np.save(Path(folder) / PROJECTION_FILE, np.ascontiguousarray(self.projection))
        return path

    @classmethod
    def load(cls, folder: Path, meta: Mapping[str, Any]) -> OodDetector:
        """Read the ``ood`` entry of ``meta`` and its bank from ``folder``.

        Raises :class:`ModelError` naming the file and key for anything missing or wrong.
        """
        where = Path(folder) / "metadata.json"
        entry = meta.get("ood")
        if not isinstance(entry, Mapping):
            raise ModelError(f"{where}: 'ood' must be an object")
        if entry.get("method") != METHOD:
            raise ModelError(f"{where}: ood.method {entry.get('method')!r} is not {METHOD!r}")
        try:
            k = int(entry["k"])
            threshold = float(entry["threshold"])
            frr = float(entry["false_rejection_rate"])
            min_ink = int(entry.get("min_ink_pixels", MIN_INK_PIXELS))
            min_edge = float(entry.get("min_edge_density", 0.0))
        except KeyError as exc:
            raise ModelError(f"{where}: ood has no {exc.args[0]!r}") from None
        except (TypeError, ValueError) as exc:
            raise ModelError(f"{where}: malformed ood entry ({exc})") from None
        if k < 1 or not np.isfinite(threshold) or min_ink < 0 or not min_edge >= 0:
            raise ModelError(
                f"{where}: ood needs k >= 1, a finite threshold, min_ink_pixels >= 0 and "
                "min_edge_density >= 0"
            )
        bank_path = Path(folder) / str(entry.get("bank_file") or BANK_FILE)
        bank = _load_matrix(bank_path, "bank_file", "OOD bank", where)
        projection = None
        if entry.get("projection_file"):
            path = Path(folder) / str(entry["projection_file"])
            projection = _load_matrix(path, "projection_file", "OOD projection", where)
            if projection.shape[1] != bank.shape[1]:
                raise ModelError(
                    f"{bank_path}: bank rows have {bank.shape[1]} values, the projection "
                    f"gives {projection.shape[1]}"
                )
        calibration = entry.get("calibration")
        return cls(
            k=k,
            threshold=threshold,
            false_rejection_rate=frr,
            bank=bank,
            min_ink_pixels=min_ink,
            min_edge_density=min_edge,
            calibration=dict(calibration) if isinstance(calibration, Mapping) else {},
            projection=projection,
        )


def _load_matrix(path: Path, key: str, what: str, where: Path) -> np.ndarray:
    """The finite float ``(rows, columns)`` array at ``path`` (``np.load`` without pickle)
    as float32; :class:`ModelError` naming the file, and ``where``'s ``ood.key``, otherwise."""
    a = read_array(path, ModelError, f"named by {where} ood.{key}", what)
    if (
        a.ndim != 2
        or min(a.shape) < 1
        or not np.issubdtype(a.dtype, np.floating)
        or not np.all(np.isfinite(a))
    ):
        raise ModelError(f"{path}: expected a finite float (rows, columns) array, got {a.shape}")
    return a.astype(np.float32, copy=False)


def calibrate(
    bank_embeddings: np.ndarray,
    val_embeddings: np.ndarray,
    false_rejection_rate: float,
    k: int,
    min_ink_pixels: int = MIN_INK_PIXELS,
    val_pixels: np.ndarray | None = None,
    dims: int = 0,
) -> OodDetector:
    """A detector that rejects ``false_rejection_rate`` of the validation split.

    ``dims`` > 0 (and below D): distances in the bank's top ``dims`` principal
    directions (:func:`pca_projection`; ``calibration.explained_variance`` records the
    share of variance kept); 0 or at least D: all dimensions.

    ``bank_embeddings`` (M, D) come from the training split, ``val_embeddings`` (N, D)
    from the validation split (never the same images: a bank row's distance to itself is
    0). With ``val_pixels`` (the validation images, uint8 ``(N, H, W, C)``, ink bright)
    the edge-density bound is set first, at the ``EDGE_SHARE * false_rejection_rate``
    quantile, and the embedding threshold then takes the rest of the budget among the
    images it passes, so that the two tests together reject at most
    ``false_rejection_rate`` of the split (``calibration.rejected_share`` records the
    share they do). The no-ink test is switched off (``min_ink_pixels`` 0) when it alone
    would reject more than the budget: the data is not ink on a background. Without
    pixels the edge test is off and the embedding threshold is the
    ``1 - false_rejection_rate`` quantile of the validation scores.
    Raises ValueError for a rate outside (0, 1) or empty inputs.
    """
    if not 0.0 < false_rejection_rate < 1.0:
        raise ValueError(f"false_rejection_rate must lie in (0, 1), got {false_rejection_rate}")
    n = len(val_embeddings)
    if n == 0 or len(bank_embeddings) == 0:
        raise ValueError("calibration needs bank and validation embeddings")
    bank = l2_normalise(bank_embeddings)
    calibration: dict[str, Any] = {"split": "val", "n_images": n}
    projection = None
    if 0 < dims < bank.shape[1]:
        projection, kept = pca_projection(bank, dims)
        bank = np.ascontiguousarray(bank @ projection, dtype=np.float32)
        calibration["explained_variance"] = round(kept, 6)
    detector = OodDetector(
        k=k, threshold=0.0, false_rejection_rate=0.0, bank=bank, projection=projection
    )
    scores = detector.score(np.asarray(val_embeddings, dtype=np.float32))
    budget = int(np.floor(false_rejection_rate * n))  # images the tests may reject
    min_edge = 0.0
    screened = np.zeros(n, dtype=bool)
    if val_pixels is not None:
        if len(val_pixels) != n:
            raise ValueError(f"{len(val_pixels)} validation images for {n} embeddings")
        if float(np.mean(no_ink(val_pixels, min_ink_pixels))) > false_rejection_rate:
            # Dark images are normal in this data (not ink on a background): the no-ink
            # test would reject more than the whole budget, so it is switched off.
            calibration["no_ink_off"] = (
                f"more than {false_rejection_rate:.2%} of the validation images have fewer "
                f"than {min_ink_pixels} ink pixels"
            )
            min_ink_pixels = 0
        inked = ~no_ink(val_pixels, min_ink_pixels)
        density = edge_density(val_pixels)[inked]
        if density.size:
            min_edge = float(
                np.quantile(density, EDGE_SHARE * false_rejection_rate, method="lower")
            )
        screen = screen_pixels(val_pixels, min_ink_pixels, min_edge)
        screened = screen.no_ink | screen.no_strokes
        calibration["no_ink_share"] = float(np.mean(screen.no_ink))
        calibration["no_strokes_share"] = float(np.mean(screen.no_strokes))
    # The embedding threshold: the (r+1)-th largest score among the images the pixel
    # tests pass, so at most r = budget - screened of them score above it.
    remaining = np.sort(scores[~screened])[::-1]
    r = max(0, budget - int(screened.sum()))
    threshold = float(remaining[min(r, len(remaining) - 1)]) if remaining.size else 0.0
    rejected = screened | (scores > threshold)
    calibration["embedding_share"] = float(np.mean(scores > threshold))
    calibration["rejected_share"] = float(np.mean(rejected))
    calibration["score_quantiles"] = {
        q: round(float(np.quantile(scores, float(q))), 6) for q in ("0.5", "0.9", "0.99")
    }
    return OodDetector(
        k=k,
        threshold=threshold,
        false_rejection_rate=float(false_rejection_rate),
        bank=bank,
        min_ink_pixels=int(min_ink_pixels),
        min_edge_density=min_edge,
        calibration=calibration,
        projection=projection,
    )
