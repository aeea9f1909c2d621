"""Serving benchmark: visionops beside a bare-bones server, mlflow, LitServe and BentoML.

One run, one champion, one client (`hey`, Debian package, against 127.0.0.1 only,
bounded in time), the same bodies for every server that takes images:

- visionops (`visionops serve`) with 1 worker and with N workers (N = usable cores), all
  features on: prediction log, metrics, MNIST centring, request ids;
- the bare-bones reference (benchmarks/bare_serve.py): the product's own decode +
  preprocess, one ONNX Runtime call, an orjson answer, nothing else — what visionops
  does beyond it is what its serving machinery costs; 1 and N workers;
- LitServe and BentoML (benchmarks/peers/) serving the same ONNX model with the same
  decode + preprocess, N workers, installed in a separate virtualenv
  (benchmarks/.venv-peers, created here from the package registry) so the product's pins
  stay clean;
- `mlflow models serve` of the registered model (JSON tensors: it takes no image files).

Bodies: one 28×28 PNG (c=1 and c=16), one 280×280 RGBA canvas PNG (the web page's
drawing; c=16), 64 PNGs in one request (c=4). Reported: requests/s, p50/p99 latency,
images/s, resident memory of every process of each server.

    python benchmarks/bench_serve.py [--model-uri models:/visionops-mnist@champion]
        [--seconds 5] [--skip-peers]

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
from dataclasses import dataclass, field
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


def wait_ready(
    url: str, timeout: float = 120.0, proc: subprocess.Popen[bytes] | None = None
) -> None:
    """Poll ``url`` until it answers 200; RuntimeError after ``timeout`` s or when ``proc``
    (the server, if given) exits first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the server exited with code {proc.returncode} before ready")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except Exception:
            time.sleep(0.5)
    raise RuntimeError(f"{url} not ready after {timeout} s")


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
    if not rows:
        return {
            "requests": 0,
            "ok": 0,
            "errors": 0,
            "requests_per_second": 0.0,
            "p50_ms": None,
            "p99_ms": None,
        }
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


#: Runs with several clients are repeated and the median run reported: each run opens new
#: connections, and which worker process accepts which one varies from run to run.
REPEATS = 3


def repeated(
    url: str, body: Path, content_type: str, concurrency: int, seconds: int
) -> dict[str, Any]:
    """:func:`hey` once at concurrency 1, else :data:`REPEATS` times: the median run by
    requests/s, with every run's requests/s under ``runs_rps``."""
    if concurrency == 1:
        return hey(url, body, content_type, concurrency, seconds)
    runs = [hey(url, body, content_type, concurrency, seconds) for _ in range(REPEATS)]
    runs.sort(key=lambda r: r["requests_per_second"])
    return {**runs[len(runs) // 2], "runs_rps": [r["requests_per_second"] for r in runs]}


def raw_onnx_images_per_second(model_dir: Path, x: np.ndarray, seconds: float = 5.0) -> float:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = len(os.sched_getaffinity(0))
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


def decode_preprocess_ms(png: bytes, spec: Any, seconds: float = 1.0) -> dict[str, float]:
    """Milliseconds per image, in this process, of the product's decode
    (:func:`~visionops.data.transforms.decode_image`) and preprocessing
    (:func:`~visionops.data.transforms.image_to_array`) of one PNG: the work every server
    but mlflow does per image, whatever its serving machinery."""
    from visionops.data.transforms import decode_image, image_to_array

    def per_call(fn: Any) -> float:
        fn()
        n, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds:
            fn()
            n += 1
        return round((time.perf_counter() - started) / n * 1000, 3)

    img = decode_image(png, max_pixels=10**8)
    return {
        "decode_ms": per_call(lambda: decode_image(png, max_pixels=10**8)),
        "preprocess_ms": per_call(lambda: image_to_array(img, spec)),
    }


def process_rss_mb(pid: int) -> list[float]:
    """Resident memory (MiB) of a process and all its descendants, one entry each."""
    out: list[float] = []
    todo = [pid]
    while todo:
        p = todo.pop()
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    out.append(round(int(line.split()[1]) / 1024, 1))
            children = Path(f"/proc/{p}/task/{p}/children").read_text().split()
        except OSError:
            continue
        todo += [int(c) for c in children]
    return out


PEERS_VENV = REPO / "benchmarks" / ".venv-peers"
PEER_PACKAGES = ("litserve==0.2.19", "bentoml==1.4.40")
# The product's own pins of what the peers share with it (read from constraints.txt).
SHARED_PINS = ("numpy", "scipy", "pillow", "onnxruntime", "orjson", "uvicorn", "python-multipart")


def peers_python() -> Path:
    """The peer frameworks' interpreter; the virtualenv is (re)created when pins change."""
    python = PEERS_VENV / "bin" / "python"
    marker = PEERS_VENV / ".installed"
    pins = {
        line.split("==")[0].lower(): line.strip()
        for line in (REPO / "constraints.txt").read_text().splitlines()
        if "==" in line and not line.startswith("#")
    }
    wanted = [*PEER_PACKAGES, *(pins[name] for name in SHARED_PINS if name in pins)]
    if marker.is_file() and marker.read_text() == " ".join(wanted):
        return python
    subprocess.run([sys.executable, "-m", "venv", str(PEERS_VENV)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "-q", *wanted], check=True)
    marker.write_text(" ".join(wanted))
    return python


@dataclass
class Server:
    name: str
    cmd: list[str]
    ready: str
    route: str
    kind: str  # "images" (multipart PNGs) or "mlflow" (JSON tensors)
    workers: int
    env: dict[str, str] = field(default_factory=dict)
    cwd: Path = REPO


def measure(
    server: Server, bodies: dict[str, Path], seconds: int, env: dict[str, str]
) -> dict[str, Any]:
    port = free_port()
    proc = subprocess.Popen(
        [c.replace("{port}", str(port)) for c in server.cmd],
        env={**env, **server.env},
        cwd=server.cwd,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    mp = f"multipart/form-data; boundary={BOUNDARY}"
    try:
        base = f"http://127.0.0.1:{port}"
        wait_ready(base + server.ready, timeout=300)
        url = base + server.route
        entry: dict[str, Any] = {"workers": server.workers}
        if server.kind == "images":
            runs = {
                "single_c1": ("one", 1),
                "single_c16": ("one", 16),
                "canvas_c16": ("canvas", 16),
                "batch64_c4": ("64", 4),
            }
            ctype = mp
        else:
            runs = {"single_c1": ("m1", 1), "single_c16": ("m1", 16), "batch64_c4": ("m64", 4)}
            ctype = "application/json"
        hey(url, bodies[runs["single_c1"][0]], ctype, 4, 2)  # warm-up
        for key, (body, conc) in runs.items():
            entry[key] = repeated(url, bodies[body], ctype, conc, seconds)
        entry["batch64_c4"]["images_per_second"] = round(
            entry["batch64_c4"]["requests_per_second"] * 64, 1
        )
        rss = process_rss_mb(proc.pid)
        entry["rss_mb_per_process"] = rss
        entry["rss_mb_total"] = round(sum(rss), 1)
        return entry
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def canvas_png(digit: np.ndarray) -> bytes:
    """A 280×280 RGBA drawing like the web page's canvas: dark ink on transparent."""
    big = np.asarray(Image.fromarray(digit).resize((280, 280), Image.Resampling.BILINEAR))
    rgba = np.zeros((280, 280, 4), np.uint8)
    rgba[..., 3] = big  # black strokes, alpha = ink
    return png_bytes(rgba)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model-uri", default="models:/visionops-mnist@champion")
    ap.add_argument("--seconds", type=int, default=5)
    ap.add_argument("--skip-peers", action="store_true", help="no LitServe/BentoML run")
    args = ap.parse_args()
    if not shutil.which("hey"):
        sys.exit("hey is not installed: apt-get install -y hey")
    env = dict(os.environ, MLFLOW_DISABLE_TELEMETRY="true", PATH=f"{BIN}:{os.environ['PATH']}")
    env.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{REPO / 'mlflow.db'}")
    env["BENTOML_DO_NOT_TRACK"] = "true"
    os.environ.update(env)

    from visionops.data.sources import load_mnist_idx
    from visionops.data.transforms import PreprocessSpec, normalize
    from visionops.registry import resolve_served_model

    ref = resolve_served_model(args.model_uri)
    meta = json.loads((ref.path / "metadata.json").read_text())
    spec = PreprocessSpec.from_dict(meta["preprocess"])
    images = load_mnist_idx(REPO / "data/raw/mnist/t10k-images-idx3-ubyte.gz")[:64]
    x64 = normalize(images[..., None] if images.ndim == 3 else images, spec)
    cores = len(os.sched_getaffinity(0))

    work = Path(tempfile.mkdtemp(prefix="visionops-bench-serve-"))
    one_png, canvas = png_bytes(images[0]), canvas_png(images[1])
    contents = {
        "one": multipart_body([one_png]),
        "canvas": multipart_body([canvas]),
        "64": multipart_body([png_bytes(i) for i in images]),
        "m1": json.dumps({"inputs": x64[:1].tolist()}).encode(),
        "m64": json.dumps({"inputs": x64.tolist()}).encode(),
    }
    bodies = {}
    for key, data in contents.items():
        bodies[key] = work / f"{key}.bin"
        bodies[key].write_bytes(data)

    results: dict[str, Any] = {
        "machine": {"cpus": cores, "platform": platform.platform()},
        "model": {
            "uri": args.model_uri,
            "version": ref.version,
            "architecture": meta.get("architecture"),
        },
        "seconds_per_run": args.seconds,
        "raw_onnxruntime_images_per_second_batch64": round(
            raw_onnx_images_per_second(ref.path, x64), 1
        ),
        "per_image_in_process": {
            "one": decode_preprocess_ms(one_png, spec),
            "canvas": decode_preprocess_ms(canvas, spec),
        },
        "servers": {},
    }
    src = str(REPO / "src")
    servers: list[Server] = []
    for n in sorted({1, cores}):
        servers.append(
            Server(
                f"visionops ({n}w)",
                [
                    str(BIN / "visionops"),
                    "serve",
                    "--model-uri",
                    args.model_uri,
                    "--port",
                    "{port}",
                    "--workers",
                    str(n),
                ],
                "/readyz",
                "/v1/predict",
                "images",
                n,
                env={"VISIONOPS_PREDLOG_URL": f"sqlite:///{work / f'predlog-{n}.db'}"},
            )
        )
        servers.append(
            Server(
                f"bare-bones ({n}w)",
                [
                    sys.executable,
                    str(REPO / "benchmarks" / "bare_serve.py"),
                    str(ref.path),
                    "--port",
                    "{port}",
                    "--workers",
                    str(n),
                ],
                "/ready",
                "/predict",
                "images",
                n,
                env={"PYTHONPATH": src},
            )
        )
    if not args.skip_peers:
        peers = str(peers_python())
        peer_env = {
            "PYTHONPATH": f"{src}:{REPO / 'benchmarks' / 'peers'}",
            "PEER_MODEL_DIR": str(ref.path),
            "PEER_THREADS": "1",
        }
        servers.append(
            Server(
                f"LitServe ({cores}w)",
                [
                    peers,
                    str(REPO / "benchmarks" / "peers" / "litserve_app.py"),
                    "{port}",
                    str(cores),
                ],
                "/health",
                "/predict",
                "images",
                cores,
                env=peer_env,
            )
        )
        servers.append(
            Server(
                f"BentoML ({cores}w)",
                [
                    str(PEERS_VENV / "bin" / "bentoml"),
                    "serve",
                    "bentoml_app:Classifier",
                    "--port",
                    "{port}",
                    "--host",
                    "127.0.0.1",
                ],
                "/readyz",
                "/predict",
                "images",
                cores,
                env={**peer_env, "PEER_WORKERS": str(cores)},
                cwd=REPO / "benchmarks" / "peers",
            )
        )
    servers.append(
        Server(
            "mlflow models serve",
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
            "mlflow",
            1,
        )
    )
    for server in servers:
        print(f"measuring {server.name} ...", flush=True)
        try:
            results["servers"][server.name] = measure(server, bodies, args.seconds, env)
        except Exception as exc:  # one framework failing must not lose the others' figures
            results["servers"][server.name] = {"error": f"{type(exc).__name__}: {exc}"}

    results["checks"] = checks(results["servers"], cores)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "serve.json").write_text(json.dumps(results, indent=2) + "\n")
    text = markdown(results, args.model_uri, meta, cores)
    (RESULTS / "serve.md").write_text(text)
    print(text)


def _rps(servers: dict[str, Any], name: str, run: str) -> float | None:
    e = servers.get(name, {})
    return e.get(run, {}).get("requests_per_second") if "error" not in e else None


def checks(servers: dict[str, Any], cores: int) -> list[dict[str, Any]]:
    """The serving targets, each with the measured value and whether it holds."""
    v = f"visionops ({cores}w)"
    out: list[dict[str, Any]] = []

    def ratio(a: float | None, b: float | None) -> float | None:
        return round(a / b, 2) if a and b else None

    def add(what: str, value: float | None, target: float, at_least: bool = True) -> None:
        ok = None if value is None else (value >= target if at_least else value <= target)
        out.append({"check": what, "value": value, "target": target, "ok": ok})

    c16 = _rps(servers, v, "single_c16")
    add(
        "c=16 28×28: × mlflow models serve",
        ratio(c16, _rps(servers, "mlflow models serve", "single_c16")),
        3.5,
    )
    add(
        f"c=16 28×28: × LitServe ({cores}w)",
        ratio(c16, _rps(servers, f"LitServe ({cores}w)", "single_c16")),
        1.5,
    )
    add(
        f"c=16 28×28: × BentoML ({cores}w)",
        ratio(c16, _rps(servers, f"BentoML ({cores}w)", "single_c16")),
        1.5,
    )
    add(
        f"c=16 28×28: × bare-bones ({cores}w)",
        ratio(c16, _rps(servers, f"bare-bones ({cores}w)", "single_c16")),
        0.8,
    )
    add(
        "c=16 28×28: p99 ms",
        servers.get(v, {}).get("single_c16", {}).get("p99_ms"),
        25.0,
        at_least=False,
    )
    add(
        "c=1 28×28: p50 ms",
        servers.get(v, {}).get("single_c1", {}).get("p50_ms"),
        1.5,
        at_least=False,
    )
    add(
        "64-image requests: images/s",
        servers.get(v, {}).get("batch64_c4", {}).get("images_per_second"),
        4000.0,
    )
    add("280×280 canvas c=16: req/s", _rps(servers, v, "canvas_c16"), 800.0)
    rss = servers.get(v, {}).get("rss_mb_per_process")
    add("RSS per worker MiB (largest process)", max(rss) if rss else None, 250.0, at_least=False)
    return out


def _per_image_lines(results: dict[str, Any], cores: int) -> list[str]:
    """What decoding and preprocessing one body's image cost in process, and the most
    requests/s that leaves ``cores`` cores if they did nothing else."""
    per = results.get("per_image_in_process") or {}
    out = []
    for key, what in (("one", "28×28 PNG"), ("canvas", "280×280 RGBA canvas PNG")):
        if key not in per:
            continue
        d, p = per[key]["decode_ms"], per[key]["preprocess_ms"]
        out.append(
            f"- {what}: decode {d} ms + preprocess {p} ms per image in one process (the "
            f"product's functions, every server but mlflow runs them): at most "
            f"{cores * 1000 / (d + p):.0f} requests/s on {cores} cores for that work alone."
        )
    return out


def markdown(results: dict[str, Any], uri: str, meta: dict[str, Any], cores: int) -> str:
    lines = [
        "# Serving benchmark",
        "",
        f"Model `{uri}` (version {results['model']['version']}, {meta.get('architecture')}), "
        f"{cores} cores, `hey` on 127.0.0.1, {results['seconds_per_run']} s per run; the "
        "load generator shares the cores with the server it measures. Runs with several "
        f"clients: the median of {REPEATS} (each opens new connections, and which worker "
        "accepts which varies), every run's requests/s in serve.json (`runs_rps`).",
        "",
        "| server | c=1 req/s | c=1 p50 / p99 ms | c=16 req/s | c=16 p50 / p99 ms "
        "| canvas c=16 req/s | 64-image req: images/s | errors | RSS MiB per process |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, e in results["servers"].items():
        if "error" in e:
            lines.append(f"| {name} | failed: {e['error'][:80]} |||||||| ")
            continue
        s1, s16, b = e["single_c1"], e["single_c16"], e["batch64_c4"]
        cv = e.get("canvas_c16")
        errors = sum(r["errors"] for k, r in e.items() if isinstance(r, dict) and "errors" in r)
        lines.append(
            f"| {name} | {s1['requests_per_second']} | {s1['p50_ms']} / {s1['p99_ms']} | "
            f"{s16['requests_per_second']} | {s16['p50_ms']} / {s16['p99_ms']} | "
            f"{cv['requests_per_second'] if cv else 'n/a (JSON tensors)'} | "
            f"{b['images_per_second']} | {errors} | "
            f"{' + '.join(str(r) for r in e['rss_mb_per_process'])} |"
        )
    lines += [
        "",
        f"Raw ONNX Runtime at batch 64 in the same run: "
        f"{results['raw_onnxruntime_images_per_second_batch64']} images/s.",
        "",
        *_per_image_lines(results, cores),
        "",
        "| target (visionops with N workers) | measured | target | holds |",
        "|---|---|---|---|",
    ]
    for c in results["checks"]:
        mark = {True: "yes", False: "**no**", None: "n/a"}[c["ok"]]
        lines.append(f"| {c['check']} | {c['value']} | {c['target']} | {mark} |")
    lines += [
        "",
        "mlflow takes pre-normalised JSON tensors (no image decoding); every other server "
        "gets the same multipart PNG bodies and runs the product's decode + preprocess. "
        "LitServe pickles requests to its inference workers and cannot pickle an uploaded "
        "file, so its app turns the multipart body into base64 JSON in the API process "
        "(benchmarks/peers/litserve_app.py).",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
