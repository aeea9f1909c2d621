"""Scaling benchmark: DDP throughput on this machine and what tuning buys.

On a seeded slice of MNIST (``--limit`` training images), this machine:

1. Throughput of the real entry point (``python -m visionops.train cnn``, the command
   torchrun runs) for ``--epochs`` epochs: one process with one thread, one process with
   every core, and ``--nproc`` DDP processes through torchrun (gloo on the CPU, cores
   shared out per rank). images/s counts training steps only (validation excluded).
   Speed-up = DDP / one process with every core; parallel efficiency = DDP /
   (nproc x one process with one thread). Each setup runs ``--repeats`` times,
   interleaved, and keeps its best run (other load on the machine only slows runs down).
2. A bounded tuning run (``--trials`` trials of ``tune.space`` from params.yaml, each for
   ``--epochs`` epochs, median pruning), then the default params and the best params are
   each trained once more and scored on the test split.

    python benchmarks/bench_scale.py [--limit 10000] [--epochs 2] [--trials 8] [--nproc 2]

Writes benchmarks/results/scale.json and scale.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
WORK = REPO / "benchmarks" / "work" / "scale"


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "VISIONOPS_"))}
    env.update(
        MLFLOW_TRACKING_URI=f"sqlite:///{WORK / 'mlflow.db'}",
        MLFLOW_DISABLE_TELEMETRY="true",
        OMP_WAIT_POLICY="PASSIVE",
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    )
    return env


def _train_run(label: str, cmd: list[str]) -> dict[str, Any]:
    """Run one training command in WORK; its metrics/train/cnn.json and wall time."""
    metrics_file = WORK / "metrics" / "train" / "cnn.json"
    metrics_file.unlink(missing_ok=True)
    started = time.perf_counter()
    proc = subprocess.run(cmd, cwd=WORK, env=_env(), capture_output=True, text=True, check=False)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"{label} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    metrics = json.loads(metrics_file.read_text())
    print(f"{label}: {metrics['images_per_second']:.0f} img/s, val {metrics['val_accuracy']:.4f}")
    return {
        "setup": label,
        "images_per_second": metrics["images_per_second"],
        "val_accuracy": metrics["val_accuracy"],
        "train_seconds": metrics["train_seconds"],
        "wall_seconds": round(wall, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--limit", type=int, default=10_000, help="training images (slice)")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--trials", type=int, default=8)
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2, help="runs per setup; the best counts")
    args = ap.parse_args()
    os.environ.update(MLFLOW_DISABLE_TELEMETRY="true", OMP_WAIT_POLICY="PASSIVE")
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{WORK / 'mlflow.db'}"

    import torch

    from visionops import distributed
    from visionops.config import load_params, params_to_yaml
    from visionops.data.ingest import run_ingest
    from visionops.data.prepare import run_prepare
    from visionops.evaluate import run_evaluate
    from visionops.layout import Layout
    from visionops.train import _usable_cores, run_train
    from visionops.tune import run_tune

    shutil.rmtree(WORK, ignore_errors=True)
    WORK.mkdir(parents=True)
    params = load_params(
        REPO / "params.yaml",
        [
            f"data.path={REPO / 'data/raw/mnist'}",
            f"data.limit={args.limit}",
            f"train.epochs={args.epochs}",
            "train.min_steps=0",  # exactly the epochs asked for: the runs are compared
            "train.models=[cnn]",
            "train.num_threads=0",
            "train.nproc=1",
        ],
    )
    (WORK / "params.yaml").write_text(params_to_yaml(params))
    layout = Layout.at(WORK)
    run_ingest(params, layout)
    prepared = run_prepare(params, layout)
    print(f"prepared {prepared.describe()}")
    cores = _usable_cores()

    # ---- 1. throughput: the entry point torchrun runs, alone and as DDP ranks
    entry = ["-m", "visionops.train", "cnn", "--params", "params.yaml"]
    setups = {
        "1 process, 1 thread": [sys.executable, *entry, "--set", "train.num_threads=1"],
        f"1 process, {cores} threads": [sys.executable, *entry],
        f"{args.nproc} DDP processes (gloo), "
        f"{distributed.threads_per_rank(cores, args.nproc)} thread(s) each": (
            distributed.torchrun_command(args.nproc, entry)
        ),
        # Weak scaling: every process keeps the single-process batch (a larger global
        # batch, so not the same optimisation: shown for throughput only).
        f"{args.nproc} DDP processes, global batch x{args.nproc}": distributed.torchrun_command(
            args.nproc,
            [*entry, "--set", f"train.batch_size={params.train.batch_size * args.nproc}"],
        ),
    }
    tries: dict[str, list[dict[str, Any]]] = {label: [] for label in setups}
    for _ in range(args.repeats):
        for label, cmd in setups.items():
            tries[label].append(_train_run(label, cmd))
    runs = [max(t, key=lambda r: r["images_per_second"]) for t in tries.values()]
    for run in runs:
        run["all_images_per_second"] = [r["images_per_second"] for r in tries[run["setup"]]]
    one_thread, single, ddp, ddp_big_batch = (r["images_per_second"] for r in runs)
    speedup = ddp / single
    efficiency = ddp / (args.nproc * one_thread)

    # ---- 2. tuning vs the default params
    tune_started = time.perf_counter()
    tuned = run_tune(params, layout, trials=args.trials, study_name="bench-scale", params_file=None)
    tune_seconds = time.perf_counter() - tune_started
    best_params = load_params(layout.root / "tuning" / "best_params.yaml")

    def test_accuracy(p: Any) -> tuple[float, float]:
        model = p.train.models[0]
        result = run_train(p, layout, model, show_progress=False)
        return result.val_accuracy, run_evaluate(p, layout, model).accuracy

    default_val, default_test = test_accuracy(params)
    best_val, best_test = test_accuracy(best_params)

    results: dict[str, Any] = {
        "machine": {
            "cores": cores,
            "platform": platform.platform(),
            "torch": torch.__version__,
        },
        "train_images": prepared.n_train,
        "epochs": args.epochs,
        "throughput": {
            "runs": runs,
            "nproc": args.nproc,
            "speedup_vs_single_process": round(speedup, 3),
            "parallel_efficiency": round(efficiency, 3),
            "speedup_with_global_batch_x_nproc": round(ddp_big_batch / single, 3),
        },
        "tuning": {
            "trials": args.trials,
            "complete": tuned.complete,
            "pruned": tuned.pruned,
            "seconds": round(tune_seconds, 1),
            "best_values": tuned.best_values,
            "best_trial": tuned.best_trial,
            "baseline_val_accuracy": tuned.baseline_value,
            "best_val_accuracy": tuned.best_value,
            "importances": tuned.importances,
            "retrained": {
                "default": {"val_accuracy": default_val, "test_accuracy": default_test},
                "tuned": {"val_accuracy": best_val, "test_accuracy": best_test},
            },
        },
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "scale.json").write_text(json.dumps(results, indent=2, default=str) + "\n")

    n_train = results["train_images"]
    lines = [
        "# Scaling benchmark",
        "",
        f"MNIST slice of {n_train} training images, cnn, {args.epochs} epochs, {cores} CPU "
        f"cores, torch {torch.__version__}. images/s counts training steps only.",
        "",
        "## Distributed data parallel",
        "",
        "| setup | images/s | val accuracy | wall s (incl. start-up) |",
        "|---|---|---|---|",
        *(
            f"| {r['setup']} | {r['images_per_second']:.0f} | {r['val_accuracy']:.4f} "
            f"| {r['wall_seconds']:.0f} |"
            for r in runs
        ),
        "",
        f"Same params (global batch {params.train.batch_size}, cut into one chunk per "
        f"process): speed-up of {args.nproc} DDP processes over one process using every "
        f"core **{speedup:.2f}×**, parallel efficiency against {args.nproc} one-thread "
        f"processes **{efficiency:.0%}**. With the global batch grown {args.nproc}× (each "
        f"process keeps a batch of {params.train.batch_size}; other optimisation, so a "
        f"different accuracy): **{ddp_big_batch / single:.2f}×**.",
        "",
        "## Tuning",
        "",
        f"{args.trials} trials of `tune.space` ({tuned.complete} complete, {tuned.pruned} "
        f"pruned) in {tune_seconds:.0f} s; best trial {tuned.best_trial}: "
        + ", ".join(
            f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
            for k, v in tuned.best_values.items()
        )
        + ".",
        "",
        "| params | val accuracy | test accuracy |",
        "|---|---|---|",
        f"| default (params.yaml) | {default_val:.4f} | {default_test:.4f} |",
        f"| tuned (tuning/best_params.yaml) | {best_val:.4f} | {best_test:.4f} |",
    ]
    (RESULTS / "scale.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
