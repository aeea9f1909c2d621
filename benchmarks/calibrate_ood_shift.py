"""Choose the quantile level and minimum rise of the ``ood_score_shift`` alarm.

    python benchmarks/calibrate_ood_shift.py [--model-dir exported] [--windows 100]

The check (:func:`visionops.monitor.performance.ood_score_shift`) counts a window's rows
whose logged OOD score lies above the reference's ``level`` quantile of their predicted
class. This script measures that share on **calibration windows only**, disjoint from
the windows ``benchmarks/bench_drift.py`` reports:

- in distribution: the *even* consecutive 200-image writer blocks of the MNIST test set
  (the bench reports the odd ones as held out; alternating blocks, because the test set's
  two halves come from two writer populations — NIST employees, then students — and a
  calibration part from one half alone would not see the other), and i.i.d. windows of
  200 drawn with another seed than the bench's (``--seed + 1``), as JSON instances and as
  PNG uploads;
- harmful: every harmful scenario of :mod:`visionops.monitor.simulate` drawn with seed
  ``--seed + 2000 + k`` (the bench draws ``--seed + 1000 + k``).

For each profiled level it reports the largest in-distribution share and the smallest
harmful one; the level is the one whose gap is widest in units of the binomial standard
deviation at 200 rows, and the minimum rise is the midpoint of the gap minus the
expected share ``1 - level``, rounded down to a whole point. Writes
``benchmarks/results/ood_shift_calibration.json`` and ``.md``; the chosen values are
the constants ``OOD_SHIFT_LEVEL`` and ``MIN_OOD_SHIFT`` of
:mod:`visionops.monitor.performance`.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from bench_drift import HARMLESS_SCENARIOS, Rows, load_profile, served_pixels

from visionops.data.transforms import PreprocessSpec
from visionops.monitor.performance import MIN_OOD_SHIFT, OOD_SHIFT_LEVEL, ood_score_shift
from visionops.monitor.reference import open_onnx
from visionops.monitor.simulate import DRIFT_SCENARIOS, load_mnist_test, scenario_images
from visionops.ood import OodDetector

log = logging.getLogger("calibrate_ood_shift")
SIZE = 200


def shares(above: np.ndarray, groups: list[np.ndarray]) -> np.ndarray:
    return np.asarray([above[g].mean() for g in groups])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model-dir", type=Path, default=Path("exported"))
    p.add_argument("--val-split", type=Path, default=Path("data/prepared/val.npz"))
    p.add_argument("--mnist-dir", type=Path, default=Path("data/raw/mnist"))
    p.add_argument("--windows", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    meta = json.loads((args.model_dir / "metadata.json").read_text())
    spec = PreprocessSpec.from_dict(meta["preprocess"])
    classes = [str(c) for c in meta["classes"]]
    detector = OodDetector.load(args.model_dir, meta)
    reference = load_profile(args, spec, detector)
    if reference.ood_scores is None:
        sys.exit(f"error: {args.model_dir}/reference.json has no per-class OOD scores")
    profile = reference.ood_scores
    session = open_onnx(args.model_dir / "model.onnx", threads=1)
    mnist = load_mnist_test(args.mnist_dir)
    n_test = len(mnist[0])

    def above(rows: Rows, level: float) -> np.ndarray:
        bounds = profile.thresholds(level)
        assert bounds is not None and rows.ood_scores is not None
        idx = np.asarray([classes.index(label) for label in rows.labels])
        return np.asarray(rows.ood_scores > bounds[idx])

    rng = np.random.default_rng(args.seed + 1)
    even_blocks = [np.arange(s, s + SIZE) for s in range(0, n_test - SIZE + 1, 2 * SIZE)]
    iid = [rng.choice(n_test, SIZE, replace=False) for _ in range(args.windows)]
    in_dist: dict[str, tuple[Rows, list[np.ndarray]]] = {}
    for how in ("json", "png"):
        rows = Rows(session, served_pixels(mnist[0], spec, how), spec, classes, mnist[1], 0.7)
        rows.score_ood(detector)
        in_dist[f"writer blocks, even ({how})"] = (rows, even_blocks)
        in_dist[f"i.i.d., seed {args.seed + 1} ({how})"] = (rows, iid)
    harmful: dict[str, tuple[Rows, list[np.ndarray]]] = {}
    for k, scenario in enumerate(DRIFT_SCENARIOS):
        if scenario in HARMLESS_SCENARIOS:
            continue
        data = scenario_images(
            scenario, args.windows * SIZE, seed=args.seed + 2000 + k, mnist=mnist
        )
        rows = Rows(
            session, served_pixels(np.asarray(data.images), spec, "json"), spec, classes, None, 0.7
        )
        rows.score_ood(detector)
        groups = [np.arange(i * SIZE, (i + 1) * SIZE) for i in range(args.windows)]
        harmful[f"{scenario} (seed {args.seed + 2000 + k})"] = (rows, groups)
        log.info("%s scored", scenario)

    levels: list[dict[str, Any]] = []
    for level in profile.levels:
        if level >= 0.99:  # 2 expected rows of 200: too few to measure a shift by
            continue
        ind = {n: shares(above(r, level), g) for n, (r, g) in in_dist.items()}
        harm = {n: shares(above(r, level), g) for n, (r, g) in harmful.items()}
        top = max(float(v.max()) for v in ind.values())
        low = min(float(v.min()) for v in harm.values())
        sd = math.sqrt(level * (1 - level) / SIZE)
        levels.append(
            {
                "level": level,
                "in_distribution_max": top,
                "in_distribution_max_by_group": {n: float(v.max()) for n, v in ind.items()},
                "harmful_min": low,
                "harmful_min_by_group": {n: float(v.min()) for n, v in harm.items()},
                "gap_in_sd": (low - top) / sd,
                "min_rise": math.floor(100 * ((top + low) / 2 - (1 - level))) / 100,
            }
        )
    best = max(levels, key=lambda r: r["gap_in_sd"])
    # The constants must be what this calibration chose.
    rows0, groups0 = next(iter(in_dist.values()))
    check = ood_score_shift(rows0.window(groups0[0]), reference, best["level"], best["min_rise"])
    assert check.skipped is None and check.n == SIZE
    result = {
        "model_dir": str(args.model_dir),
        "reference": reference.info(),
        "window_size": SIZE,
        "levels": levels,
        "chosen": {"level": best["level"], "min_rise": best["min_rise"]},
        "constants": {"OOD_SHIFT_LEVEL": OOD_SHIFT_LEVEL, "MIN_OOD_SHIFT": MIN_OOD_SHIFT},
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "ood_shift_calibration.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "ood_shift_calibration.md").write_text(to_markdown(result))
    print(to_markdown(result))
    same = math.isclose(best["level"], OOD_SHIFT_LEVEL) and math.isclose(
        best["min_rise"], MIN_OOD_SHIFT
    )
    if not same:
        log.warning(
            "calibration chose level %g, min rise %g; the constants say %g, %g",
            best["level"],
            best["min_rise"],
            OOD_SHIFT_LEVEL,
            MIN_OOD_SHIFT,
        )
    return 0


def to_markdown(res: dict[str, Any]) -> str:
    lines = [
        "# Calibration of the `ood_score_shift` alarm",
        "",
        f"Model `{res['model_dir']}` (digest `{res['reference'].get('model_digest')}`). "
        f"Share of the rows of a {res['window_size']}-row window whose OOD score lies above "
        "the reference's quantile of their predicted class, on calibration windows only "
        "(even writer blocks and i.i.d. windows of another seed of the MNIST test set, "
        "JSON and PNG; harmful scenarios of other seeds than `bench_drift.py`'s).",
        "",
        "| level | expected | in-distribution max | harmful min | gap (binomial sd) | "
        "min rise (midpoint) |",
        "|---|---|---|---|---|---|",
    ]
    for r in res["levels"]:
        lines.append(
            f"| {r['level']:g} | {100 * (1 - r['level']):.0f} % | "
            f"{100 * r['in_distribution_max']:.1f} % | {100 * r['harmful_min']:.1f} % | "
            f"{r['gap_in_sd']:+.2f} | {100 * r['min_rise']:.0f} points |"
        )
    best = next(r for r in res["levels"] if r["level"] == res["chosen"]["level"])
    lines += [
        "",
        f"Chosen: level **{res['chosen']['level']:g}** (widest gap), minimum rise "
        f"**{100 * res['chosen']['min_rise']:.0f} points** (alarm from "
        f"{100 * (1 - res['chosen']['level'] + res['chosen']['min_rise']):.0f} % of the "
        "window, with binomial p < 0.01). Constants in `visionops.monitor.performance`: "
        f"`OOD_SHIFT_LEVEL = {res['constants']['OOD_SHIFT_LEVEL']:g}`, "
        f"`MIN_OOD_SHIFT = {res['constants']['MIN_OOD_SHIFT']:g}`.",
        "",
        "Per group at the chosen level:",
        "",
        "| calibration windows | share (max for in-distribution, min for harmful) |",
        "|---|---|",
    ]
    for n, v in best["in_distribution_max_by_group"].items():
        lines.append(f"| {n} | max {100 * v:.1f} % |")
    for n, v in best["harmful_min_by_group"].items():
        lines.append(f"| {n} | min {100 * v:.1f} % |")
    lines += ["", f"Generated {res['created']} by `benchmarks/calibrate_ood_shift.py`.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
