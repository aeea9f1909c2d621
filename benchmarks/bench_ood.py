"""Out-of-distribution rejection benchmark: what is not accepted, and what it costs.

    python benchmarks/bench_ood.py [--model-dir exported] [--mnist 10000]

Needs an exported model folder with its ``ood`` calibration (``make run``), the MNIST
test files (``--mnist-dir``, default ``data/raw/mnist``) and, when present, the real
handwritten digits of ``--real-dir`` (default ``../shared/data/real-digits``; the label
is the first character of the file name). Every image goes through the real app
(``create_app`` + the HTTP client of Starlette, in process) as a PNG upload. Measured:

1. generated non-digits (``tests/nondigits.py``: blank, uniform colours, transparent,
   noise, gradients, text in a font, blurred colour scenes, ruled paper): the share not
   accepted, per kind and reason (target ≥ 95 %);
2. MNIST test images: the share rejected, by reason (target ≤ 1 %);
3. real handwritten digits: right, rejected, and rejected although right;
4. which embedding score separates best, on the same embeddings: kNN distance
   (k = 1, 5), class-conditional Mahalanobis distance and 1 − max softmax — ROC AUC of
   MNIST test vs non-digits, and how many non-digits each flags at the validation
   quantile the export uses;
5. the time of the OOD score and the pixel tests per batch (1 and 32 images).

Writes ``benchmarks/results/ood.json`` and ``ood.md``.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import sys
import time
from collections import Counter, defaultdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from visionops.config import ServeParams
from visionops.data.transforms import normalize
from visionops.monitor.simulate import load_mnist_test
from visionops.ood import knn_distance, l2_normalise, screen_pixels
from visionops.serve.model import LoadedModel, ResolvedModel, load_model

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from nondigits import non_digit_images  # noqa: E402

TARGET_NON_DIGITS = 0.95
TARGET_MNIST = 0.01
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")


def _png(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()


def serve_all(model_dir: Path, items: list[tuple[str, bytes]]) -> list[dict[str, Any]]:
    """The predictions of the real app for every (name, bytes) upload, in order."""
    from fastapi.testclient import TestClient

    from visionops.serve.app import create_app
    from visionops.serve.service import ServeSettings

    model = load_model(ResolvedModel(model_dir, None, None, None))
    settings = ServeSettings(model_uri=str(model_dir), serve=ServeParams(), predlog_url=None)
    out: list[dict[str, Any]] = []
    with TestClient(create_app(settings, model=model)) as client:
        for i in range(0, len(items), 64):
            files = [("files", (n, b, "image/png")) for n, b in items[i : i + 64]]
            r = client.post("/v1/predict", files=files)
            r.raise_for_status()
            out += r.json()["predictions"]
    return out


def _shown(path: Path) -> str:
    """``path`` relative to the repository when inside it (results name no home folders)."""
    try:
        return str(path.resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def _reasons(preds: list[dict[str, Any]]) -> dict[str, int]:
    return dict(Counter(str(p["reason"]) for p in preds if not p["accepted"]))


def auc(inside: np.ndarray, outside: np.ndarray) -> float:
    """ROC AUC of ``outside`` scoring higher than ``inside`` (Mann–Whitney)."""
    from scipy.stats import rankdata

    ranks = rankdata(np.concatenate([inside, outside]))
    n0, n1 = len(inside), len(outside)
    return float((ranks[n0:].sum() - n1 * (n1 + 1) / 2) / (n0 * n1))


def compare_scores(
    model: LoadedModel,
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_val: np.ndarray,
    x_test: np.ndarray,
    non_digits: np.ndarray,
    frr: float,
    seed: int,
) -> dict[str, Any]:
    """Each candidate score on the same embeddings (model-sized uint8 pixels in)."""

    def run(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        parts = [model.run(normalize(x[i : i + 500], model.spec)) for i in range(0, len(x), 500)]
        return np.concatenate([p for p, _ in parts]), np.concatenate([e for _, e in parts])

    rng = np.random.default_rng(seed)
    pick = rng.choice(len(x_train), min(5000, len(x_train)), replace=False)
    _, bank = run(x_train[pick])
    labels = y_train[pick]
    (p_val, e_val), (p_test, e_test), (p_nd, e_nd) = run(x_val), run(x_test), run(non_digits)
    bank_t = np.ascontiguousarray(l2_normalise(bank).T)
    means = np.stack([bank[labels == c].mean(axis=0) for c in np.unique(labels)])
    centred = bank - means[np.searchsorted(np.unique(labels), labels)]
    precision = np.linalg.pinv(centred.T @ centred / len(centred))

    def mahalanobis(e: np.ndarray) -> np.ndarray:
        d = e[:, None, :] - means[None]
        return np.einsum("nkd,de,nke->nk", d, precision, d).min(axis=1)

    scores = {
        "knn_k1": lambda e, p: knn_distance(e, bank_t, 1),
        "knn_k5": lambda e, p: knn_distance(e, bank_t, 5),
        "mahalanobis": lambda e, p: mahalanobis(e),
        "max_softmax": lambda e, p: 1.0 - p.max(axis=1),
    }
    out = {}
    for name, fn in scores.items():
        s_val, s_test, s_nd = fn(e_val, p_val), fn(e_test, p_test), fn(e_nd, p_nd)
        t = np.quantile(s_val, 1 - frr, method="higher")
        out[name] = {
            "auc_test_vs_non_digits": auc(s_test, s_nd),
            "non_digits_flagged": int((s_nd > t).sum()),
            "test_rejected": float((s_test > t).mean()),
        }
    return out


def time_ood(model: LoadedModel, runs: int = 200) -> dict[str, float]:
    assert model.ood is not None
    rng = np.random.default_rng(0)
    out = {}
    for n in (1, 32):
        e = rng.normal(size=(n, model.ood.dim)).astype(np.float32)
        size, channels = model.spec.image_size, model.spec.channels
        px = rng.integers(0, 256, (n, size, size, channels), dtype=np.uint8)
        x = normalize(px, model.spec)
        for name, fn in (
            # As the server scores: the bank product in ONNX Runtime.
            (
                "ood_score",
                lambda e=e: model.ood.score_from_graph(  # type: ignore[union-attr]
                    l2_normalise(e), model.ood_session
                ),
            ),
            ("ood_score_numpy", lambda e=e: model.ood.score(e)),  # type: ignore[union-attr]
            (
                "pixel_tests",
                lambda px=px: screen_pixels(
                    px,
                    model.min_ink_pixels,
                    model.ood.min_edge_density,  # type: ignore[union-attr]
                ),
            ),
            ("model", lambda x=x: model.run(x)),
        ):
            fn()
            t0 = time.perf_counter()
            for _ in range(runs):
                fn()
            out[f"{name}_ms_batch{n}"] = (time.perf_counter() - t0) / runs * 1000
    return out


def markdown(r: dict[str, Any]) -> str:
    nd, mn = r["non_digits"], r["mnist"]
    lines = [
        "# Out-of-distribution rejection",
        "",
        f"Model `{r['model']}` ({r['model_dir']}); OOD calibration: k = {r['ood']['k']}, "
        f"{r['ood']['bank_size']} bank embeddings, threshold {r['ood']['threshold']:.4f}, "
        f"edge-density bound {r['ood']['min_edge_density']:.3f}, at "
        f"{r['ood']['false_rejection_rate']:.2%} of the validation split "
        f"(measured there: {r['ood']['calibration']['rejected_share']:.2%}). "
        f"{r['machine']}, {r['date']}. Every image is a PNG upload to the real app.",
        "",
        "| set | images | not accepted | target | reasons |",
        "|---|---|---|---|---|",
        f"| generated non-digits | {nd['n']} | {nd['not_accepted']} ({nd['share']:.1%}) | "
        f"≥ {TARGET_NON_DIGITS:.0%} {'✅' if nd['share'] >= TARGET_NON_DIGITS else '❌'} | "
        f"{nd['reasons']} |",
        f"| MNIST test | {mn['n']} | {mn['rejected']} ({mn['share']:.2%}) | "
        f"≤ {TARGET_MNIST:.0%} {'✅' if mn['share'] <= TARGET_MNIST else '❌'} | "
        f"{mn['reasons']} |",
    ]
    if r.get("real"):
        re_ = r["real"]
        lines.append(
            f"| real handwritten digits | {re_['n']} | {re_['rejected']} "
            f"({re_['rejected_right']} of them right) | — | {re_['reasons']} |"
        )
    lines += ["", "Non-digits not accepted, by kind:", "", "| kind | not accepted |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in nd["by_kind"].items()]
    if nd["accepted"]:
        lines += ["", "Accepted non-digits: " + ", ".join(f"`{n}`" for n in nd["accepted"])]
    lines += [
        "",
        "Embedding scores on the same embeddings (threshold: the validation quantile at "
        "the same rate):",
        "",
        "| score | ROC AUC (MNIST test vs non-digits) | non-digits flagged | MNIST test rejected |",
        "|---|---|---|---|",
    ]
    for name, s in r["scores"].items():
        lines.append(
            f"| {name} | {s['auc_test_vs_non_digits']:.3f} | {s['non_digits_flagged']} | "
            f"{s['test_rejected']:.2%} |"
        )
    t = r["timing"]
    lines += [
        "",
        "Time per batch (ms): OOD score "
        f"{t['ood_score_ms_batch1']:.3f} / {t['ood_score_ms_batch32']:.3f} (ONNX Runtime, "
        "as served; NumPy, as the export calibrates: "
        f"{t['ood_score_numpy_ms_batch1']:.3f} / {t['ood_score_numpy_ms_batch32']:.3f}), "
        "pixel tests "
        f"{t['pixel_tests_ms_batch1']:.3f} / {t['pixel_tests_ms_batch32']:.3f}, the model "
        f"itself {t['model_ms_batch1']:.3f} / {t['model_ms_batch32']:.3f} (batch 1 / 32).",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model-dir", type=Path, default=ROOT / "exported")
    p.add_argument("--mnist-dir", type=Path, default=ROOT / "data" / "raw" / "mnist")
    p.add_argument("--prepared-dir", type=Path, default=ROOT / "data" / "prepared")
    p.add_argument("--real-dir", type=Path, default=ROOT.parent / "shared" / "data" / "real-digits")
    p.add_argument("--mnist", type=int, default=10_000, help="MNIST test images to send")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = p.parse_args(argv)

    model = load_model(ResolvedModel(args.model_dir, None, None, None))
    if model.ood is None:
        print(
            f"{args.model_dir}/metadata.json has no 'ood' entry: export it again", file=sys.stderr
        )
        return 2
    non_digits = non_digit_images()
    preds = serve_all(args.model_dir, [(n.name, n.png()) for n in non_digits])
    by_kind: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for n, pr in zip(non_digits, preds, strict=True):
        by_kind[n.kind][0] += not pr["accepted"]
        by_kind[n.kind][1] += 1
    not_accepted = sum(not pr["accepted"] for pr in preds)
    result: dict[str, Any] = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {len(os.sched_getaffinity(0))} cores",
        "model": model.name,
        "model_dir": _shown(args.model_dir),
        "ood": model.metadata["ood"],
        "non_digits": {
            "n": len(non_digits),
            "not_accepted": not_accepted,
            "share": not_accepted / len(non_digits),
            "reasons": _reasons(preds),
            "by_kind": {k: f"{a}/{b}" for k, (a, b) in by_kind.items()},
            "accepted": [n.name for n, pr in zip(non_digits, preds, strict=True) if pr["accepted"]],
        },
    }
    x, y = load_mnist_test(args.mnist_dir)
    x = x[: args.mnist]
    preds = serve_all(args.model_dir, [(f"{i}.png", _png(a)) for i, a in enumerate(x)])
    rejected = sum(not pr["accepted"] for pr in preds)
    result["mnist"] = {
        "n": len(x),
        "rejected": rejected,
        "share": rejected / len(x),
        "reasons": _reasons(preds),
        "accuracy": float(
            np.mean([int(pr["label"]) == t for pr, t in zip(preds, y, strict=False)])
        ),
    }
    real = sorted(f for f in args.real_dir.glob("*") if f.suffix.lower() in IMAGE_SUFFIXES)
    if real:
        preds = serve_all(args.model_dir, [(f.name, f.read_bytes()) for f in real])
        right = [pr["label"] == f.name[0] for pr, f in zip(preds, real, strict=True)]
        rej = [not pr["accepted"] for pr in preds]
        result["real"] = {
            "n": len(real),
            "right": int(sum(right)),
            "rejected": int(sum(rej)),
            "rejected_right": int(sum(a and b for a, b in zip(rej, right, strict=True))),
            "reasons": _reasons(preds),
        }
    with (
        np.load(args.prepared_dir / "train.npz") as tr,
        np.load(args.prepared_dir / "val.npz") as va,
    ):
        from visionops.data.transforms import image_to_array

        nd_pixels = np.stack([image_to_array(n.image, model.spec) for n in non_digits])
        mnist_px = x.reshape(len(x), 28, 28, 1)
        result["scores"] = compare_scores(
            model,
            tr["x"],
            tr["y"],
            va["x"],
            mnist_px,
            nd_pixels,
            float(model.metadata["ood"]["false_rejection_rate"]),
            seed=0,
        )
    result["timing"] = time_ood(model)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "ood.json").write_text(json.dumps(result, indent=2) + "\n")
    text = markdown(result)
    (args.out / "ood.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
