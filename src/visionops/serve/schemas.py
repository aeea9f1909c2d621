"""The HTTP contract of the prediction service, as pydantic models (they feed OpenAPI)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class _Schema(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PredictRequest(_Schema):
    """JSON body of ``POST /v1/predict`` (the alternative to multipart ``files``)."""

    instances: list[list[list[float]]] = Field(
        min_length=1,
        description=(
            "One or more images as H×W arrays of numbers in [0, 1] where 1 is ink "
            "(foreground) and 0 is background; the model's native size is used as is, "
            "other sizes are centred and resized like image files."
        ),
        examples=[[[[0.0, 1.0], [1.0, 0.0]]]],
    )


class ModelRef(_Schema):
    """Which model answered."""

    name: str
    version: str | None = Field(description="registry version; null for a plain folder")
    alias: str | None = Field(description="registry alias the URI named, e.g. champion")


class Prediction(_Schema):
    label: str = Field(description="the most probable class name")
    class_index: int = Field(ge=0)
    confidence: float = Field(ge=0.0, le=1.0, description="probability of `label`")
    probabilities: dict[str, float] = Field(description="probability of every class, by name")
    accepted: bool = Field(
        description="false when the answer should not be trusted; `reason` says why"
    )
    reason: Literal["no_ink", "out_of_distribution", "low_confidence"] | None = Field(
        default=None,
        description=(
            "why the prediction is not accepted, null when it is: `no_ink` (no stroke in "
            "the preprocessed image; decided before the model), `out_of_distribution` "
            "(the embedding is further from the training images than the threshold "
            "calibrated at export), `low_confidence` (confidence below "
            "serve.confidence_threshold)"
        ),
    )
    ood_score: float | None = Field(
        default=None,
        description=(
            "distance of the embedding to its k-th nearest training embedding (higher is "
            "less like the training data); null when the model has no OOD calibration"
        ),
    )
    input_png: str | None = Field(
        default=None,
        description=(
            "what the model saw: the preprocessed model-size input as a "
            "`data:image/png;base64,...` URL (grey or RGB, uint8); present only with "
            "`?return_input=true`"
        ),
    )


class PredictResponse(_Schema):
    model: ModelRef
    predictions: list[Prediction] = Field(description="one per input, in input order")


class InputSize(_Schema):
    channels: int
    height: int
    width: int


class ModelInfo(_Schema):
    name: str
    version: str | None
    alias: str | None
    architecture: str | None = None
    classes: list[str]
    input_size: InputSize
    preprocess: dict[str, Any]
    metrics: dict[str, Any] = Field(default_factory=dict)
    created: str | None = None
    git_sha: str | None = None
    digest: str = Field(description="sha256 prefix of model.onnx: tells two folders apart")
    confidence_threshold: float
    ood: dict[str, Any] | None = Field(
        default=None,
        description=(
            "the out-of-distribution test calibrated at export (method, k, threshold, "
            "false_rejection_rate, min_ink_pixels, calibration); null when the model has none"
        ),
    )


class ErrorDetail(_Schema):
    code: str = Field(description="stable machine-readable code, e.g. invalid_image")
    message: str = Field(description="what was wrong, for a person")


class ErrorResponse(_Schema):
    error: ErrorDetail


class HealthResponse(_Schema):
    status: str = Field(examples=["ok"])


class ReadyResponse(_Schema):
    status: str = Field(examples=["ready"])
    model: ModelRef | None = None


class ReloadResponse(_Schema):
    previous: ModelRef | None
    current: ModelRef
    changed: bool = Field(description="whether the served model is a different version/folder")
    workers: int | None = Field(
        default=None,
        description="worker processes serving the new model when the answer was sent "
        "(with `visionops serve --workers N`; null for a single process)",
    )


def error_body(code: str, message: str) -> dict[str, Any]:
    """The JSON error body every non-2xx answer carries."""
    return ErrorResponse(error=ErrorDetail(code=code, message=message)).model_dump()
