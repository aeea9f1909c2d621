"""Model zoo: small image classifiers built by name.

Every model is a :class:`ZooModel`: ``forward_features(x)`` returns the penultimate
embedding (used by monitoring and exported as the ONNX ``embedding`` output) and
``head`` maps it to logits, so ``forward(x) == head(forward_features(x))``. Inputs are
normalised float32 ``(N, C, H, W)`` tensors (``visionops.data.transforms.normalize``).

- ``mlp``: two hidden layers; a fast baseline.
- ``cnn``: the default. A 5x5 stem, two 3x3 convolutions and a dense layer, BatchNorm
  throughout, no padding: valid convolutions and two poolings shrink 28x28 to 4x4 cheaply,
  which is what lets it train to >99.3 % MNIST accuracy in a few CPU minutes.
- ``resnet``: a stem and three downsampling basic blocks with global average pooling.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from visionops.errors import ModelError
from visionops.models.names import MODEL_NAMES
from visionops.stages import missing_input

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.pt"
# Keys of a trained model's config.json that build_model needs.
BUILD_KEYS = ("architecture", "in_channels", "image_size", "num_classes", "width", "dropout")


class ZooModel(nn.Module):
    """Base class: ``forward(x) = head(forward_features(x))``."""

    features: nn.Module
    head: nn.Module
    #: Whether training on CPU should use the channels_last memory format (faster convs).
    prefers_channels_last: bool = False

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The penultimate embedding ``(N, D)``."""
        out: torch.Tensor = self.features(x)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.head(self.forward_features(x))
        return out

    @property
    def embedding_dim(self) -> int:
        last = self.head[-1] if isinstance(self.head, nn.Sequential) else self.head
        if not isinstance(last, nn.Linear):  # pragma: no cover - every zoo head ends in Linear
            raise ModelError(f"{type(self).__name__}: head does not end in a Linear layer")
        return int(last.in_features)


def _classifier_head(dim: int, num_classes: int, dropout: float) -> nn.Sequential:
    # Dropout lives in the head so that the embedding is deterministic in train mode too.
    return nn.Sequential(nn.Dropout(dropout), nn.Linear(dim, num_classes))


def _conv_bn_relu(c_in: int, c_out: int, kernel: int, stride: int = 1, padding: int = 0) -> list:
    return [
        nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=padding, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    ]


class MLP(ZooModel):
    """Flatten -> 16w -> 8w (BatchNorm, ReLU, dropout) -> classes."""

    def __init__(
        self, in_channels: int, image_size: int, num_classes: int, width: int, dropout: float
    ) -> None:
        super().__init__()
        hidden, embed = 16 * width, 8 * width
        self.features = nn.Sequential(
            nn.Flatten(),
            nn.Linear(in_channels * image_size * image_size, hidden, bias=False),
            nn.BatchNorm1d(hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(hidden, embed, bias=False),
            nn.BatchNorm1d(embed),
            nn.ReLU(inplace=True),
        )
        self.head = _classifier_head(embed, num_classes, dropout)


class CNN(ZooModel):
    """conv5(w) - pool - conv3(2w) - conv3(2w) - pool - dense(8w) -> classes.

    Valid (unpadded) convolutions: at 28x28 the maps are 24 -> 12 -> 10 -> 8 -> 4, so the
    dense layer sees 2w*4*4 values (about 320k parameters at w=32).
    """

    prefers_channels_last = True
    MIN_SIZE = 16

    def __init__(
        self, in_channels: int, image_size: int, num_classes: int, width: int, dropout: float
    ) -> None:
        super().__init__()
        if image_size < self.MIN_SIZE:
            raise ModelError(f"cnn needs image_size >= {self.MIN_SIZE}, got {image_size}")
        side = (((image_size - 4) // 2) - 4) // 2
        embed = 8 * width
        self.features = nn.Sequential(
            *_conv_bn_relu(in_channels, width, 5),
            nn.MaxPool2d(2),
            *_conv_bn_relu(width, 2 * width, 3),
            *_conv_bn_relu(2 * width, 2 * width, 3),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(2 * width * side * side, embed, bias=False),
            nn.BatchNorm1d(embed),
            nn.ReLU(inplace=True),
        )
        self.head = _classifier_head(embed, num_classes, dropout)


class BasicBlock(nn.Module):
    """The ResNet basic block: two 3x3 convolutions plus a (projected) shortcut."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class ResNet(ZooModel):
    """Stem conv3(w) then basic blocks w, 2w, 4w, each halving the map; global average pool."""

    prefers_channels_last = True
    MIN_SIZE = 8

    def __init__(
        self, in_channels: int, image_size: int, num_classes: int, width: int, dropout: float
    ) -> None:
        super().__init__()
        if image_size < self.MIN_SIZE:
            raise ModelError(f"resnet needs image_size >= {self.MIN_SIZE}, got {image_size}")
        self.features = nn.Sequential(
            *_conv_bn_relu(in_channels, width, 3, padding=1),
            BasicBlock(width, width, stride=2),
            BasicBlock(width, 2 * width, stride=2),
            BasicBlock(2 * width, 4 * width, stride=2),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.head = _classifier_head(4 * width, num_classes, dropout)


_BUILDERS: dict[str, Callable[[int, int, int, int, float], ZooModel]] = {
    "mlp": MLP,
    "cnn": CNN,
    "resnet": ResNet,
}
if set(_BUILDERS) != set(MODEL_NAMES):  # pragma: no cover - guards names.py drifting
    raise RuntimeError(f"zoo {sorted(_BUILDERS)} and names.py {sorted(MODEL_NAMES)} disagree")


def build_model(
    name: str,
    in_channels: int,
    image_size: int,
    num_classes: int,
    width: int = 32,
    dropout: float = 0.1,
    pretrained: bool | str = False,
) -> Any:
    """Build an architecture of the zoo by name (see the module docstring), or any timm
    model name as a :class:`~visionops.models.timm_backbone.TimmModel` (``pretrained``
    applies to those only). Returns a :class:`ZooModel` or a ``TimmModel``: both follow
    ``forward(x) == head(forward_features(x))``. Raises :class:`ModelError`."""
    builder = _BUILDERS.get(name)
    if builder is None:
        from visionops.models.names import is_model_name

        if not is_model_name(name):
            raise ModelError(
                f"unknown model '{name}'; choose from {', '.join(sorted(_BUILDERS))} "
                "or a timm model name"
            )
        if in_channels < 1 or num_classes < 2 or not 0.0 <= dropout < 1.0:
            raise ModelError(
                f"cannot build '{name}' with in_channels={in_channels}, "
                f"num_classes={num_classes}, dropout={dropout}"
            )
        from visionops.models.timm_backbone import TimmModel

        return TimmModel(name, in_channels, num_classes, dropout, pretrained)
    if in_channels < 1 or num_classes < 2 or width < 1 or not 0.0 <= dropout < 1.0:
        raise ModelError(
            f"cannot build '{name}' with in_channels={in_channels}, num_classes={num_classes}, "
            f"width={width}, dropout={dropout}"
        )
    return builder(in_channels, image_size, num_classes, width, dropout)


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def read_model_config(model_dir: Path) -> dict[str, Any]:
    """Read and check ``config.json`` of a trained model folder."""
    path = Path(model_dir) / CONFIG_FILE
    if not path.is_file():
        raise ModelError(f"no trained model in {model_dir}: {missing_input(path)}")
    try:
        config = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelError(f"{path}: not a readable JSON model config ({exc})") from None
    if not isinstance(config, dict):
        raise ModelError(f"{path}: expected a JSON object")
    missing = [k for k in BUILD_KEYS if k not in config]
    if missing:
        raise ModelError(f"{path}: missing key(s) {missing}")
    return config


def load_trained(model_dir: str | Path) -> tuple[ZooModel, dict[str, Any]]:
    """Load ``model_dir/{config.json,model.pt}`` into a model in eval mode (CPU).

    Returns ``(model, config)``. The weights are read with ``weights_only=True``.
    """
    model_dir = Path(model_dir)
    config = read_model_config(model_dir)
    weights = model_dir / WEIGHTS_FILE
    if not weights.is_file():
        raise ModelError(f"no trained model in {model_dir}: {weights} is missing")
    model = build_model(*(config[k] for k in BUILD_KEYS))
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
        model.load_state_dict(state)
    except Exception as exc:  # unpickling and shape errors come in many types
        raise ModelError(
            f"{weights}: cannot load weights for '{config['architecture']}' ({exc})"
        ) from None
    model.eval()
    return model, config
