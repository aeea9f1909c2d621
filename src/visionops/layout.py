"""Where each pipeline stage reads and writes, relative to a project root.

One place for every path keeps ``dvc.yaml``, the CLI and the tests in agreement.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Layout:
    root: Path

    @classmethod
    def at(cls, root: str | Path | None = None) -> Layout:
        return cls(Path(root) if root is not None else Path.cwd())

    # ingest -> validate
    @property
    def interim_dir(self) -> Path:
        return self.root / "data" / "interim"

    @property
    def dataset_npz(self) -> Path:
        """x_train, y_train, x_test, y_test as uint8 (N,H,W,C) / int64 arrays."""
        return self.interim_dir / "dataset.npz"

    @property
    def dataset_json(self) -> Path:
        """classes, source, per-image file names, unreadable files, checksums."""
        return self.interim_dir / "dataset.json"

    # prepare
    @property
    def prepared_dir(self) -> Path:
        return self.root / "data" / "prepared"

    def split_npz(self, split: str) -> Path:
        """x (uint8 N,H,W,C) and y (int64) of split train|val|test."""
        return self.prepared_dir / f"{split}.npz"

    @property
    def prepared_meta(self) -> Path:
        """classes, image_size, channels, mean, std (train split only), counts."""
        return self.prepared_dir / "meta.json"

    # train / evaluate
    def model_dir(self, name: str) -> Path:
        return self.root / "models" / name

    def train_metrics(self, name: str) -> Path:
        return self.root / "metrics" / "train" / f"{name}.json"

    def eval_metrics(self, name: str) -> Path:
        return self.root / "metrics" / "eval" / f"{name}.json"

    def learning_curve(self, name: str) -> Path:
        """per-epoch rows for `dvc plots` (epoch, train_loss, val_loss, val_accuracy)."""
        return self.root / "plots" / "train" / f"{name}.json"

    def confusion_csv(self, name: str) -> Path:
        return self.root / "plots" / "confusion" / f"{name}.csv"

    def per_class_plot(self, name: str) -> Path:
        """per-class rows for `dvc plots` (class, precision, recall, f1, support)."""
        return self.root / "plots" / "per_class" / f"{name}.json"

    def eval_report_dir(self, name: str) -> Path:
        return self.root / "reports" / "eval" / name

    @property
    def tensorboard_dir(self) -> Path:
        return self.root / "runs"

    # compare / export / register / gate / report
    @property
    def comparison_json(self) -> Path:
        """The selected model and the table it was selected from (not a metrics file)."""
        return self.root / "reports" / "comparison.json"

    @property
    def reports_dir(self) -> Path:
        return self.root / "reports"

    @property
    def export_dir(self) -> Path:
        """model.onnx + metadata.json: everything serving needs, no torch."""
        return self.root / "exported"

    @property
    def registration_json(self) -> Path:
        return self.root / "reports" / "registration.json"

    @property
    def gate_json(self) -> Path:
        """The gate's headline numbers and booleans (a DVC metrics file)."""
        return self.root / "metrics" / "gate.json"

    @property
    def gate_report(self) -> Path:
        """The gate's whole decision: model name, reasons, every check's detail."""
        return self.root / "reports" / "gate.json"

    @property
    def state_dir(self) -> Path:
        """Local, untracked run state (the pipeline's MLflow parent run id)."""
        return self.root / ".visionops"
