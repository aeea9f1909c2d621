"""Typed parameters (params.yaml) and environment settings.

Parameters describe *what* the pipeline does and live in ``params.yaml`` (tracked by
DVC). Settings describe *where* things are (tracking URI, tokens, database URLs) and
come from the environment. Both are read only when a function asks for them.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from visionops.errors import ConfigError

DataSource = Literal["mnist", "cifar10", "imagefolder"]

# Native image geometry of the built-in sources: (image_size, channels).
NATIVE_SHAPE: dict[str, tuple[int, int]] = {"mnist": (28, 1), "cifar10": (32, 3)}


class StrictModel(BaseModel):
    """Base for every params section: unknown keys are errors, types are not coerced loosely."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class DataParams(StrictModel):
    source: DataSource = "mnist"
    path: str = "data/raw/mnist"
    image_size: int | None = Field(default=None, ge=8, le=512)
    channels: Literal[1, 3] | None = None
    limit: int | None = Field(default=None, ge=1, description="cap on training images")
    test_limit: int | None = Field(default=None, ge=1, description="cap on test images")
    val_fraction: float = Field(default=0.1, gt=0.0, lt=0.5)
    test_fraction: float = Field(
        default=0.2, gt=0.0, lt=0.9, description="imagefolder without train/test subfolders"
    )
    max_class_imbalance: float = Field(
        default=10.0, ge=1.0, description="largest/smallest class count allowed by validate"
    )
    extra_path: str | None = Field(
        default="data/feedback",
        min_length=1,
        description="image folder (<class>/*.png) added to the training split only "
        "(nothing while it does not exist); null: none",
    )
    natural_size: int = Field(
        default=32,
        ge=8,
        le=512,
        description="image_size of an image folder of photos (not digits) when image_size is null",
    )

    def shape(self) -> tuple[int, int]:
        """(image_size, channels) of mnist/cifar10 after applying the source's native defaults.

        An image folder's geometry follows its pictures (see
        :func:`visionops.data.profile.resolve_spec`); this gives the digit geometry for it.
        """
        size, channels = NATIVE_SHAPE.get(self.source, (28, 1))
        return (self.image_size or size, self.channels or channels)


class PreprocessParams(StrictModel):
    """How an image *file* becomes a model input (imagefolder ingest and serving)."""

    kind: Literal["auto", "digit", "natural"] = Field(
        default="auto",
        description="digit = MNIST conventions (inversion, centring); natural = photos; "
        "auto = decided from the data (mnist: digit, cifar10: natural, folders: profiled)",
    )
    invert: Literal["auto", "always", "never"] = "auto"
    center: bool | Literal["auto"] = Field(
        default="auto",
        description="MNIST-style centring: bounding box, fit, centre of mass; auto = digits only",
    )
    digit_box: int = Field(default=20, ge=4, description="size the digit is fitted into")


class TrainParams(StrictModel):
    models: list[str] = Field(default_factory=lambda: ["cnn", "mlp"], min_length=1)
    epochs: int = Field(default=4, ge=1)
    batch_size: int = Field(default=128, ge=1)
    lr: float = Field(default=3e-3, gt=0.0)
    weight_decay: float = Field(default=1e-4, ge=0.0)
    label_smoothing: float = Field(default=0.0, ge=0.0, lt=1.0)
    augment: bool = True
    max_shift: int = Field(default=2, ge=0, description="random translation in pixels")
    max_rotate: float = Field(default=8.0, ge=0.0, le=90.0, description="rotation, degrees")
    max_shear: float = Field(default=8.0, ge=0.0, le=45.0, description="shear, degrees")
    max_scale: float = Field(default=0.1, ge=0.0, lt=1.0, description="zoom in 1 ± max_scale")
    thickness: float = Field(
        default=0.4, ge=0.0, le=1.0, description="share of images thickened or thinned"
    )
    blur: float = Field(default=0.2, ge=0.0, le=1.0, description="share of images blurred")
    contrast: float = Field(
        default=0.2, ge=0.0, lt=1.0, description="ink scaled by [1 - contrast, 1]"
    )
    background: float = Field(
        default=0.05, ge=0.0, lt=1.0, description="background raised to [0, background]"
    )
    dropout: float = Field(default=0.1, ge=0.0, lt=1.0)
    width: int = Field(default=32, ge=4, description="base channel/hidden width of the zoo")
    patience: int = Field(default=3, ge=1, description="early stopping on val loss")
    min_steps: int = Field(
        default=1200,
        ge=0,
        description="least optimiser steps: epochs grow to reach it on small datasets",
    )
    max_epochs: int = Field(default=200, ge=1, description="cap on epochs grown by min_steps")
    natural_lr: float = Field(
        default=0.01,
        gt=0.0,
        description="natural pictures: peak learning rate (their augmented, short runs "
        "want more than digits' train.lr)",
    )
    hflip: bool = Field(default=True, description="natural images: random horizontal flip")
    crop_scale: float = Field(
        default=0.5, gt=0.0, le=1.0, description="natural images: least area of a random crop"
    )
    color_jitter: float = Field(
        default=0.3, ge=0.0, lt=1.0, description="natural images: brightness/contrast/saturation"
    )
    pretrained: bool | str = Field(
        default=False,
        description="timm models: false, true (timm's loader and cache) or a checkpoint path",
    )
    backbone_lr_scale: float = Field(
        default=0.1, gt=0.0, le=1.0, description="pretrained timm models: backbone lr = lr * this"
    )
    num_threads: int = Field(
        default=0, ge=0, description="per process; 0 = cores (divided among DDP processes)"
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        default="cpu", description="auto = cuda when a GPU is present"
    )
    amp: bool = Field(default=False, description="mixed precision (bf16/fp16 autocast) on CUDA")
    compile: bool = Field(default=False, description="torch.compile the model on CUDA")
    nproc: int = Field(
        default=1, ge=1, description="processes on this machine; >1 = DDP through torchrun"
    )


#: Train params a tuning search space may set (besides ``model``, the architecture).
UNTUNABLE_TRAIN_PARAMS = frozenset(
    {"models", "num_threads", "device", "nproc", "compile", "pretrained"}
)


class RangeDim(StrictModel):
    """A numeric range; integer or float as the train param it sets."""

    low: float
    high: float
    log: bool = False
    step: float | None = Field(default=None, gt=0)

    @model_validator(mode="after")
    def _ordered(self) -> RangeDim:
        if self.low > self.high:
            raise ValueError(f"low ({self.low}) is above high ({self.high})")
        if self.log and self.low <= 0:
            raise ValueError("a log range needs low > 0")
        if self.log and self.step is not None:
            raise ValueError("a range is either log or stepped, not both")
        return self


class ChoiceDim(StrictModel):
    """A list of values to choose from."""

    choices: list[bool | int | float | str] = Field(min_length=1)


def _default_space() -> dict[str, RangeDim | ChoiceDim]:
    return {
        "model": ChoiceDim(choices=["cnn", "mlp"]),
        "lr": RangeDim(low=0.0005, high=0.02, log=True),
        "batch_size": ChoiceDim(choices=[64, 128, 256]),
        "width": ChoiceDim(choices=[16, 32, 48]),
        "dropout": RangeDim(low=0.0, high=0.4),
        "weight_decay": RangeDim(low=1e-5, high=1e-3, log=True),
    }


class TuneParams(StrictModel):
    """Hyperparameter search (`visionops tune`): what to vary, how to search and prune."""

    metric: Literal["val_accuracy", "val_loss"] = Field(
        default="val_accuracy", description="val_accuracy is maximised, val_loss minimised"
    )
    sampler: Literal["tpe", "random"] = "tpe"
    random_trials: int = Field(
        default=4, ge=0, description="tpe: random trials before the model-based search"
    )
    pruner: Literal["median", "hyperband", "none"] = "median"
    prune_after_trials: int = Field(
        default=2, ge=0, description="median: finished trials needed before pruning"
    )
    prune_after_epochs: int = Field(
        default=1, ge=1, description="epochs every trial runs before it can be pruned"
    )
    enqueue_defaults: bool = Field(
        default=True, description="the first trial uses the train params: a baseline"
    )
    space: dict[str, RangeDim | ChoiceDim] = Field(default_factory=_default_space, min_length=1)

    @model_validator(mode="after")
    def _known_keys(self) -> TuneParams:
        from visionops.models.names import is_model_name

        for key, dim in self.space.items():
            if key == "model":
                if not isinstance(dim, ChoiceDim):
                    raise ValueError("space.model must be a list of choices")
                unknown = [c for c in dim.choices if not is_model_name(str(c))]
                if unknown:
                    raise ValueError(f"space.model: unknown model(s) {unknown}")
                continue
            if key not in TrainParams.model_fields or key in UNTUNABLE_TRAIN_PARAMS:
                tunable = sorted(set(TrainParams.model_fields) - UNTUNABLE_TRAIN_PARAMS)
                raise ValueError(f"space.{key}: not a tunable train param; choose from {tunable}")
            kind = tunable_kind(key)
            if isinstance(dim, RangeDim):
                if kind == "other":
                    raise ValueError(f"space.{key}: not numeric, give a list of choices")
                values: list[Any] = [dim.low, dim.high]
                if kind == "int":
                    if any(v != int(v) for v in (dim.low, dim.high, dim.step or 1)):
                        raise ValueError(f"space.{key}: an integer param needs integer bounds")
                    values = [int(v) for v in values]
            else:
                values = list(dim.choices)
            for value in values:  # every value must be a valid train.<key>
                try:
                    TrainParams.model_validate({key: value})
                except ValidationError as err:
                    raise ValueError(
                        f"space.{key}: {value!r} is not a valid train.{key} "
                        f"({err.errors()[0]['msg']})"
                    ) from None
        return self


def tunable_kind(key: str) -> Literal["int", "float", "other"]:
    """How a search dimension for ``train.<key>`` is sampled: int, float, or choices only."""
    annotation = TrainParams.model_fields[key].annotation
    if annotation is int:
        return "int"
    if annotation is float:
        return "float"
    return "other"


class EvaluateParams(StrictModel):
    batch_size: int = Field(default=1000, ge=1)
    gallery_size: int = Field(default=36, ge=1)
    calibration_bins: int = Field(default=15, ge=2)


class RegistryParams(StrictModel):
    model_name: str | None = Field(
        default=None, description="registered model name; default visionops-<dataset>"
    )
    experiment: str = "visionops"


class GateParams(StrictModel):
    accuracy_tolerance: float = Field(default=0.001, ge=0.0)
    mcnemar_alpha: float = Field(default=0.05, gt=0.0, lt=1.0)
    latency_budget_ms: float = Field(default=10.0, gt=0.0, description="p95 at batch 1")
    parity_atol: float = Field(default=1e-4, gt=0.0)
    max_ece: float = Field(
        default=0.02,
        gt=0.0,
        le=1.0,
        description="largest test ECE a challenger may have (monitoring's CBPE needs it)",
    )


class ExportParams(StrictModel):
    temperature_scaling: bool = Field(
        default=True,
        description="fit a softmax temperature on the validation split (in the ONNX graph)",
    )


class OodParams(StrictModel):
    """Out-of-distribution rejection (:mod:`visionops.ood`): calibrated by the export stage."""

    false_rejection_rate: float = Field(
        default=0.005, gt=0.0, lt=0.5, description="share of validation images the OOD test rejects"
    )
    k: int = Field(default=1, ge=1, description="k-th nearest neighbour in the embedding bank")
    bank_size: int = Field(
        default=5000, ge=10, description="training-split embeddings kept beside the model"
    )
    min_ink_pixels: int = Field(
        default=8, ge=0, description="fewer pixels at half ink or more: no_ink (0 = off)"
    )
    dims: int = Field(
        default=160,
        ge=0,
        description="principal directions of the bank the distance is taken in (0 = all)",
    )

    @model_validator(mode="after")
    def _k_within_bank(self) -> OodParams:
        if self.k > self.bank_size:
            raise ValueError(f"k ({self.k}) must not exceed bank_size ({self.bank_size})")
        return self


class ServeParams(StrictModel):
    confidence_threshold: float = Field(default=0.7, ge=0.0, le=1.0)
    max_batch_size: int = Field(default=32, ge=1)
    max_wait_ms: float = Field(default=0.0, ge=0.0)
    max_body_bytes: int = Field(default=5 * 1024 * 1024, ge=1024)
    max_files: int = Field(default=64, ge=1)
    max_pixels: int = Field(default=16_000_000, ge=64)


class Params(StrictModel):
    seed: int = 42
    data: DataParams = DataParams()
    preprocess: PreprocessParams = PreprocessParams()
    train: TrainParams = TrainParams()
    evaluate: EvaluateParams = EvaluateParams()
    registry: RegistryParams = RegistryParams()
    export: ExportParams = ExportParams()
    gate: GateParams = GateParams()
    ood: OodParams = OodParams()
    serve: ServeParams = ServeParams()
    tune: TuneParams = TuneParams()

    @model_validator(mode="after")
    def _known_models(self) -> Params:
        # Local import: the zoo's names are plain data, no torch needed for this check.
        from visionops.models.names import MODEL_NAMES, is_model_name

        unknown = [m for m in self.train.models if not is_model_name(m)]
        if unknown:
            raise ValueError(
                f"unknown model(s) {unknown}; choose from {sorted(MODEL_NAMES)} or a timm "
                "model name (e.g. resnet18; needs the [train] install)"
            )
        return self

    def model_name(self) -> str:
        """Registered model name: explicit, else derived from the data source."""
        if self.registry.model_name:
            return self.registry.model_name
        if self.data.source == "imagefolder":
            stem = Path(self.data.path).resolve().name or "images"
            safe = "".join(c if c.isalnum() or c in "-_" else "-" for c in stem.lower())
            return f"visionops-{safe}"
        return f"visionops-{self.data.source}"


def _format_validation_error(err: ValidationError, source: str) -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "<root>"
        if e["type"] == "extra_forbidden":
            lines.append(f"unknown key '{key}'")
        else:
            got = "" if key == "<root>" else f" (got {e.get('input')!r})"
            lines.append(f"'{key}': {e['msg']}{got}")
    return f"invalid params in {source}: " + "; ".join(lines)


def parse_override(item: str) -> tuple[list[str], Any]:
    """Parse one ``--set key.path=value`` override; the value is read as YAML."""
    if "=" not in item:
        raise ConfigError(f"override '{item}' must look like key=value (e.g. train.epochs=1)")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override '{item}' has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"override '{item}': value is not valid YAML ({exc})") from exc
    return key.split("."), value


def apply_overrides(raw: dict[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """Return a copy of ``raw`` with dotted ``key=value`` overrides applied."""
    import copy

    out = copy.deepcopy(raw)
    for item in overrides:
        path, value = parse_override(item)
        node = out
        for part in path[:-1]:
            nxt = node.get(part)
            if nxt is None:
                nxt = {}
                node[part] = nxt
            if not isinstance(nxt, dict):
                raise ConfigError(f"override '{item}': '{part}' is not a section")
            node = nxt
        node[path[-1]] = value
    return out


def params_from_dict(raw: dict[str, Any], source: str = "params") -> Params:
    try:
        return Params.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err, source)) from None


def load_params(path: str | Path = "params.yaml", overrides: Iterable[str] = ()) -> Params:
    """Load and validate params; a missing file means defaults (plus overrides)."""
    p = Path(path)
    raw: dict[str, Any] = {}
    if p.exists():
        try:
            loaded = yaml.safe_load(p.read_text())
        except yaml.YAMLError as exc:
            raise ConfigError(f"{p}: not valid YAML ({exc})") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{p}: top level must be a mapping of sections")
        raw = loaded or {}
    elif str(path) != "params.yaml":
        raise ConfigError(f"params file not found: {p}")
    return params_from_dict(apply_overrides(raw, overrides), source=str(p))


def params_to_yaml(params: Params) -> str:
    return yaml.safe_dump(params.model_dump(mode="json"), sort_keys=False)


#: URL schemes that name PostgreSQL without a driver (SQLAlchemy then picks psycopg2).
_BARE_POSTGRES = ("postgresql://", "postgres://", "postgresql+psycopg2://")


def database_url(url: str) -> str:
    """``url`` with PostgreSQL pointed at psycopg 3, the driver visionops installs.

    SQLAlchemy (and so MLflow and Optuna) reads ``postgresql://`` as
    ``postgresql+psycopg2://``, and psycopg2 is not a dependency; ``postgresql://``,
    ``postgres://`` and ``postgresql+psycopg2://`` become ``postgresql+psycopg://``.
    Every other URL (SQLite, ``http://`` tracking servers, explicit drivers) is
    returned unchanged.
    """
    for prefix in _BARE_POSTGRES:
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url.removeprefix(prefix)
    return url


@dataclass(frozen=True)
class Settings:
    """Where things live; read from the environment by :func:`load_settings`."""

    tracking_uri: str
    artifact_root: str
    admin_token: str | None
    predlog_url: str
    webhook_url: str | None
    tune_storage: str | None = None


def load_settings(root: Path | None = None) -> Settings:
    """Settings from the environment; database URLs go through :func:`database_url`."""
    base = (root or Path.cwd()).resolve()
    tune_storage = os.environ.get("VISIONOPS_TUNE_STORAGE") or None
    return Settings(
        tracking_uri=database_url(
            os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{base / 'mlflow.db'}"
        ),
        artifact_root=os.environ.get("VISIONOPS_ARTIFACT_ROOT") or (base / "mlartifacts").as_uri(),
        admin_token=os.environ.get("VISIONOPS_ADMIN_TOKEN") or None,
        predlog_url=database_url(
            os.environ.get("VISIONOPS_PREDLOG_URL") or f"sqlite:///{base / 'predictions.db'}"
        ),
        webhook_url=os.environ.get("VISIONOPS_ALERT_WEBHOOK") or None,
        tune_storage=database_url(tune_storage) if tune_storage else None,
    )
