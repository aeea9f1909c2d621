"""Names of the model zoo's architectures (plain data: importable without torch)."""

MODEL_NAMES: frozenset[str] = frozenset({"mlp", "cnn", "resnet"})
