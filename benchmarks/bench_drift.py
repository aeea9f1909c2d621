"""Drift detection benchmark: false alarms, detection power and speed.

    python benchmarks/bench_drift.py [--model-dir exported] [--windows 100] [--window-size 200]

Needs an exported model folder (``model.onnx`` + ``metadata.json``, e.g. ``exported/``
after ``make run``) with its ``reference.json`` — or ``--val-split`` (default
``data/prepared/val.npz``) to build the reference in memory — and the MNIST test files
(``--mnist-dir``, default ``data/raw/mnist``).

Windows are computed the way the server would compute its log rows, without HTTP: the
scenario's images go through the server's input path (JSON ``instances`` →
``prepare_instance``, or PNG bytes → ``decode_image`` + ``image_to_array``), are
normalised and scored by ONNX Runtime, and their statistics are those the prediction log
stores. Measured:

1. the false alarm rate over ``--windows`` windows of ``--window-size`` in-distribution
   MNIST test images (random samples; target ≤ 5 %), sent as JSON and as PNG uploads;
2. for each drift scenario of :mod:`visionops.monitor.simulate`, the detection rate over
   as many windows (target ≥ 95 %);
3. the time to evaluate drift over 10,000 logged predictions (read from a real SQLite
   prediction log + every test; target < 1 s).

Writes ``benchmarks/results/drift.json`` and ``drift.md``.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
from collections import Counter
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np

from visionops.data.transforms import (
    PreprocessSpec,
    array_from_unit_floats,
    decode_image,
    image_to_array,
)
from visionops.monitor.drift import DEFAULT_ALPHA, MMD_WINDOW_SIZE, detect_drift
from visionops.monitor.reference import (
    ReferenceProfile,
    build_reference_profile,
    load_reference,
    open_onnx,
    score_images,
)
from visionops.monitor.simulate import DRIFT_SCENARIOS, load_mnist_test, scenario_images
from visionops.monitor.stats import image_statistics
from visionops.monitor.window import Window, load_window, window_from_arrays

log = logging.getLogger("bench_drift")

TARGET_FALSE_ALARM = 0.05
TARGET_DETECTION = 0.95
TARGET_SECONDS = 1.0


# --------------------------------------------------------------------------- rows


def served_pixels(images: np.ndarray, spec: PreprocessSpec, how: str) -> np.ndarray:
    """uint8 (N, H, W, C) model inputs the server derives from these 28×28 images."""
    from PIL import Image

    out = []
    for img in images:
        if how == "json":
            from visionops.serve.inputs import prepare_instance

            arr = array_from_unit_floats(np.round(img.astype(np.float64) / 255.0, 4))
            out.append(prepare_instance(arr, spec))
        else:
            buf = io.BytesIO()
            Image.fromarray(img, mode="L").save(buf, format="PNG")
            out.append(image_to_array(decode_image(buf.getvalue(), 10**7), spec))
    return np.stack(out)


class Rows:
    """Everything the prediction log would hold for a batch of images."""

    def __init__(self, session: Any, pixels: np.ndarray, spec: PreprocessSpec, classes: list[str]):
        probs, self.embeddings = score_images(session, pixels, spec)
        top = probs.argmax(axis=1)
        self.labels = [classes[k] for k in top]
        self.confidence = probs[np.arange(len(top)), top].astype(np.float64)
        self.stats = image_statistics(pixels)
        self.pixels = pixels

    def window(self, idx: np.ndarray) -> Window:
        return window_from_arrays(
            labels=[self.labels[i] for i in idx],
            confidence=self.confidence[idx],
            stats={k: v[idx] for k, v in self.stats.items()},
            embeddings=self.embeddings[idx],
        )


def run_windows(reference: ReferenceProfile, windows: list[Window], seed: int) -> dict[str, Any]:
    alarms, by_test, scores = 0, Counter[str](), []
    for i, w in enumerate(windows):
        report = detect_drift(reference, w, seed=seed + i)
        alarms += report.drift_detected
        by_test.update(t.name for t in report.drifted)
        scores.append(report.drift_score)
    return {
        "windows": len(windows),
        "alarms": int(alarms),
        "rate": alarms / max(len(windows), 1),
        "by_test": dict(sorted(by_test.items(), key=lambda kv: -kv[1])),
        "median_score": float(np.median(scores)),
        "tests": len(report.tests) if windows else 0,
    }


# --------------------------------------------------------------------------- timing


def time_logged(
    reference: ReferenceProfile, rows: Rows, model: str, n: int, runs: int, seed: int
) -> dict[str, Any]:
    """Write ``n`` rows to a real SQLite prediction log, then time load + detect."""
    from visionops.serve.predlog import PredictionLog, PredictionRecord

    rng = np.random.default_rng(seed)
    idx = rng.choice(len(rows.labels), n, replace=n > len(rows.labels))
    start = datetime(2025, 1, 1, tzinfo=UTC)
    with tempfile.TemporaryDirectory() as tmp:
        url = f"sqlite:///{Path(tmp) / 'predictions.db'}"
        writer = PredictionLog(url)
        writer.start()
        writer.submit(
            PredictionRecord(
                created_at=start + timedelta(milliseconds=10 * j),
                request_id=f"bench-{j}",
                input_index=0,
                model_name=model,
                model_version=None,
                model_alias=None,
                label=rows.labels[i],
                class_index=int(reference.classes.index(rows.labels[i])),
                confidence=float(rows.confidence[i]),
                accepted=True,
                probabilities={c: 0.0 for c in reference.classes},
                embedding=rows.embeddings[i].tolist(),
                pixels=rows.pixels[i],
            )
            for j, i in enumerate(idx)
        )
        writer.close()
        loads, detects, totals = [], [], []
        for r in range(runs):
            t0 = time.perf_counter()
            window = load_window(url, n, max_embeddings=MMD_WINDOW_SIZE)
            t1 = time.perf_counter()
            detect_drift(reference, window, seed=r)
            t2 = time.perf_counter()
            loads.append(t1 - t0)
            detects.append(t2 - t1)
            totals.append(t2 - t0)
    return {
        "rows": n,
        "runs": runs,
        "load_s_median": statistics.median(loads),
        "detect_s_median": statistics.median(detects),
        "total_s_median": statistics.median(totals),
        "total_s_max": max(totals),
    }


# --------------------------------------------------------------------------- main


def load_profile(args: argparse.Namespace, spec: PreprocessSpec) -> ReferenceProfile:
    ref_path = args.model_dir / "reference.json"
    if ref_path.is_file():
        return load_reference(ref_path)
    if args.val_split.is_file():
        with np.load(args.val_split, allow_pickle=False) as npz:
            x, y = npz["x"], npz["y"]
        log.info("no %s: building the reference from %s", ref_path, args.val_split)
        return build_reference_profile(args.model_dir, x, spec, y, write=False)
    sys.exit(f"error: neither {ref_path} nor {args.val_split} exists (run `make run` first)")


def to_markdown(res: dict[str, Any]) -> str:
    fa, det, tm = res["false_alarm"], res["detection"], res["timing"]
    lines = [
        "# Drift detection benchmark",
        "",
        f"Model `{res['model_dir']}` ({res['reference'].get('model_name')}, digest "
        f"`{res['reference'].get('model_digest')}`); reference of {res['reference']['n_images']} "
        f"validation images. Windows of {res['window_size']} predictions; {res['tests']} tests "
        f"combined with a {res['correction']} correction at overall alpha {res['alpha']}. "
        f"{res['machine']}.",
        "",
        "## False alarms (in-distribution MNIST test images)",
        "",
        "| input path | windows | alarms | rate | target | tests that alarmed |",
        "|---|---|---|---|---|---|",
    ]
    for how, r in fa.items():
        ok = "✅" if r["rate"] <= TARGET_FALSE_ALARM else "❌"
        by = ", ".join(f"{k} {v}" for k, v in r["by_test"].items()) or "—"
        lines.append(
            f"| {how} | {r['windows']} | {r['alarms']} | {100 * r['rate']:.1f} % | "
            f"≤ {100 * TARGET_FALSE_ALARM:.0f} % {ok} | {by} |"
        )
    lines += [
        "",
        "## Detection rate per drift scenario",
        "",
        "| scenario | windows | detected | rate | target | median drift score "
        "| tests that alarmed |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in det.items():
        ok = "✅" if r["rate"] >= TARGET_DETECTION else "❌"
        by = ", ".join(f"{k} {v}" for k, v in list(r["by_test"].items())[:5]) or "—"
        lines.append(
            f"| {name} | {r['windows']} | {r['alarms']} | {100 * r['rate']:.1f} % | "
            f"≥ {100 * TARGET_DETECTION:.0f} % {ok} | {r['median_score']:.1f} | {by} |"
        )
    ok = "✅" if tm["total_s_median"] < TARGET_SECONDS else "❌"
    lines += [
        "",
        f"## Speed: drift over {tm['rows']} logged predictions",
        "",
        f"| read window (SQLite) | all tests | total (median of {tm['runs']}) | slowest | target |",
        "|---|---|---|---|---|",
        f"| {tm['load_s_median']:.3f} s | {tm['detect_s_median']:.3f} s | "
        f"{tm['total_s_median']:.3f} s | {tm['total_s_max']:.3f} s | < {TARGET_SECONDS:g} s {ok} |",
        "",
        f"Generated {res['created']} by `benchmarks/bench_drift.py`.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model-dir", type=Path, default=Path("exported"))
    p.add_argument("--val-split", type=Path, default=Path("data/prepared/val.npz"))
    p.add_argument("--mnist-dir", type=Path, default=Path("data/raw/mnist"))
    p.add_argument(
        "--pool-indices",
        type=Path,
        default=None,
        help="a .npy of MNIST test indices to draw in-distribution windows from (when the "
        "model or reference used part of the test set)",
    )
    p.add_argument("--windows", type=int, default=100)
    p.add_argument("--window-size", type=int, default=200)
    p.add_argument("--timing-rows", type=int, default=10_000)
    p.add_argument("--timing-runs", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-png", action="store_true", help="skip the PNG-upload false alarm run")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    meta = json.loads((args.model_dir / "metadata.json").read_text())
    spec = PreprocessSpec.from_dict(meta["preprocess"])
    classes = [str(c) for c in meta["classes"]]
    reference = load_profile(args, spec)
    session = open_onnx(args.model_dir / "model.onnx", threads=1)
    mnist = load_mnist_test(args.mnist_dir)
    pool = np.arange(len(mnist[0]))
    if args.pool_indices is not None:
        pool = np.load(args.pool_indices, allow_pickle=False).astype(np.int64)
    rng = np.random.default_rng(args.seed)
    size, n_windows = args.window_size, args.windows

    false_alarm: dict[str, Any] = {}
    for how in ("json", "png")[: 1 if args.no_png else 2]:
        t = time.perf_counter()
        rows = Rows(session, served_pixels(mnist[0][pool], spec, how), spec, classes)
        windows = [
            rows.window(rng.choice(len(pool), size, replace=False)) for _ in range(n_windows)
        ]
        false_alarm[f"mnist ({how})"] = run_windows(reference, windows, args.seed)
        log.info(
            "mnist via %s: %s (%.0fs)", how, false_alarm[f"mnist ({how})"], time.perf_counter() - t
        )
        if how == "json":
            json_rows = rows

    detection: dict[str, Any] = {}
    for k, scenario in enumerate(DRIFT_SCENARIOS):
        t = time.perf_counter()
        data = scenario_images(scenario, n_windows * size, seed=args.seed + 1000 + k, mnist=mnist)
        # How the simulator sends it: JSON instances (the service sees these pixels).
        rows = Rows(session, served_pixels(data.images, spec, "json"), spec, classes)
        windows = [rows.window(np.arange(i * size, (i + 1) * size)) for i in range(n_windows)]
        detection[scenario] = run_windows(reference, windows, args.seed)
        log.info("%s: %s (%.0fs)", scenario, detection[scenario], time.perf_counter() - t)

    timing = time_logged(
        replace(reference, model_version=None),
        json_rows,
        str(meta.get("name") or "model"),
        args.timing_rows,
        args.timing_runs,
        args.seed,
    )
    log.info("timing: %s", timing)

    result = {
        "model_dir": str(args.model_dir),
        "reference": reference.info(),
        "window_size": size,
        "windows": n_windows,
        "alpha": DEFAULT_ALPHA,
        "correction": "bonferroni",
        "tests": false_alarm["mnist (json)"]["tests"],
        "false_alarm": false_alarm,
        "detection": detection,
        "timing": timing,
        "targets": {
            "false_alarm_rate_max": TARGET_FALSE_ALARM,
            "detection_rate_min": TARGET_DETECTION,
            "seconds_max": TARGET_SECONDS,
        },
        "passed": {
            "false_alarm": all(r["rate"] <= TARGET_FALSE_ALARM for r in false_alarm.values()),
            "detection": {s: r["rate"] >= TARGET_DETECTION for s, r in detection.items()},
            "speed": timing["total_s_median"] < TARGET_SECONDS,
        },
        "machine": f"{platform.machine()}, Python {platform.python_version()}, "
        f"{len(os.sched_getaffinity(0))} usable core(s)",
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "drift.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "drift.md").write_text(to_markdown(result))
    print(to_markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
