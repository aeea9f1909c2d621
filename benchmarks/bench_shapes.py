"""Your own pictures: the plain image-folder experiment on a generated shapes folder.

A folder of 450 pictures (three classes: circle, square, triangle; 64×64 RGB, random
colours, sizes and positions; PNG and JPEG mixed) is written by
``visionops.data.shapes``, then, in a fresh git + DVC workspace holding this
repository's ``src/``, ``dvc.yaml`` and ``params.yaml``, the command a new user types:

    dvc exp run -S data.source=imagefolder -S data.path=DIR

is timed (wall clock, the whole pipeline: ingest to gate). Then ``visionops serve``
serves the exported model and every test picture of the folder is uploaded as a file;
the answers are compared with the folder's labels.

    python benchmarks/bench_shapes.py      # also run by bench_train.py

Writes benchmarks/results/train_shapes.json and train_shapes.md.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
BIN = Path(sys.executable).parent


def _run(args: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"{args} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _serve_and_classify(ws: Path, folder: Path, env: dict[str, str]) -> dict[str, Any]:
    """Serve ``ws/exported`` and upload every test picture; count the right answers."""
    import httpx

    meta = json.loads((ws / "data" / "interim" / "dataset.json").read_text())
    classes = meta["classes"]
    port = _free_port()
    proc = subprocess.Popen(
        [str(BIN / "visionops"), "serve", "--port", str(port), "--model-uri", "exported"],
        cwd=ws,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(240):
            try:
                if httpx.get(base + "/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        right = 0
        files = meta["test_files"]
        for rel in files:
            truth = rel.split("/")[0]
            data = (folder / rel).read_bytes()
            mime = "image/png" if rel.endswith(".png") else "image/jpeg"
            r = httpx.post(
                base + "/v1/predict", files={"files": (Path(rel).name, data, mime)}, timeout=30
            )
            r.raise_for_status()
            right += r.json()["predictions"][0]["label"] == truth
        return {"uploads": len(files), "served_correct": right, "classes": classes}
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def run_shapes_benchmark() -> dict[str, Any]:
    """Generate the folder, time the plain ``dvc exp run``, serve; return the results."""
    from visionops.data.shapes import write_shapes_folder

    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "VISIONOPS_"))}
    env.update(
        PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",
        MLFLOW_DISABLE_TELEMETRY="true",
        GIT_AUTHOR_NAME="bench",
        GIT_AUTHOR_EMAIL="bench@example.invalid",
        GIT_COMMITTER_NAME="bench",
        GIT_COMMITTER_EMAIL="bench@example.invalid",
    )
    with tempfile.TemporaryDirectory(prefix="visionops-shapes-") as tmp:
        root = Path(tmp)
        folder = root / "shapes"
        write_shapes_folder(folder, per_class=150, size=64, seed=0)
        ws = root / "ws"
        ws.mkdir()
        shutil.copytree(REPO / "src", ws / "src", ignore=shutil.ignore_patterns("__pycache__"))
        for name in ("dvc.yaml", "params.yaml", ".gitignore"):
            shutil.copy(REPO / name, ws / name)
        _run(["git", "init", "-q", "-b", "main"], ws, env)
        _run([str(BIN / "dvc"), "init", "-q"], ws, env)
        _run([str(BIN / "dvc"), "config", "core.analytics", "false"], ws, env)
        _run(["git", "add", "-A"], ws, env)
        _run(["git", "commit", "-qm", "workspace"], ws, env)
        cmd = ["dvc", "exp", "run", "-S", "data.source=imagefolder", "-S", f"data.path={folder}"]
        load_before = os.getloadavg()[0]
        cpu_before = resource.getrusage(resource.RUSAGE_CHILDREN)
        started = time.perf_counter()
        _run([str(BIN / "dvc"), *cmd[1:]], ws, env)
        seconds = time.perf_counter() - started
        cpu_after = resource.getrusage(resource.RUSAGE_CHILDREN)
        # CPU time of the whole pipeline: what it costs whatever else shares the machine.
        cpu_seconds = (cpu_after.ru_utime - cpu_before.ru_utime) + (
            cpu_after.ru_stime - cpu_before.ru_stime
        )
        comparison = json.loads((ws / "reports" / "comparison.json").read_text())
        models = {
            m: json.loads((ws / "metrics" / "eval" / f"{m}.json").read_text())["accuracy"]
            for m in comparison["models"]
        }
        train = {
            m: json.loads((ws / "metrics" / "train" / f"{m}.json").read_text())
            for m in comparison["models"]
        }
        validation = json.loads((ws / "reports" / "validation.json").read_text())
        served = _serve_and_classify(ws, folder, env)
    return {
        "command": " ".join([*cmd[:6], "data.path=DIR"]),
        "pictures": 450,
        "pipeline_seconds": round(seconds, 1),
        "pipeline_cpu_seconds": round(cpu_seconds, 1),
        "load_average_at_start": round(load_before, 2),
        "best_model": comparison["best_model"],
        "test_accuracy": models,
        "train": {
            m: {k: t[k] for k in ("epochs_run", "best_epoch", "train_seconds") if k in t}
            for m, t in train.items()
        },
        "preprocessing": validation.get("preprocess_summary"),
        **served,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
    }


def write_results(results: dict[str, Any]) -> str:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "train_shapes.json").write_text(json.dumps(results, indent=2) + "\n")
    best = results["best_model"]
    lines = [
        "# Your own pictures: a generated shapes folder",
        "",
        f"450 pictures (circle / square / triangle, 64×64 RGB, PNG + JPEG), "
        f"{results['machine']['cpus']} CPU cores. `{results['command']}` with no other flag.",
        "",
        f"- {results['preprocessing']}",
        f"- whole pipeline (ingest to gate): **{results['pipeline_seconds']:.0f} s** wall "
        f"({results['pipeline_cpu_seconds']:.0f} CPU-seconds; load average "
        f"{results['load_average_at_start']:.1f} at the start: the cores were shared)",
        "- test accuracy: "
        + ", ".join(f"{m} {a:.2%}" for m, a in results["test_accuracy"].items())
        + f" (best: {best})",
        f"- `visionops serve`: {results['served_correct']} of {results['uploads']} "
        "test pictures uploaded as files answered with their folder's class",
    ]
    text = "\n".join(lines) + "\n"
    (RESULTS / "train_shapes.md").write_text(text)
    return text


def main() -> None:
    print(write_results(run_shapes_benchmark()))


if __name__ == "__main__":
    main()
