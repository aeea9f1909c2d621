"""The model zoo: architectures built by name (``zoo.build_model``).

This package's ``__init__`` stays free of torch so that ``visionops.config`` can read
``names.MODEL_NAMES`` without paying for the torch import; import ``visionops.models.zoo``
where a model is actually built.
"""

from visionops.models.names import MODEL_NAMES

__all__ = ["MODEL_NAMES"]
