"""Names of the model zoo's architectures (plain data: importable without torch)."""

from __future__ import annotations

import importlib.util
import re

MODEL_NAMES: frozenset[str] = frozenset({"mlp", "cnn", "resnet"})

# What timm model names look like (resnet18, vit_tiny_patch16_224.augreg_in21k, ...).
_TIMM_LIKE = re.compile(r"[a-z][a-z0-9_]*(\.[a-z0-9_]+)?")


def is_model_name(name: str) -> bool:
    """True for a zoo name or, where timm is installed, any of timm's model names.

    timm (and so torch) is imported only for a name that is not the zoo's. Without timm
    (the torch-free serving install, which reads params.yaml but trains nothing) a name
    shaped like timm's is accepted: training, which needs timm, checks it for real.
    """
    if name in MODEL_NAMES:
        return True
    if importlib.util.find_spec("timm") is None:
        return _TIMM_LIKE.fullmatch(name) is not None
    import timm

    return bool(timm.is_model(name))
