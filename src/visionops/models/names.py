"""Names of the model zoo's architectures (plain data: importable without torch)."""

from __future__ import annotations

import importlib.util

MODEL_NAMES: frozenset[str] = frozenset({"mlp", "cnn", "resnet"})


def is_model_name(name: str) -> bool:
    """True for a zoo name or, where timm is installed, any of timm's model names.

    timm (and so torch) is imported only for a name that is not the zoo's, and only when
    it is installed; the serving install has no timm and accepts only the zoo's names.
    """
    if name in MODEL_NAMES:
        return True
    if importlib.util.find_spec("timm") is None:
        return False
    import timm

    return bool(timm.is_model(name))
