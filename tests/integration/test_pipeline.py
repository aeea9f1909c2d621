"""The whole pipeline, for real, on a tiny slice in a temporary workspace.

One workspace is built per module: `visionops pipeline run` (dvc repro) trains two
models on 600 MNIST images, registers and gates the best; then a deliberately bad
change registers a challenger that the gate refuses; then `dvc exp run` trains a model
for a user's image folder under its own registered model name.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent

TINY = {
    "data": {"limit": 600, "test_limit": 400},
    "train": {"epochs": 1, "width": 8, "batch_size": 64, "min_steps": 0},
    "evaluate": {"gallery_size": 8},
    # Timing never decides a test: the latency budget is out of reach here.
    "gate": {"latency_budget_ms": 10000.0},
}


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) else value
    return out


def _env(workspace: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "VISIONOPS_"))}
    env.update(
        PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",
        MLFLOW_DISABLE_TELEMETRY="true",
        GIT_AUTHOR_NAME="t",
        GIT_AUTHOR_EMAIL="t@example.com",
        GIT_COMMITTER_NAME="t",
        GIT_COMMITTER_EMAIL="t@example.com",
    )
    return env


def _run(args: list[str], workspace: Path, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        args, cwd=workspace, env=_env(workspace), capture_output=True, text=True, check=False
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def _write_params(workspace: Path, extra: dict) -> None:
    base = yaml.safe_load((REPO / "params.yaml").read_text())
    (workspace / "params.yaml").write_text(yaml.safe_dump(_merge(_merge(base, TINY), extra)))


def _mlflow_client(workspace: Path):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{workspace / 'mlflow.db'}")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    ws = tmp_path_factory.mktemp("workspace")
    shutil.copytree(REPO / "src", ws / "src", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(REPO / "data" / "raw" / "mnist", ws / "data" / "raw" / "mnist")
    shutil.copytree(REPO / "data" / "feedback", ws / "data" / "feedback")
    shutil.copy(REPO / "dvc.yaml", ws / "dvc.yaml")
    (ws / ".gitignore").write_text((REPO / ".gitignore").read_text())
    _write_params(ws, {})
    _run(["git", "init", "-q", "-b", "main"], ws)
    _run([str(BIN / "dvc"), "init", "-q"], ws)
    _run([str(BIN / "dvc"), "config", "core.analytics", "false"], ws)
    _run(["git", "add", "-A"], ws)
    _run(["git", "commit", "-qm", "workspace"], ws)
    return ws


@pytest.fixture(scope="module")
def first_run(workspace: Path) -> subprocess.CompletedProcess:
    return _run([str(BIN / "visionops"), "pipeline", "run"], workspace)


def test_pipeline_trains_registers_and_promotes(workspace: Path, first_run) -> None:
    comparison = json.loads((workspace / "reports" / "comparison.json").read_text())
    assert set(comparison["models"]) == {"cnn", "mlp"}
    assert comparison["best_model"] in {"cnn", "mlp"}
    for model in ("cnn", "mlp"):
        metrics = json.loads((workspace / "metrics" / "eval" / f"{model}.json").read_text())
        # 600 images, one epoch: far from 99 %, far above the 10 % of guessing.
        assert 0.3 < metrics["accuracy"] <= 1.0
        assert (workspace / "reports" / "eval" / model / "confusion_matrix.png").stat().st_size
    assert (workspace / "exported" / "model.onnx").exists()
    meta = json.loads((workspace / "exported" / "metadata.json").read_text())
    assert meta["classes"] == [str(i) for i in range(10)]
    assert meta["parity_max_abs_diff"] <= 1e-4

    gate = json.loads((workspace / "metrics" / "gate.json").read_text())
    assert gate["promoted"] is True
    client = _mlflow_client(workspace)
    champion = client.get_model_version_by_alias("visionops-mnist", "champion")
    challenger = client.get_model_version_by_alias("visionops-mnist", "challenger")
    assert str(champion.version) == str(challenger.version) == "1"
    assert "champion" in first_run.stdout or "promoted" in first_run.stdout.lower()


def test_one_parent_run_with_a_nested_run_per_stage(workspace: Path, first_run) -> None:
    client = _mlflow_client(workspace)
    exp = client.get_experiment_by_name("visionops")
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    names = {r.info.run_name for r in children}
    expected = {
        "ingest",
        "validate",
        "prepare",
        "train-cnn",
        "train-mlp",
        "evaluate-cnn",
        "evaluate-mlp",
        "compare",
        "export",
        "register",
        "gate",
    }
    assert expected <= names, names
    assert parents[0].info.status == "FINISHED"


def test_second_repro_is_a_noop_and_status_clean(workspace: Path, first_run) -> None:
    status = _run([str(BIN / "dvc"), "status", "--json"], workspace)
    assert json.loads(status.stdout) == {}
    again = _run([str(BIN / "visionops"), "pipeline", "run"], workspace)
    assert "up to date" in again.stdout


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _serve_and_post(
    workspace: Path, cmd: list[str], ready: str, route: str, **request: object
) -> dict:
    """Start a server in the workspace, wait until `ready` answers 200, POST once."""
    import httpx

    port = _free_port()
    env = _env(workspace)
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{workspace / 'mlflow.db'}"
    env["VISIONOPS_PREDLOG_URL"] = f"sqlite:///{workspace / 'predictions.db'}"
    proc = subprocess.Popen(
        [c.replace("{port}", str(port)) for c in cmd],
        cwd=workspace,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        for _ in range(240):
            if proc.poll() is not None:
                raise AssertionError(f"{cmd} exited: {proc.stderr.read() if proc.stderr else ''}")
            try:
                if httpx.get(base + ready, timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            import time

            time.sleep(0.5)
        response = httpx.post(base + route, timeout=30, **request)  # type: ignore[arg-type]
        assert response.status_code == 200, response.text
        return response.json()
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _test_images(workspace: Path, n: int = 4) -> tuple[np.ndarray, np.ndarray]:
    with np.load(workspace / "data" / "prepared" / "test.npz", allow_pickle=False) as z:
        return z["x"][:n], z["y"][:n]


def test_champion_served_by_visionops_from_the_registry(workspace: Path, first_run) -> None:
    """`visionops serve` resolves models:/NAME@champion and answers like the ONNX file."""
    import onnxruntime as ort

    from visionops.data.transforms import PreprocessSpec, normalize

    x, _ = _test_images(workspace)
    meta = json.loads((workspace / "exported" / "metadata.json").read_text())
    spec = PreprocessSpec.from_dict(meta["preprocess"])
    sess = ort.InferenceSession(str(workspace / "exported" / "model.onnx"))
    expected = sess.run(["probabilities"], {"input": normalize(x, spec)})[0]
    body = _serve_and_post(
        workspace,
        [
            str(BIN / "visionops"),
            "serve",
            "--port",
            "{port}",
            "--model-uri",
            "models:/visionops-mnist@champion",
        ],
        "/readyz",
        "/v1/predict",
        json={"instances": (x[..., 0] / 255.0).tolist()},
    )
    assert body["model"]["name"] == "visionops-mnist"
    assert str(body["model"]["version"]) == "1"
    got = [p["class_index"] for p in body["predictions"]]
    assert got == expected.argmax(axis=1).tolist()


def test_champion_works_with_mlflow_models_serve(workspace: Path, first_run) -> None:
    """The registered pyfunc model answers `mlflow models serve` with our probabilities."""
    import onnxruntime as ort

    from visionops.data.transforms import PreprocessSpec, normalize

    x, _ = _test_images(workspace)
    meta = json.loads((workspace / "exported" / "metadata.json").read_text())
    inputs = normalize(x, PreprocessSpec.from_dict(meta["preprocess"]))
    sess = ort.InferenceSession(str(workspace / "exported" / "model.onnx"))
    expected = sess.run(["probabilities"], {"input": inputs})[0]
    body = _serve_and_post(
        workspace,
        [
            str(BIN / "mlflow"),
            "models",
            "serve",
            "-m",
            "models:/visionops-mnist@champion",
            "--env-manager",
            "local",
            "-h",
            "127.0.0.1",
            "-p",
            "{port}",
        ],
        "/ping",
        "/invocations",
        json={"inputs": inputs.tolist()},
    )
    got = np.asarray(body["predictions"], dtype=np.float32)
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_bad_params_register_a_challenger_and_keep_the_champion(workspace: Path, first_run) -> None:
    _write_params(workspace, {"train": {"lr": 1e-7, "models": ["mlp"]}})
    _run([str(BIN / "visionops"), "pipeline", "run"], workspace)
    client = _mlflow_client(workspace)
    champion = client.get_model_version_by_alias("visionops-mnist", "champion")
    challenger = client.get_model_version_by_alias("visionops-mnist", "challenger")
    assert str(champion.version) == "1"
    assert str(challenger.version) == "2"
    gate = json.loads((workspace / "reports" / "gate.json").read_text())
    assert gate["promoted"] is False
    assert gate["reasons"], gate
    assert json.loads((workspace / "metrics" / "gate.json").read_text())["promoted"] is False
    assert challenger.tags.get("gate.promoted") in {"false", "False"}
    _write_params(workspace, {})


def _shapes_folder(root: Path) -> Path:
    """Three classes of drawn shapes, dark ink on light paper, odd sizes and formats.

    Every shape has its own slant, proportions and stroke width, as real drawings do, so
    no two images are the same after preprocessing.
    """
    from PIL import ImageDraw

    rng = np.random.default_rng(0)
    for cls in ("bar", "dot", "frame"):
        (root / cls).mkdir(parents=True)
        for i in range(40):
            size = int(rng.integers(40, 90))
            img = Image.new("L", (size, size), 255)
            draw = ImageDraw.Draw(img)
            c = size / 2
            h = size * rng.uniform(0.25, 0.4)
            w = size * rng.uniform(0.15, 0.35)
            stroke = int(rng.integers(2, 7))
            if cls == "bar":
                slant = size * rng.uniform(-0.15, 0.15)
                draw.line([(c - slant, c - h), (c + slant, c + h)], fill=0, width=stroke)
            elif cls == "dot":
                draw.ellipse([c - w, c - h * 0.8, c + w, c + h * 0.8], fill=0)
            else:
                draw.rectangle([c - w, c - h, c + w, c + h], outline=0, width=stroke)
            ext = ("png", "jpg", "bmp")[i % 3]
            img.save(root / cls / f"{cls}_{i}.{ext}")
    return root


def test_dvc_exp_run_on_an_image_folder(workspace: Path, first_run, tmp_path: Path) -> None:
    folder = _shapes_folder(tmp_path / "shapes")
    proc = _run(
        [
            str(BIN / "dvc"),
            "exp",
            "run",
            "-S",
            "data.source=imagefolder",
            "-S",
            f"data.path={folder}",
            "-S",
            "train.models=[mlp]",
            "-S",
            "train.epochs=3",
        ],
        workspace,
    )
    assert proc.returncode == 0
    client = _mlflow_client(workspace)
    champion = client.get_model_version_by_alias("visionops-shapes", "champion")
    assert str(champion.version) == "1"
    meta = json.loads((workspace / "exported" / "metadata.json").read_text())
    assert meta["classes"] == ["bar", "dot", "frame"]
    metrics = json.loads((workspace / "metrics" / "eval" / "mlp.json").read_text())
    assert metrics["accuracy"] > 0.6


def _cifar_archive(path: Path, per_batch: int = 30, n_test: int = 45) -> list[str]:
    """A small archive in the real binary CIFAR-10 format: ``cifar-10-batches-bin/`` with
    ``data_batch_1..5.bin`` and ``test_batch.bin`` (records of one label byte and 3,072
    CHW pixel bytes) and ``batches.meta.txt``. Three classes: a red, green or blue square
    at a random place on a noisy grey background."""
    import io
    import tarfile

    classes = ["red", "green", "blue"]
    rng = np.random.default_rng(5)

    def batch(n: int) -> bytes:
        labels = rng.integers(0, 3, n).astype(np.uint8)
        chw = rng.integers(60, 140, (n, 3, 32, 32)).astype(np.uint8)
        for i, label in enumerate(labels):
            r, c = rng.integers(0, 20, 2)
            chw[i, :, r : r + 12, c : c + 12] = 30
            chw[i, label, r : r + 12, c : c + 12] = 230
        return np.concatenate([labels[:, None], chw.reshape(n, -1)], axis=1).tobytes()

    members = {f"data_batch_{i}.bin": batch(per_batch) for i in range(1, 6)}
    members["test_batch.bin"] = batch(n_test)
    members["batches.meta.txt"] = ("\n".join(classes) + "\n").encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as tar:
        for name, payload in members.items():
            info = tarfile.TarInfo(f"cifar-10-batches-bin/{name}")
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return classes


@pytest.mark.timeout(900)  # a whole pipeline with an 11M-parameter model, on a busy CPU
def test_dvc_exp_run_on_cifar10_with_a_timm_resnet18(workspace: Path, tmp_path: Path) -> None:
    """CIFAR-10 end to end with a timm backbone: natural pictures, resnet18 from timm,
    ONNX parity, registered as visionops-cifar10 and served from the registry."""
    archive = tmp_path / "cifar" / "cifar-10-binary.tar.gz"
    classes = _cifar_archive(archive)
    _run(
        [
            str(BIN / "dvc"),
            "exp",
            "run",
            "-S",
            "data.source=cifar10",
            "-S",
            f"data.path={archive}",
            "-S",
            "train.models=[resnet18]",
            "-S",
            "train.epochs=3",
        ],
        workspace,
    )
    validation = json.loads((workspace / "reports" / "validation.json").read_text())
    assert validation["preprocess"]["kind"] == "natural"
    assert validation["preprocess"]["channels"] == 3
    meta = json.loads((workspace / "exported" / "metadata.json").read_text())
    assert meta["classes"] == classes
    assert meta["parity_max_abs_diff"] <= 1e-4
    config = json.loads((workspace / "models" / "resnet18" / "config.json").read_text())
    assert config["architecture"] == "resnet18" and config["recipe"]["kind"] == "natural"
    metrics = json.loads((workspace / "metrics" / "eval" / "resnet18.json").read_text())
    assert metrics["accuracy"] > 0.5  # three classes: a third is guessing
    client = _mlflow_client(workspace)
    champion = client.get_model_version_by_alias("visionops-cifar10", "champion")
    assert str(champion.version) == "1"
