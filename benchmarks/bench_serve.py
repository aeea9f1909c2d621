"""Serving benchmark: `visionops serve` vs `mlflow models serve`, same model, same client.

Both servers load the registered champion; the load generator is `hey` (Debian package)
against 127.0.0.1 only, bounded in time. Measured: requests/s and p50/p99 latency for
single-image requests at concurrency 1 and 16, images/s for 64-image requests, raw ONNX
Runtime throughput at batch 64 in the same run, and each server's resident memory.

    python benchmarks/bench_serve.py [--model-uri models:/visionops-mnist@champion]

Writes benchmarks/results/serve.json and serve.md.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
BIN = Path(sys.executable).parent
BOUNDARY = "visionopsbenchboundary"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_ready(url: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except Exception:
            time.sleep(0.5)
    raise RuntimeError(f"{url} not ready after {timeout} s")


def tree_rss_mb(pid: int) -> float:
    """Resident memory of a process and its children (MiB)."""
    total = 0
    pids = [pid]
    try:
        out = subprocess.run(
            ["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True
        )
        pids += [int(p) for p in out.stdout.split()]
    except Exception:
        pass
    for p in pids:
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            continue
    return total / 1024


def multipart_body(pngs: list[bytes]) -> bytes:
    parts = []
    for i, png in enumerate(pngs):
        parts.append(
            f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="files"; '
            f'filename="{i}.png"\r\nContent-Type: image/png\r\n\r\n'.encode()
            + png
            + b"\r\n"
        )
    return b"".join(parts) + f"--{BOUNDARY}--\r\n".encode()


def png_bytes(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def hey(url: str, body: Path, content_type: str, concurrency: int, seconds: int) -> dict[str, Any]:
    """Run hey for `seconds` and summarise its per-request CSV."""
    proc = subprocess.run(
        [
            "hey",
            "-z",
            f"{seconds}s",
            "-c",
            str(concurrency),
            "-m",
            "POST",
            "-T",
            content_type,
            "-D",
            str(body),
            "-o",
            "csv",
            url,
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    rows = list(csv.DictReader(io.StringIO(proc.stdout)))
    lat = np.array([float(r["response-time"]) for r in rows]) * 1000.0
    ok = sum(1 for r in rows if r["status-code"] == "200")
    offsets = np.array([float(r["offset"]) for r in rows])
    span = float(offsets.max() + lat[np.argmax(offsets)] / 1000.0) if len(rows) else seconds
    return {
        "requests": len(rows),
        "ok": ok,
        "errors": len(rows) - ok,
        "requests_per_second": round(len(rows) / max(span, 1e-9), 1),
        "p50_ms": round(float(np.percentile(lat, 50)), 2) if len(rows) else None,
        "p99_ms": round(float(np.percentile(lat, 99)), 2) if len(rows) else None,
    }


def raw_onnx_images_per_second(model_dir: Path, x: np.ndarray, seconds: float = 5.0) -> float:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = os.cpu_count() or 1
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    sess = ort.InferenceSession(
        str(model_dir / "model.onnx"), opts, providers=["CPUExecutionProvider"]
    )
    sess.run(None, {"input": x})
    n, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        sess.run(["probabilities"], {"input": x})
        n += len(x)
    return n / (time.perf_counter() - started)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model-uri", default="models:/visionops-mnist@champion")
    ap.add_argument("--seconds", type=int, default=10)
    args = ap.parse_args()
    if not shutil.which("hey"):
        sys.exit("hey is not installed: apt-get install -y hey")
    env = dict(os.environ, MLFLOW_DISABLE_TELEMETRY="true", PATH=f"{BIN}:{os.environ['PATH']}")
    env.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{REPO / 'mlflow.db'}")
    os.environ.update(env)

    from visionops.data.sources import load_mnist_idx
    from visionops.data.transforms import PreprocessSpec, normalize
    from visionops.registry import resolve_served_model

    ref = resolve_served_model(args.model_uri)
    meta = json.loads((ref.path / "metadata.json").read_text())
    spec = PreprocessSpec.from_dict(meta["preprocess"])
    images = load_mnist_idx(REPO / "data/raw/mnist/t10k-images-idx3-ubyte.gz")[:64]
    x64 = normalize(images[..., None] if images.ndim == 3 else images, spec)

    work = Path(tempfile.mkdtemp(prefix="visionops-bench-serve-"))
    bodies = {
        "visionops-1": (work / "v1.bin", multipart_body([png_bytes(images[0])])),
        "visionops-64": (work / "v64.bin", multipart_body([png_bytes(i) for i in images])),
        "mlflow-1": (work / "m1.json", json.dumps({"inputs": x64[:1].tolist()}).encode()),
        "mlflow-64": (work / "m64.json", json.dumps({"inputs": x64.tolist()}).encode()),
    }
    for path, data in bodies.values():
        path.write_bytes(data)
    mp = f"multipart/form-data; boundary={BOUNDARY}"

    results: dict[str, Any] = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "model": {
            "uri": args.model_uri,
            "version": ref.version,
            "architecture": meta.get("architecture"),
        },
        "seconds_per_run": args.seconds,
        "raw_onnxruntime_images_per_second_batch64": round(
            raw_onnx_images_per_second(ref.path, x64), 1
        ),
    }

    servers = {
        "visionops": (
            [str(BIN / "visionops"), "serve", "--model-uri", args.model_uri, "--port", "{port}"],
            "/readyz",
            "/v1/predict",
            mp,
            "visionops",
        ),
        "mlflow": (
            [
                str(BIN / "mlflow"),
                "models",
                "serve",
                "-m",
                args.model_uri,
                "--env-manager",
                "local",
                "-h",
                "127.0.0.1",
                "-p",
                "{port}",
            ],
            "/ping",
            "/invocations",
            "application/json",
            "mlflow",
        ),
    }
    for name, (cmd, ready, route, ctype, key) in servers.items():
        port = free_port()
        server_env = dict(env, VISIONOPS_PREDLOG_URL=f"sqlite:///{work / 'predlog.db'}")
        proc = subprocess.Popen(
            [c.replace("{port}", str(port)) for c in cmd],
            env=server_env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        try:
            base = f"http://127.0.0.1:{port}"
            wait_ready(base + ready)
            entry: dict[str, Any] = {}
            for conc in (1, 16):
                entry[f"single_c{conc}"] = hey(
                    base + route, bodies[f"{key}-1"][0], ctype, conc, args.seconds
                )
            batch = hey(base + route, bodies[f"{key}-64"][0], ctype, 4, args.seconds)
            batch["images_per_second"] = round(batch["requests_per_second"] * 64, 1)
            entry["batch64_c4"] = batch
            entry["rss_mb"] = round(tree_rss_mb(proc.pid), 1)
            results[name] = entry
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=30)

    v, m = results["visionops"], results["mlflow"]
    results["ratios"] = {
        "req_per_s_vs_mlflow_c16": round(
            v["single_c16"]["requests_per_second"] / m["single_c16"]["requests_per_second"], 2
        ),
        "batch64_vs_raw_onnxruntime": round(
            v["batch64_c4"]["images_per_second"]
            / results["raw_onnxruntime_images_per_second_batch64"],
            3,
        ),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "serve.json").write_text(json.dumps(results, indent=2) + "\n")
    lines = [
        "# Serving benchmark",
        "",
        f"Model `{args.model_uri}` (version {ref.version}, {meta.get('architecture')}), "
        f"{os.cpu_count()} cores, `hey` on 127.0.0.1, {args.seconds} s per run.",
        "",
        "| server | c=1 req/s | c=1 p50 / p99 ms | c=16 req/s | c=16 p50 / p99 ms "
        "| 64-image req: images/s | errors | RSS MiB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name in ("visionops", "mlflow"):
        e = results[name]
        s1, s16, b = e["single_c1"], e["single_c16"], e["batch64_c4"]
        errors = s1["errors"] + s16["errors"] + b["errors"]
        lines.append(
            f"| {name} | {s1['requests_per_second']} | {s1['p50_ms']} / {s1['p99_ms']} | "
            f"{s16['requests_per_second']} | {s16['p50_ms']} / {s16['p99_ms']} | "
            f"{b['images_per_second']} | {errors} | {e['rss_mb']} |"
        )
    ratios = results["ratios"]
    lines += [
        "",
        f"Raw ONNX Runtime at batch 64 in the same run: "
        f"{results['raw_onnxruntime_images_per_second_batch64']} images/s.",
        f"visionops / mlflow requests/s at c=16: **{ratios['req_per_s_vs_mlflow_c16']}×** "
        f"(target ≥ 10×); 64-image requests reach "
        f"**{ratios['batch64_vs_raw_onnxruntime']:.0%}** of raw ONNX Runtime (target ≥ 80 %).",
        "",
        "The load generator shares the machine's cores with the server it measures.",
    ]
    (RESULTS / "serve.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
