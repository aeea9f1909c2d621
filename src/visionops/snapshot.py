"""The small files the pipeline commits, of one side of a comparison: a :class:`Snapshot`.

``metrics/`` (headline numbers), ``plots/`` (learning curves, confusion and per-class
data) and ``params.yaml`` -- never models or data -- read from a git ref (``git show
REF:metrics/...``, committed by the PR flow), a workspace folder, or a metrics file
(``dvc metrics show --json``). ``visionops report compare`` puts two side by side.
"""

from __future__ import annotations

import fnmatch
import json
import math
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from visionops.errors import DataError, VisionOpsError
from visionops.layout import Layout

# The pipeline's file names, relative to a project root: one source of truth (Layout).
_REL = Layout(Path())
EVAL_GLOB = _REL.eval_metrics("*").as_posix()  # metrics/eval/*.json
TRAIN_GLOB = _REL.train_metrics("*").as_posix()  # metrics/train/*.json
CURVE_GLOB = _REL.learning_curve("*").as_posix()  # plots/train/*.json
CONFUSION_GLOB = _REL.confusion_csv("*").as_posix()  # plots/confusion/*.csv
PER_CLASS_GLOB = _REL.per_class_plot("*").as_posix()  # plots/per_class/*.json
GATE_FILE = _REL.gate_json.as_posix()  # metrics/gate.json: headline numbers
GATE_REPORT_FILE = _REL.gate_report.as_posix()  # reports/gate.json: reasons (not committed)
PARAMS_FILE = "params.yaml"
REPORT_GLOBS = (
    EVAL_GLOB,
    TRAIN_GLOB,
    CURVE_GLOB,
    CONFUSION_GLOB,
    PER_CLASS_GLOB,
    GATE_FILE,
    GATE_REPORT_FILE,
    PARAMS_FILE,
)
# Top folders (or files) holding the globs, for `git ls-tree`.
_GIT_PATHSPECS = sorted({g.split("/", 1)[0] for g in REPORT_GLOBS})


def flatten_numbers(obj: Any, prefix: str = "") -> dict[str, float]:
    """Numeric leaves of nested dicts under dotted keys (booleans and lists left out)."""
    out: dict[str, float] = {}
    if isinstance(obj, Mapping):
        for key, value in obj.items():
            name = f"{prefix}.{key}" if prefix else str(key)
            out.update(flatten_numbers(value, name))
    elif isinstance(obj, int | float) and not isinstance(obj, bool) and math.isfinite(obj):
        out[prefix] = float(obj)
    return out


# --------------------------------------------------------------------------- snapshots


@dataclass(frozen=True)
class Snapshot:
    """The pipeline's small output files of one side, parsed, by relative POSIX path.

    JSON files hold their parsed value, ``params.yaml`` its mapping, CSV files their text.
    """

    label: str
    kind: Literal["git", "directory", "metrics-file"]
    files: Mapping[str, Any] = field(default_factory=dict)

    def get(self, rel: str) -> Any:
        return self.files.get(rel)

    def matching(self, pattern: str) -> dict[str, Any]:
        """``{stem: content}`` of the files matching one of the globs."""
        return {
            Path(rel).stem: value
            for rel, value in sorted(self.files.items())
            if fnmatch.fnmatchcase(rel, pattern)
        }

    @property
    def has_metrics(self) -> bool:
        return any(rel.startswith("metrics/") for rel in self.files)

    def params(self) -> dict[str, Any] | None:
        raw = self.files.get(PARAMS_FILE)
        return raw if isinstance(raw, dict) else None

    def comparison(self) -> dict[str, dict[str, float]]:
        """``{model: train and eval numbers}`` for the models with both metrics files."""
        train, evals = self.matching(TRAIN_GLOB), self.matching(EVAL_GLOB)
        return {
            m: flatten_numbers(train[m]) | flatten_numbers(evals[m])
            for m in train
            if isinstance(train[m], dict) and isinstance(evals.get(m), dict)
        }

    def best_model(self) -> str | None:
        """The model compare selects (:func:`visionops.evaluate.select_best`)."""
        from visionops.evaluate import select_best

        table = {
            m: row for m, row in self.comparison().items() if {"val_accuracy", "params"} <= set(row)
        }
        return select_best(table) if table else None

    def gate(self) -> Any:
        """The gate's whole decision where this side has it, else its headline numbers."""
        return self.files.get(GATE_REPORT_FILE) or self.files.get(GATE_FILE)


def _wanted(rel: str) -> bool:
    return any(fnmatch.fnmatchcase(rel, g) for g in REPORT_GLOBS)


def _parse(rel: str, text: str, where: str) -> Any:
    try:
        if rel.endswith(".json"):
            return json.loads(text)
        if rel.endswith((".yaml", ".yml")):
            return yaml.safe_load(text) or {}
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise DataError(f"{where}: {rel} is not readable ({exc})") from None
    return text


def snapshot_from_directory(root: Path, label: str | None = None) -> Snapshot:
    """The report files of a project folder (this workspace, or another checkout)."""
    root = Path(root)
    files: dict[str, Any] = {}
    for pattern in REPORT_GLOBS:
        for path in sorted(root.glob(pattern)):
            if path.is_file():
                rel = path.relative_to(root).as_posix()
                files[rel] = _parse(rel, path.read_text(), str(root))
    return Snapshot(label or str(root), "directory", files)


def _git(args: list[str], cwd: Path) -> subprocess.CompletedProcess[bytes]:
    try:
        return subprocess.run(["git", *args], cwd=cwd, capture_output=True, check=False)
    except FileNotFoundError:
        raise VisionOpsError("git is not installed: cannot read a base ref") from None


def snapshot_from_git(ref: str, root: Path) -> Snapshot:
    """The report files committed at ``ref`` (a branch, tag or commit) of ``root``'s repo."""
    root = Path(root)
    verify = _git(["rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}"], root)
    if verify.returncode != 0:
        raise VisionOpsError(
            f"base '{ref}' is neither a folder, a metrics file nor a git ref of {root} "
            "(in CI, fetch it first: actions/checkout with fetch-depth: 0)"
        )
    sha = verify.stdout.decode().strip()
    # Paths in git are relative to the repository top; the project may live below it.
    prefix = _git(["rev-parse", "--show-prefix"], root).stdout.decode().strip()
    listing = _git(
        ["ls-tree", "-r", "-z", "--name-only", "--full-name", sha, "--", *_GIT_PATHSPECS], root
    )
    if listing.returncode != 0:
        raise VisionOpsError(f"git ls-tree {ref} failed: {listing.stderr.decode().strip()}")
    files: dict[str, Any] = {}
    for name in listing.stdout.decode().split("\0"):
        if not name or not name.startswith(prefix):
            continue
        rel = name[len(prefix) :]
        if not _wanted(rel):
            continue
        shown = _git(["show", f"{sha}:{name}"], root)
        if shown.returncode == 0:
            files[rel] = _parse(rel, shown.stdout.decode(), f"{ref}")
    return Snapshot(ref, "git", files)


def _unwrap_dvc(obj: Any) -> Any:
    # `dvc metrics show --json` wraps each file's content as {"data": {...}}.
    if isinstance(obj, dict) and "data" in obj and set(obj) <= {"data", "error"}:
        return obj["data"]
    return obj


def _looks_like_paths(obj: Mapping[str, Any]) -> bool:
    return bool(obj) and all(
        isinstance(k, str) and k.endswith((".json", ".yaml", ".yml", ".csv")) for k in obj
    )


def snapshot_from_metrics_file(path: Path) -> Snapshot:
    """Base metrics from a JSON file: ``{"metrics/eval/cnn.json": {...}, ...}`` or the
    output of ``dvc metrics show --json`` (its first revision)."""
    try:
        raw = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: not a readable JSON metrics file ({exc})") from None
    node: Any = raw
    for _ in range(3):  # {rev: {"data": {path: {"data": ...}}}} at most
        if isinstance(node, dict) and _looks_like_paths(node):
            files = {
                str(Path(k).as_posix()).removeprefix("./"): _unwrap_dvc(v) for k, v in node.items()
            }
            return Snapshot(str(path), "metrics-file", files)
        if isinstance(node, dict) and node:
            node = _unwrap_dvc(next(iter(node.values())))
    raise DataError(
        f'{path}: expected a mapping of metrics files (e.g. {{"{EVAL_GLOB.replace("*", "cnn")}'
        '": {...}}) or the output of `dvc metrics show --json`'
    )


def load_base(base: str, root: Path) -> Snapshot:
    """A folder, a JSON metrics file, or else a git ref of the repository at ``root``."""
    candidate = Path(base)
    if not candidate.is_absolute():
        candidate = root / candidate
    if candidate.is_dir():
        return snapshot_from_directory(candidate, label=base)
    if candidate.is_file():
        return snapshot_from_metrics_file(candidate)
    return snapshot_from_git(base, root)
