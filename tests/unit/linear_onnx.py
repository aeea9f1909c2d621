"""A tiny hand-written ONNX classifier in the exported-model format (no training).

A linear softmax over the flattened ``(N, 1, size, size)`` input: outputs
``probabilities`` and ``embedding`` (the flattened input), as export writes them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def save_linear_classifier(
    path: Path, weights: np.ndarray, bias: np.ndarray, size: int, name: str = "linear"
) -> None:
    classes = weights.shape[1]
    nodes = [
        helper.make_node("Flatten", ["input"], ["embedding"], axis=1),
        helper.make_node("MatMul", ["embedding", "W"], ["scores"]),
        helper.make_node("Add", ["scores", "b"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1),
    ]
    graph = helper.make_graph(
        nodes,
        name,
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 1, size, size])],
        [
            helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", classes]),
            helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["N", size * size]),
        ],
        initializer=[
            numpy_helper.from_array(weights.astype(np.float32), "W"),
            numpy_helper.from_array(bias.astype(np.float32), "b"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.save(model, path)
