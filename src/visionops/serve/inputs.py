"""Request bodies to model inputs: multipart uploads and JSON instances.

Everything a client can get wrong is reported as an :class:`ApiError` (status, code,
message naming the offending file or instance); the pixels go through the shared
preprocessing in :mod:`visionops.data.transforms`, exactly as at training time.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
from PIL import Image
from pydantic import ValidationError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.formparsers import MultiPartException

from visionops.config import ServeParams
from visionops.data.transforms import (
    PreprocessSpec,
    array_from_unit_floats,
    decode_image,
    image_to_array,
)
from visionops.errors import DataError
from visionops.serve.schemas import PredictRequest, error_body

FILES_FIELD = "files"
FILES_FIELD_BYTES = FILES_FIELD.encode()

# Magic numbers of image formats we recognise but do not accept, so the client gets
# 415 "unsupported format" rather than 400 "not an image". Only a prefix is compared.
_UNSUPPORTED_SIGNATURES: tuple[tuple[bytes, int, str], ...] = (
    (b"II*\x00", 0, "TIFF"),
    (b"MM\x00*", 0, "TIFF"),
    (b"\x00\x00\x01\x00", 0, "ICO"),
    (b"8BPS", 0, "PSD"),
    (b"%PDF", 0, "PDF"),
    (b"ftypheic", 4, "HEIC"),
    (b"ftypheix", 4, "HEIC"),
    (b"ftypmif1", 4, "HEIF"),
    (b"ftypavif", 4, "AVIF"),
    (b"\x00\x00\x00\x0cjP  ", 0, "JPEG 2000"),
    (b"\xff\x4f\xff\x51", 0, "JPEG 2000"),
    (b"\x00\x00\x00\x0cJXL ", 0, "JPEG XL"),
    (b"\xff\x0a", 0, "JPEG XL"),
    (b"<svg", 0, "SVG"),
    (b"<?xml", 0, "SVG/XML"),
)


class ApiError(Exception):
    """A client error with its HTTP status and stable code; rendered as ErrorResponse."""

    def __init__(
        self, status: int, code: str, message: str, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers


def client_error(exc: Exception) -> tuple[int, dict[str, Any], dict[str, str] | None]:
    """Status, JSON body and headers of the answer to a client's mistake: an
    :class:`ApiError` as it says; any other :class:`~visionops.errors.VisionOpsError`
    reaching an endpoint was caused by the input, a 400 ``bad_request`` naming it."""
    if isinstance(exc, ApiError):
        return exc.status, error_body(exc.code, exc.message), exc.headers
    return 400, error_body("bad_request", str(exc)), None


@dataclass(frozen=True)
class RawImage:
    """One uploaded file as received."""

    filename: str
    data: bytes


def unsupported_format(data: bytes) -> str | None:
    """Name of a recognised but unaccepted image format, else None."""
    head = data[:64].lstrip()  # SVG/XML may start with whitespace; binary magic never does
    for magic, offset, name in _UNSUPPORTED_SIGNATURES:
        if head[offset : offset + len(magic)] == magic:
            return name
    return None


def read_multipart(body: bytes, content_type: str, limits: ServeParams) -> list[RawImage]:
    """The files of field ``files`` of a whole multipart body, in order.

    Parsed in one pass with python-multipart's streaming parser, straight into memory
    (the body is already bounded by ``serve.max_body_bytes``); other fields are ignored.
    Raises :class:`ApiError`: 400 malformed, 413 more than ``serve.max_files`` files,
    422 no ``files`` field or a text value in it.
    """
    _, options = parse_options_header(content_type)
    boundary = options.get(b"boundary")
    if not boundary:
        raise ApiError(400, "invalid_multipart", "malformed multipart body: no boundary")
    parts: list[tuple[bytes, bytes | None, list[bytes]]] = []  # (name, filename, chunks)
    header: list[bytes] = [b"", b""]
    disposition: list[bytes | None] = [None]

    def on_part_begin() -> None:
        disposition[0] = None

    def on_header_field(data: bytes, start: int, end: int) -> None:
        header[0] += data[start:end]

    def on_header_value(data: bytes, start: int, end: int) -> None:
        header[1] += data[start:end]

    def on_header_end() -> None:
        if header[0].lower() == b"content-disposition":
            disposition[0] = header[1]
        header[0], header[1] = b"", b""

    def on_headers_finished() -> None:
        _, opts = parse_options_header(disposition[0])
        if disposition[0] is None or b"name" not in opts:
            raise MultiPartException("a part lacks a Content-Disposition name")
        parts.append((opts[b"name"], opts.get(b"filename"), []))
        if opts[b"name"] == FILES_FIELD_BYTES and (
            sum(1 for p in parts if p[0] == FILES_FIELD_BYTES) > limits.max_files
        ):
            raise ApiError(
                413,
                "too_many_files",
                f"more than {limits.max_files} files in one request (serve.max_files)",
            )

    def on_part_data(data: bytes, start: int, end: int) -> None:
        parts[-1][2].append(data[start:end])

    callbacks: Any = {
        "on_part_begin": on_part_begin,
        "on_header_field": on_header_field,
        "on_header_value": on_header_value,
        "on_header_end": on_header_end,
        "on_headers_finished": on_headers_finished,
        "on_part_data": on_part_data,
    }
    try:
        parser = MultipartParser(boundary, callbacks)
        parser.write(body)
        parser.finalize()
    except ApiError:
        raise
    except MultiPartException as exc:
        raise ApiError(
            400, "invalid_multipart", f"malformed multipart body: {exc.message}"
        ) from None
    except Exception as exc:  # python-multipart raises assorted errors on garbage bodies
        raise ApiError(400, "invalid_multipart", f"malformed multipart body ({exc})") from None
    if body and not parts:
        raise ApiError(400, "invalid_multipart", "malformed multipart body: no parts found")
    files = [p for p in parts if p[0] == FILES_FIELD_BYTES]
    if not files:
        raise ApiError(
            422,
            "missing_field",
            f"multipart body has no '{FILES_FIELD}' field; send images as "
            f"-F {FILES_FIELD}=@digit.png",
        )
    images = []
    for i, (_, filename, chunks) in enumerate(files):
        if filename is None:
            raise ApiError(
                422, "invalid_field", f"{FILES_FIELD}[{i}] is a text field, expected a file upload"
            )
        name = filename.decode("utf-8", "replace") or "unnamed"
        # Names are echoed in error messages: keep them short.
        images.append(RawImage(filename=name[:100], data=b"".join(chunks)))
    return images


def parse_instances(body: bytes, limits: ServeParams) -> list[np.ndarray]:
    """The JSON ``instances`` as uint8 ``(H, W, 1)`` arrays (ink high)."""
    if not body.strip():
        raise ApiError(400, "invalid_json", 'empty JSON body; expected {"instances": [...]}')
    try:
        req = PredictRequest.model_validate_json(body, strict=True)
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
        if errors and errors[0]["type"] == "json_invalid":
            raise ApiError(
                400, "invalid_json", f"body is not valid JSON ({errors[0]['msg']})"
            ) from None
        parts = []
        for e in errors[:3]:
            loc = ".".join(str(p) for p in e["loc"]) or "<body>"
            parts.append(f"{loc}: {e['msg']}")
        more = f" (+{len(errors) - 3} more)" if len(errors) > 3 else ""
        raise ApiError(
            422,
            "invalid_instances",
            'expected {"instances": [H×W arrays of numbers in [0, 1]]}; ' + "; ".join(parts) + more,
        ) from None
    if len(req.instances) > limits.max_files:
        raise ApiError(
            413,
            "too_many_files",
            f"{len(req.instances)} instances exceed the limit of {limits.max_files} "
            "(serve.max_files)",
        )
    arrays = []
    for i, inst in enumerate(req.instances):
        rows = {len(r) for r in inst}
        if len(rows) != 1 or 0 in rows:
            raise ApiError(
                422,
                "invalid_instances",
                f"instances[{i}] must be a rectangular H×W array with H, W >= 1 "
                f"(row lengths {sorted(rows)})",
            )
        if len(inst) * len(inst[0]) > limits.max_pixels:
            raise ApiError(
                413,
                "image_too_large",
                f"instances[{i}] has {len(inst) * len(inst[0])} pixels, "
                f"over the limit of {limits.max_pixels} (serve.max_pixels)",
            )
        try:
            arrays.append(array_from_unit_floats(np.asarray(inst, dtype=np.float64)))
        except DataError as exc:
            raise ApiError(422, "invalid_instances", f"instances[{i}]: {exc}") from None
    return arrays


def prepare_file(image: RawImage, index: int, spec: PreprocessSpec, max_pixels: int) -> np.ndarray:
    """Decode one upload and preprocess it exactly as training did: uint8 ``(H, W, C)``."""
    return prepare_upload(image, index, spec, max_pixels)[0]


def prepare_upload(
    image: RawImage, index: int, spec: PreprocessSpec, max_pixels: int
) -> tuple[np.ndarray, tuple[int, int], str | None]:
    """:func:`prepare_file`, the upload's own (width, height) in pixels and its file format
    (Pillow's name: PNG, JPEG, BMP, GIF or WEBP)."""
    where = f"{FILES_FIELD}[{index}] ({image.filename})"
    fmt = unsupported_format(image.data)
    if fmt is not None:
        raise ApiError(
            415,
            "unsupported_media_type",
            f"{where}: {fmt} images are not accepted; send PNG, JPEG, BMP, GIF or WebP",
        )
    try:
        img = decode_image(image.data, max_pixels=max_pixels)
        return image_to_array(img, spec), img.size, img.format
    except DataError as exc:
        reason = getattr(exc, "reason", str(exc))
        code = (
            "image_too_large"
            if "exceeds the limit" in reason or "bomb" in reason
            else "invalid_image"
        )
        status = 413 if code == "image_too_large" else 400
        raise ApiError(status, code, f"{where}: {reason}") from None
    except (OSError, ValueError, MemoryError) as exc:  # anything Pillow raises past decode
        raise ApiError(400, "invalid_image", f"{where}: cannot process image ({exc})") from None


def prepare_instance(x: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    """A JSON instance (uint8 ``(H, W, 1)``, ink high) as a model-sized uint8 image.

    At the model's own size it is used as is (it already is what the model sees);
    other sizes are centred/resized by the shared preprocessing, never inverted.
    """
    size = spec.image_size
    if x.shape == (size, size, spec.channels):
        return x
    img = Image.fromarray(x[:, :, 0], mode="L")
    return image_to_array(img, dataclasses.replace(spec, invert="never"))


class ModelInputs(NamedTuple):
    """What a request asks about: the model inputs and the pictures' own sizes."""

    pixels: np.ndarray  # (N, H, W, C) uint8, model size
    sizes: np.ndarray  # (N, 2) int64 width, height of each picture before preprocessing
    formats: list[str | None]  # each upload's Pillow format (PNG, JPEG, ...); None: JSON


def model_inputs(
    body: bytes, content_type: str, spec: PreprocessSpec, limits: ServeParams
) -> ModelInputs:
    """A request body as the model-sized uint8 batch ``(N, H, W, C)`` it asks about, with
    the (width, height) of each upload or JSON instance.

    Multipart ``files`` or JSON ``instances``; everything a client can get wrong is an
    :class:`ApiError` (415 for another content type).
    """
    media = content_type.split(";")[0].strip().lower()
    if media == "multipart/form-data":
        files = read_multipart(body, content_type, limits)
        prepared = [prepare_upload(f, i, spec, limits.max_pixels) for i, f in enumerate(files)]
        pixels = [p for p, _, _ in prepared]
        sizes = [size for _, size, _ in prepared]
        formats = [fmt for _, _, fmt in prepared]
    elif media == "application/json" or (
        media.startswith("application/") and media.endswith("+json")
    ):
        arrays = parse_instances(body, limits)
        pixels = [prepare_instance(a, spec) for a in arrays]
        sizes = [(a.shape[1], a.shape[0]) for a in arrays]
        formats = [None] * len(arrays)
    else:
        raise ApiError(
            415,
            "unsupported_media_type",
            f"content type {media or '(none)'!r} is not accepted; send multipart/form-data "
            f"with field '{FILES_FIELD}' or application/json with 'instances'",
        )
    batch = pixels[0][None] if len(pixels) == 1 else np.stack(pixels)
    return ModelInputs(batch, np.asarray(sizes, dtype=np.int64).reshape(-1, 2), formats)
