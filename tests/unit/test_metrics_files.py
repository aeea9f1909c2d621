"""The committed DVC metrics files hold headline numbers and booleans only.

`dvc metrics show` prints one column per flattened key of every metrics file; per-class
tables and the gate's reasons made that 120+ columns of mostly text. They live in
`plots/per_class/` and `reports/gate.json` instead.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
#: Columns `dvc metrics show` may print for the committed results: one screen wide.
MAX_COLUMNS = 30


def _metrics_files() -> list[Path]:
    dvc = yaml.safe_load((REPO / "dvc.yaml").read_text())
    models = yaml.safe_load((REPO / "params.yaml").read_text())["train"]["models"]
    files = []
    for stage in dvc["stages"].values():
        body = stage.get("do", stage)
        for entry in body.get("metrics", []):
            path = next(iter(entry)) if isinstance(entry, dict) else str(entry)
            items = models if "${item}" in path else [None]
            files += [REPO / path.replace("${item}", str(m)) for m in items]
    return files


def _leaves(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict):
        out: dict[str, Any] = {}
        for key, value in node.items():
            out |= _leaves(value, f"{prefix}.{key}" if prefix else str(key))
        return out
    return {prefix: node}


def test_metrics_files_hold_numbers_and_booleans_in_few_columns() -> None:
    files = _metrics_files()
    assert len(files) >= 5, files
    columns: set[str] = set()
    for path in files:
        leaves = _leaves(json.loads(path.read_text()))
        text = {k: v for k, v in leaves.items() if not (v is None or isinstance(v, int | float))}
        assert not text, f"{path.relative_to(REPO)}: not a number or boolean: {text}"
        columns |= set(leaves)
    assert len(columns) <= MAX_COLUMNS, sorted(columns)


def test_per_class_results_are_a_plot() -> None:
    for model in yaml.safe_load((REPO / "params.yaml").read_text())["train"]["models"]:
        rows = json.loads((REPO / "plots" / "per_class" / f"{model}.json").read_text())
        assert {"class", "precision", "recall", "f1", "support"} <= set(rows[0])
        assert (
            sum(r["support"] for r in rows)
            == json.loads((REPO / "metrics" / "eval" / f"{model}.json").read_text())["n_test"]
        )
