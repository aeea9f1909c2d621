"""Which params each command reads: the one declaration behind dvc.yaml and ``--set``.

A DVC stage re-runs when a param it *declares* changes; a param it reads but does not
declare is silently stale. So the declaration lives here, once, and is enforced:

- every pipeline stage's code gets a :func:`declared_view` of the params, on which
  reading an undeclared param raises :class:`UndeclaredParamError`;
- ``tests/unit/test_stages.py`` checks that each stage's ``params:`` in ``dvc.yaml``
  equals :data:`STAGE_PARAMS` and that every declared param is read by a real run;
- ``--set key=value`` on a command that does not read ``key`` is refused with the
  commands that do (:func:`check_overrides`), instead of being ignored.

An entry names a params section (``"train"``: every key in it) or one key
(``"data.limit"``).
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, cast

from pydantic import BaseModel

from visionops.config import Params, parse_override
from visionops.errors import ConfigError

# What ingest reads to load the source; validate reads the source again when these (or
# an image folder) changed since ingest.
_SOURCE_PARAMS = (
    "seed",
    "data.source",
    "data.path",
    "data.image_size",
    "data.channels",
    "data.natural_size",
    "data.test_fraction",
)

#: The params each DVC stage reads (``dvc.yaml`` declares exactly these).
STAGE_PARAMS: Mapping[str, tuple[str, ...]] = {
    "ingest": (*_SOURCE_PARAMS, "data.extra_path", "preprocess", "serve.max_pixels"),
    "validate": (
        *_SOURCE_PARAMS,
        "data.max_class_imbalance",
        "preprocess",
        "serve.max_pixels",
    ),
    "prepare": ("seed", "data.limit", "data.test_limit", "data.val_fraction"),
    "train": ("seed", "train", "evaluate.batch_size"),
    "evaluate": ("evaluate",),
    "compare": ("train.models",),
    "export": (
        "seed",
        "gate.parity_atol",
        "registry.model_name",
        "data.source",
        "data.path",
        "export",
        "evaluate.calibration_bins",
        "ood",
    ),
    "register": ("registry", "data.source", "data.path"),
    "gate": ("gate", "evaluate.calibration_bins"),
    "report": ("data.source",),
}

#: The params of the commands that are not pipeline stages.
OTHER_COMMAND_PARAMS: Mapping[str, tuple[str, ...]] = {
    "download": ("data.source", "data.path"),
    "tune": (
        "seed",
        "train",
        "evaluate.batch_size",
        "tune",
        "registry",
        "data.source",
        "data.path",
    ),
    "promote": ("gate", "evaluate.calibration_bins", "registry", "data.source", "data.path"),
    "rollback": ("registry", "data.source", "data.path"),
    "serve": ("serve", "registry", "data.source", "data.path"),
}

COMMAND_PARAMS: Mapping[str, tuple[str, ...]] = {**STAGE_PARAMS, **OTHER_COMMAND_PARAMS}


class UndeclaredParamError(RuntimeError):
    """A command's code read a param that :data:`COMMAND_PARAMS` does not declare for it.

    A programming error, not bad input: declare the param for the command (and in the
    stage's ``params:`` in ``dvc.yaml``), or stop reading it.
    """

    def __init__(self, command: str, key: str) -> None:
        super().__init__(
            f"`visionops {command}` read param '{key}', which it does not declare: add it "
            f"to visionops.stages.STAGE_PARAMS['{command}'] and to the '{command}' stage's "
            "params in dvc.yaml (or stop reading it)"
        )
        self.command, self.key = command, key


def _covers(declared: Iterable[str], key: str) -> bool:
    """True when ``key`` is declared itself or lies in a declared section."""
    return any(key == d or key.startswith(d + ".") for d in declared)


def readers_of(key: str) -> list[str]:
    """The commands that read ``key`` (or a key under it, for a section)."""
    return [
        command
        for command, declared in COMMAND_PARAMS.items()
        if _covers(declared, key) or any(d.startswith(key + ".") for d in declared)
    ]


def check_overrides(command: str, overrides: Iterable[str]) -> None:
    """Refuse ``--set`` keys that ``command`` does not read, naming the commands that do.

    Raises:
        ConfigError: for the first override ``command`` would ignore.
    """
    declared = COMMAND_PARAMS[command]
    for item in overrides:
        path, _ = parse_override(item)
        key = ".".join(path)
        if _covers(declared, key) or any(d.startswith(key + ".") for d in declared):
            continue
        readers = readers_of(key)
        where = (
            "no command reads it"
            if not readers
            else "it is read by " + ", ".join(f"`visionops {r}`" for r in readers)
        )
        hint = ""
        if readers:
            hint = (
                f" (e.g. `visionops {readers[0]} --set {item}` first)"
                if readers[0] in STAGE_PARAMS
                else ""
            )
            if any(r in STAGE_PARAMS for r in readers):
                hint += f"; `dvc exp run -S {item}` runs the pipeline with it"
        raise ConfigError(f"--set {item}: `visionops {command}` does not read {key}, {where}{hint}")


class _View:
    """Read-only view of a params model that lets through only declared keys."""

    __slots__ = ("_command", "_declared", "_model", "_prefix", "_reads")

    def __init__(
        self,
        model: BaseModel,
        prefix: str,
        command: str,
        declared: tuple[str, ...],
        reads: set[str] | None,
    ) -> None:
        object.__setattr__(self, "_model", model)
        object.__setattr__(self, "_prefix", prefix)
        object.__setattr__(self, "_command", command)
        object.__setattr__(self, "_declared", declared)
        object.__setattr__(self, "_reads", reads)

    def __getattr__(self, name: str) -> Any:
        model: BaseModel = object.__getattribute__(self, "_model")
        prefix: str = object.__getattribute__(self, "_prefix")
        command: str = object.__getattribute__(self, "_command")
        declared: tuple[str, ...] = object.__getattribute__(self, "_declared")
        reads: set[str] | None = object.__getattribute__(self, "_reads")
        key = f"{prefix}.{name}" if prefix else name
        if name in type(model).model_fields:
            value = getattr(model, name)
            if _covers(declared, key):
                if reads is not None:
                    reads.add(key)
                return value
            if isinstance(value, BaseModel) and any(d.startswith(key + ".") for d in declared):
                return _View(value, key, command, declared, reads)
            raise UndeclaredParamError(command, key)
        attr = getattr(type(model), name, None)
        if callable(attr) and not hasattr(BaseModel, name) and not name.startswith("_"):
            # The model's own methods (Params.model_name, DataParams.shape) run against
            # the view, so the params they read are checked too.
            return functools.partial(attr, self)
        # model_dump and friends would read every param at once.
        raise UndeclaredParamError(command, f"{key} (all of {prefix or 'params'})")

    def __setattr__(self, name: str, value: Any) -> None:
        raise TypeError("params are read-only")

    def __repr__(self) -> str:
        command = object.__getattribute__(self, "_command")
        return f"<params declared for `visionops {command}`>"


def declared_view(params: Params, command: str, reads: set[str] | None = None) -> Params:
    """``params`` as ``command`` may read them: an undeclared read raises.

    Args:
        params: the loaded params.
        command: a key of :data:`COMMAND_PARAMS` (``train`` for ``train <model>``).
        reads: when given, every declared key read is added to it (tests use this to
            find declared params a command never reads).

    Returns:
        An object with the attributes of :class:`~visionops.config.Params` (typed as
        one); reading a key outside ``COMMAND_PARAMS[command]`` raises
        :class:`UndeclaredParamError`.
    """
    return cast(Params, _View(params, "", command, COMMAND_PARAMS[command], reads))


def all_params(params: Params) -> Params:
    """The full params behind a :func:`declared_view` (``params`` itself otherwise).

    For logging every param on a tracking run, which is a record of the run, not a read
    that shapes a stage's outputs.
    """
    if isinstance(params, _View):
        return cast(Params, object.__getattribute__(params, "_model"))
    return params


# --------------------------------------------------------------------------- outputs

#: What each DVC stage writes (``dvc.yaml``'s outs, metrics and plots; ``{item}`` is the
#: model of a ``foreach`` stage, named ``train@cnn`` by DVC).
STAGE_OUTPUTS: Mapping[str, tuple[str, ...]] = {
    "ingest": ("data/interim",),
    "validate": ("reports/validation.json",),
    "prepare": ("data/prepared",),
    "train": ("models/{item}", "metrics/train/{item}.json", "plots/train/{item}.json"),
    "evaluate": (
        "reports/eval/{item}",
        "metrics/eval/{item}.json",
        "plots/confusion/{item}.csv",
        "plots/per_class/{item}.json",
    ),
    "compare": ("reports/models.md", "reports/models.png", "reports/comparison.json"),
    "export": ("exported",),
    "register": ("reports/registration.json",),
    "gate": ("reports/gate.json", "metrics/gate.json"),
    "report": ("reports/summary.md",),
}


def producing_stage(path: str | Path) -> str | None:
    """The DVC stage that writes ``path`` (``prepare``, ``train@cnn``), or None.

    ``path`` may be absolute or relative; it matches when it is a stage output or lies
    inside one (``data/prepared/meta.json`` is prepare's).
    """
    parts = Path(path).parts
    for stage, outputs in STAGE_OUTPUTS.items():
        for output in outputs:
            pattern = output.split("/")
            n = len(pattern)
            for start in range(len(parts) - n, -1, -1):
                window = parts[start : start + n]
                item = _match(pattern, window)
                if item is not None:
                    return f"{stage}@{item}" if item else stage
    return None


def _match(pattern: list[str], parts: tuple[str, ...]) -> str | None:
    """``""`` on a match without ``{item}``, the item on a match with one, else None."""
    item = ""
    for want, got in zip(pattern, parts, strict=True):
        if "{item}" in want:
            before, after = want.split("{item}")
            if not (got.startswith(before) and got.endswith(after)) or len(got) <= len(
                before + after
            ):
                return None
            item = got[len(before) : len(got) - len(after)]
        elif want != got:
            return None
    return item


def missing_input(path: str | Path, fallback: str | None = None) -> str:
    """The message for a missing pipeline output: the one command that makes it.

    ``dvc repro <stage>`` runs the stage and every stage before it that is out of date,
    so on a fresh clone it is the whole answer. ``fallback`` is the command to name for
    a path no stage writes.
    """
    stage = producing_stage(path)
    if stage is not None:
        return f"{path} not found: run `dvc repro {stage}` (it runs the stages before it too)"
    how = f"`{fallback}`" if fallback else "the pipeline (`dvc repro`)"
    return f"{path} not found: run {how} first"
