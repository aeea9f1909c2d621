"""timm backbones as members of the zoo (``train.models: [resnet18]``, any timm name).

A :class:`TimmModel` wraps ``timm.create_model(name, num_classes=K, in_chans=C)`` in the
zoo contract: ``forward_features(x)`` is timm's pooled, pre-logits embedding
(``forward_head(forward_features(x), pre_logits=True)``, shape ``(N, num_features)``)
and ``head`` is timm's classifier, so ``forward(x) == head(forward_features(x))`` and the
ONNX export returns probabilities and embedding like every zoo model.

Weights (``train.pretrained``):

- ``false``: random initialisation.
- ``true``: timm's own loader (the Hugging Face hub cache, ``HF_HUB_CACHE``). Offline and
  not cached, this fails with one line saying how to give a file instead.
- a path: a local checkpoint, ``.safetensors`` or a torch file read with
  ``weights_only=True`` (a ``state_dict``, or a dict holding one under ``state_dict`` /
  ``model``). Loaded through timm (``pretrained_cfg_overlay={"file": path}``), which drops
  a classifier of another class count and adapts the first convolution to ``in_chans``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from visionops.errors import ModelError


def _create(name: str, pretrained: bool | str, **kwargs: Any) -> nn.Module:
    import timm

    if not timm.is_model(name):
        raise ModelError(f"'{name}' is neither a zoo model nor a timm model name")
    if pretrained is False:
        return timm.create_model(name, pretrained=False, **kwargs)
    if pretrained is True:
        try:
            return timm.create_model(name, pretrained=True, **kwargs)
        except Exception as exc:  # hub, network and cache errors come in many types
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ModelError(
                f"cannot load pretrained weights for '{name}' through timm ({first}); offline, "
                "set train.pretrained to a local .safetensors or torch weights file instead"
            ) from None
    path = Path(pretrained).expanduser()
    if not path.is_file():
        raise ModelError(f"train.pretrained: checkpoint file not found: {path}")
    try:
        return timm.create_model(
            name, pretrained=True, pretrained_cfg_overlay={"file": str(path)}, **kwargs
        )
    except Exception as exc:  # unpickling, safetensors and shape errors
        raise ModelError(f"train.pretrained: cannot load {path} into '{name}' ({exc})") from None


class TimmModel(nn.Module):
    """A timm model in the zoo contract (see the module docstring).

    Inputs: normalised float32 ``(N, C, H, W)``; outputs logits ``(N, num_classes)``.
    """

    prefers_channels_last = True

    def __init__(
        self,
        name: str,
        in_channels: int,
        num_classes: int,
        dropout: float,
        pretrained: bool | str = False,
    ) -> None:
        super().__init__()
        self.backbone = _create(
            name, pretrained, num_classes=num_classes, in_chans=in_channels, drop_rate=dropout
        )

    @property
    def head(self) -> nn.Module:
        """timm's classifier (``get_classifier()``): embedding to logits."""
        classifier: nn.Module = self.backbone.get_classifier()  # type: ignore[operator]
        return classifier

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The pooled pre-logits embedding ``(N, num_features)``."""
        b: Any = self.backbone
        out: torch.Tensor = b.forward_head(b.forward_features(x), pre_logits=True)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.head(self.forward_features(x))
        return out

    @property
    def embedding_dim(self) -> int:
        return int(self.backbone.num_features)  # type: ignore[arg-type]

    def parameter_groups(self, lr: float, backbone_scale: float) -> list[dict[str, Any]]:
        """Optimizer groups for fine-tuning: the classifier at ``lr``, the rest (the
        pretrained backbone) at ``lr * backbone_scale``."""
        head_ids = {id(p) for p in self.head.parameters()}
        head = [p for p in self.parameters() if id(p) in head_ids]
        body = [p for p in self.parameters() if id(p) not in head_ids]
        return [
            {"params": body, "lr": lr * backbone_scale},
            {"params": head, "lr": lr},
        ]
