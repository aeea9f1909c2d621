"""Real-handwriting benchmark: photos and drawings people made, and images that are no digit.

Two sets go through the real HTTP path (``visionops serve`` on the champion, one
multipart upload per image, as a user's client sends it):

- ``../shared/data/real-digits/`` beside the repository (or ``--data``): handwritten
  digits that people made for MNIST demo apps (photos of paper, canvas exports, paint
  drawings). The label is the first character of the file name; ``SOURCES.tsv`` gives the
  repository and the kind (photo / canvas / paint) of each file. Right = the served label
  is the true one *and* the prediction is accepted: a rejection counts as a miss.
  Reported overall, per kind, per source, with rejections (and their ``reason`` when the
  server gives one) and the confusion matrix. Skipped, with a note, when the folder is
  absent.
- A non-digit set the benchmark draws itself (seeded): blank pages, uniform colours,
  fully transparent images, noise, gradients, text in a font, blurred colour scenes,
  empty ruled paper. Reported: the share *not* accepted.

Writes ``benchmarks/results/real.json``, ``real.md`` and ``real_misses.png`` (for every
miss and every accepted non-digit: the upload, and what the model saw — the shared
preprocessing run on the same bytes).

    python benchmarks/bench_real.py [--model-uri models:/visionops-mnist@champion] [--data DIR]
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import numpy as np
from bench_serve import free_port, wait_ready
from PIL import Image, ImageDraw, ImageFilter, ImageFont

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
BIN = Path(sys.executable).parent
DEFAULT_DATA = REPO.parent / "shared" / "data" / "real-digits"
BOUNDARY = "visionopsbenchrealboundary"
THUMB = 84


# --------------------------------------------------------------------------- server


def predict(base: str, name: str, data: bytes) -> dict[str, Any]:
    """POST one file to /v1/predict; the prediction, or the error body for a 4xx."""
    ctype = "image/jpeg" if name.lower().endswith((".jpg", ".jpeg")) else "image/png"
    body = (
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="files"; '
        f'filename="{name}"\r\nContent-Type: {ctype}\r\n\r\n'.encode()
        + data
        + f"\r\n--{BOUNDARY}--\r\n".encode()
    )
    req = urllib.request.Request(
        base + "/v1/predict",
        data=body,
        headers={"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return dict(json.loads(r.read())["predictions"][0])
    except urllib.error.HTTPError as exc:
        err = json.loads(exc.read() or b"{}")
        return {"label": None, "accepted": False, "reason": f"http_{exc.code}", "error": err}


# --------------------------------------------------------------------------- non-digits


def png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def non_digit_images(seed: int = 0) -> list[tuple[str, str, bytes]]:
    """(kind, name, PNG bytes) of images that hold no digit, drawn from ``seed``."""
    rng = np.random.default_rng(seed)
    out: list[tuple[str, str, bytes]] = []

    def add(kind: str, img: Image.Image) -> None:
        out.append((kind, f"{kind}_{sum(k == kind for k, _, _ in out) + 1}.png", png(img)))

    for size, fill in (((280, 280), 255), ((280, 280), 0), ((640, 480), 250), ((28, 28), 0)):
        add("blank", Image.new("L", size, fill))
    for colour in ((200, 30, 30), (30, 120, 220), (128, 128, 128), (240, 220, 90)):
        add("uniform colour", Image.new("RGB", (300, 300), colour))
    add("transparent", Image.new("RGBA", (300, 300), (0, 0, 0, 0)))
    add("transparent", Image.new("RGBA", (300, 300), (255, 255, 255, 0)))
    add("transparent", Image.new("LA", (64, 64), (0, 0)))
    for _ in range(2):
        add("noise", Image.fromarray(rng.integers(0, 256, (200, 200), dtype=np.uint8), "L"))
        add("noise", Image.fromarray(rng.integers(0, 256, (240, 320, 3), dtype=np.uint8)))
    add("noise", Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8), "L"))
    x = np.linspace(0.0, 1.0, 320)[None, :].repeat(240, axis=0)
    yy, xx = np.mgrid[0:240, 0:320]
    radial = np.hypot(yy - 120, xx - 160) / 200.0
    for a in (x * 255, (1 - x) * 255, np.clip(radial, 0, 1) * 255, x.T[:240, :240] * 200 + 30):
        add("gradient", Image.fromarray(a.astype(np.uint8), "L"))
    add(
        "gradient",
        Image.fromarray(np.stack([x * 255, (1 - x) * 200, radial * 150], -1).astype(np.uint8)),
    )
    font = ImageFont.load_default(size=28)
    lines = [
        ("The quick brown fox", "jumps over the lazy dog."),
        ("Lorem ipsum dolor sit", "amet, consectetur."),
        ("Invoice total due", "upon receipt"),
        ("Hello", "world"),
    ]
    for i, (first, second) in enumerate(lines):
        img = Image.new("L", (400, 160), 250 if i % 2 == 0 else 20)
        d = ImageDraw.Draw(img)
        d.text((12, 30), first, fill=20 if i % 2 == 0 else 235, font=font)
        d.text((12, 90), second, fill=20 if i % 2 == 0 else 235, font=font)
        add("text", img)
    for _ in range(4):
        scene = Image.new("RGB", (320, 240), tuple(int(v) for v in rng.integers(0, 256, 3)))
        d = ImageDraw.Draw(scene)
        for _ in range(8):
            x0, y0 = int(rng.integers(0, 280)), int(rng.integers(0, 200))
            x1, y1 = x0 + int(rng.integers(30, 160)), y0 + int(rng.integers(30, 120))
            r, g, b = (int(v) for v in rng.integers(0, 256, 3))
            colour = (r, g, b)
            (d.ellipse if rng.random() < 0.5 else d.rectangle)((x0, y0, x1, y1), fill=colour)
        add("blurred scene", scene.filter(ImageFilter.GaussianBlur(6)))
    for spacing, size in ((30, (400, 500)), (45, (600, 800)), (24, (300, 300))):
        paper = Image.new("RGB", size, (250, 250, 245))
        d = ImageDraw.Draw(paper)
        for y in range(spacing, size[1], spacing):
            d.line([(0, y), (size[0], y)], fill=(150, 170, 220), width=2)
        d.line([(size[0] // 8, 0), (size[0] // 8, size[1])], fill=(220, 120, 120), width=2)
        add("ruled paper", paper)
    return out


# --------------------------------------------------------------------------- report


def thumb(img: Image.Image) -> Image.Image:
    """The upload on a magenta backdrop (transparency shows), fitted in THUMB px."""
    rgba = img.convert("RGBA")
    backdrop = Image.new("RGBA", rgba.size, (255, 0, 255, 255))
    out = Image.alpha_composite(backdrop, rgba).convert("RGB")
    out.thumbnail((THUMB, THUMB))
    tile = Image.new("RGB", (THUMB, THUMB), (60, 60, 60))
    tile.paste(out, ((THUMB - out.width) // 2, (THUMB - out.height) // 2))
    return tile


def contact_sheet(rows: list[tuple[bytes, np.ndarray, str]], path: Path) -> None:
    """Pairs (upload, model input) with a caption, four pairs per row."""
    cols = 4
    n = max(1, len(rows))
    h = THUMB + 16
    sheet = Image.new("RGB", (cols * 2 * THUMB + (cols - 1) * 8, ((n + cols - 1) // cols) * h))
    draw = ImageDraw.Draw(sheet)
    for i, (data, seen, caption) in enumerate(rows):
        r, c = divmod(i, cols)
        x, y = c * (2 * THUMB + 8), r * h
        sheet.paste(thumb(Image.open(io.BytesIO(data))), (x, y))
        model = Image.fromarray(seen[:, :, 0] if seen.ndim == 3 else seen)
        sheet.paste(
            model.resize((THUMB, THUMB), Image.Resampling.NEAREST).convert("RGB"), (x + THUMB, y)
        )
        draw.text((x + 2, y + THUMB + 2), caption[:38], fill=(255, 220, 0))
    sheet.save(path)


def tally(groups: dict[str, list[bool]], key: str) -> dict[str, dict[str, int]]:
    """{group: {key: how many True, "images": how many}}, groups sorted."""
    return {k: {key: sum(v), "images": len(v)} for k, v in sorted(groups.items())}


def pct(right: int, total: int) -> str:
    return f"{right}/{total} = {100.0 * right / total:.1f} %" if total else "–"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model-uri", default="models:/visionops-mnist@champion")
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    args = ap.parse_args()
    env = dict(os.environ, MLFLOW_DISABLE_TELEMETRY="true", PATH=f"{BIN}:{os.environ['PATH']}")
    env.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{REPO / 'mlflow.db'}")
    os.environ.update(env)

    from visionops.data.transforms import PreprocessSpec, decode_image, image_to_array
    from visionops.serve.model import resolve_model_uri

    ref = resolve_model_uri(args.model_uri)
    meta = json.loads((ref.path / "metadata.json").read_text())
    spec = PreprocessSpec.from_dict(meta["preprocess"])

    def model_sees(data: bytes) -> np.ndarray:
        try:
            return image_to_array(decode_image(data, max_pixels=10**8), spec)
        except Exception:
            return np.zeros((spec.image_size, spec.image_size, spec.channels), np.uint8)

    digits: list[tuple[str, int, str, str, bytes]] = []  # file, label, kind, repo, bytes
    if (args.data / "SOURCES.tsv").is_file():
        with (args.data / "SOURCES.tsv").open(newline="") as fh:
            for row in csv.DictReader(fh, delimiter="\t"):
                f = args.data / row["file"]
                if f.is_file():
                    label = int(row["file"][0])
                    digits.append((row["file"], label, row["kind"], row["repo"], f.read_bytes()))
    else:
        print(f"{args.data} not found (or no SOURCES.tsv): real digits skipped")
    others = non_digit_images()

    work = Path(tempfile.mkdtemp(prefix="visionops-bench-real-"))
    port = free_port()
    server_env = dict(env, VISIONOPS_PREDLOG_URL=f"sqlite:///{work / 'predlog.db'}")
    proc = subprocess.Popen(
        [str(BIN / "visionops"), "serve", "--model-uri", args.model_uri, "--port", str(port)],
        env=server_env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(base + "/readyz", proc=proc)
        digit_preds = [predict(base, f, data) for f, _, _, _, data in digits]
        other_preds = [predict(base, name, data) for _, name, data in others]
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)

    # Real digits: right = true label and accepted.
    by_kind: dict[str, list[bool]] = defaultdict(list)
    by_source: dict[str, list[bool]] = defaultdict(list)
    confusion = np.zeros((10, 11), dtype=int)  # last column: rejected
    rejected: Counter[str] = Counter()
    misses = []
    for (f, label, kind, repo, _data), p in zip(digits, digit_preds, strict=True):
        ok = p.get("label") == str(label) and bool(p.get("accepted"))
        by_kind[kind].append(ok)
        by_source[repo].append(ok)
        if p.get("accepted"):
            confusion[label, int(p["label"])] += 1
        else:
            confusion[label, 10] += 1
            rejected[str(p.get("reason") or "low confidence")] += 1
        if not ok:
            what = p.get("label") if p.get("accepted") else f"rejected {p.get('reason') or ''}"
            conf = p.get("confidence")
            misses.append(
                {"file": f, "label": label, "kind": kind, "served": p.get("label"),
                 "accepted": p.get("accepted"), "reason": p.get("reason"),
                 "confidence": conf, "caption": f"{f} -> {what} {conf or 0:.2f}"}
            )  # fmt: skip
    right = sum(sum(v) for v in by_kind.values())

    other_kinds: dict[str, list[bool]] = defaultdict(list)
    accepted_others = []
    for (kind, name, _data), p in zip(others, other_preds, strict=True):
        refused = not p.get("accepted")
        other_kinds[kind].append(refused)
        if not refused:
            accepted_others.append(
                {"file": name, "kind": kind, "served": p.get("label"),
                 "confidence": p.get("confidence"),
                 "caption": f"{name} -> {p.get('label')} {p.get('confidence') or 0:.2f}"}
            )  # fmt: skip
    refused_total = sum(sum(v) for v in other_kinds.values())

    results: dict[str, Any] = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "model": {"uri": args.model_uri, "version": ref.version, "arch": meta.get("architecture")},
        "real_digits": {
            "data": os.path.relpath(args.data, REPO),
            "images": len(digits),
            "right": right,
            "accuracy": right / len(digits) if digits else None,
            "per_kind": tally(by_kind, "right"),
            "per_source": tally(by_source, "right"),
            "rejected": dict(rejected),
            "confusion": confusion.tolist(),
            "misses": misses,
        },
        "non_digits": {
            "images": len(others),
            "not_accepted": refused_total,
            "share_not_accepted": refused_total / len(others),
            "per_kind": tally(other_kinds, "not_accepted"),
            "accepted": accepted_others,
        },
    }  # fmt: skip
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "real.json").write_text(json.dumps(results, indent=2) + "\n")

    sheet_rows = [
        (data, model_sees(data), str(m["caption"]))
        for (f, _, _, _, data) in digits
        for m in misses
        if m["file"] == f
    ] + [
        (data, model_sees(data), str(a["caption"]))
        for (_, name, data) in others
        for a in accepted_others
        if a["file"] == name
    ]
    contact_sheet(sheet_rows, RESULTS / "real_misses.png")

    lines = [
        "# Real-handwriting benchmark",
        "",
        f"Model `{args.model_uri}` (version {ref.version}, {meta.get('architecture')}), served by "
        "`visionops serve`; one multipart upload per image over HTTP. A digit counts as right "
        "when the served label is its label and the prediction is accepted.",
        "",
    ]
    why_rejected = (
        " (" + ", ".join(f"{k}: {v}" for k, v in sorted(rejected.items())) + ")" if rejected else ""
    )
    if digits:
        lines += [
            f"## Handwritten digits ({args.data.name}/, {len(digits)} images)",
            "",
            f"**Overall: {pct(right, len(digits))}**; rejected: {sum(rejected.values())}"
            + why_rejected,
            "",
            "| kind | right |",
            "|---|---|",
            *[f"| {k} | {pct(sum(v), len(v))} |" for k, v in sorted(by_kind.items())],
            "",
            "| source | right |",
            "|---|---|",
            *[f"| {k} | {pct(sum(v), len(v))} |" for k, v in sorted(by_source.items())],
            "",
            "Confusion (rows: true digit; columns: served digit, `rej` = not accepted):",
            "",
            "| | " + " | ".join(str(i) for i in range(10)) + " | rej |",
            "|---|" + "---|" * 11,
            *[f"| **{i}** | " + " | ".join(str(v) if v else "·" for v in row) + " |"
              for i, row in enumerate(confusion.tolist())],
            "",
            "Misses: " + (", ".join(f"`{m['caption']}`" for m in misses) if misses else "none"),
            "",
        ]  # fmt: skip
    else:
        lines += [f"Handwritten digits skipped: `{args.data}` is absent.", ""]
    lines += [
        f"## Images without a digit (generated, {len(others)} images)",
        "",
        f"**Not accepted: {pct(refused_total, len(others))}**",
        "",
        "| kind | not accepted |",
        "|---|---|",
        *[f"| {k} | {pct(sum(v), len(v))} |" for k, v in other_kinds.items()],
        "",
        "`real_misses.png`: for every miss and every accepted non-digit, the upload (magenta "
        "= transparent) and what the model saw.",
    ]  # fmt: skip
    (RESULTS / "real.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
