"""Open Inference Protocol (KServe V2) request parsing: the JSON header and the binary tensor data
extension after it (sizes checked against the body, never truncated), the images of the BYTES input, and
the request parameters (keep rate, top_k, deadline, priority) validated as ``/classify`` validates them."""

from __future__ import annotations

import base64
import binascii
import math
from typing import Any

from pydantic import ValidationError

from evit.config import check_keep_rate
from service.errors import ApiError
from service.job import PRIORITIES, Ask
from service.schemas import V2InferRequest

HEADER_LENGTH = "inference-header-content-length"  # the binary extension's JSON header length


def parse(body: bytes, header_length: str | None) -> tuple[V2InferRequest, bytes]:
    """The JSON request and, with the binary data extension, the bytes after it."""
    if header_length is not None:
        if not (header_length.isascii() and header_length.isdigit()) or int(header_length) > len(body):
            raise ApiError(400, f"bad {HEADER_LENGTH}: {header_length[:32]!r} for a body of {len(body)} bytes; "
                           "it must be the JSON header's length in bytes, at most the body's", "bad_header_length")
        split = int(header_length)
        body, binary = body[:split], body[split:]
    else:
        binary = b""
    try:
        return V2InferRequest.model_validate_json(body), binary
    except ValidationError as e:
        if any(err["type"] == "json_invalid" for err in e.errors()):
            raise ApiError(400, f"the request is not valid JSON: {e.errors()[0]['msg']}", "bad_request") from e
        problems = "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors())
        raise ApiError(422, f"not an inference request: {problems}", "invalid_parameter") from e


def keep_rate_of(value: Any, name: str, auto: bool = False) -> float | None:
    if value is None:
        return None
    try:
        return check_keep_rate(value, name)
    except ValueError:
        allowed = 'a number in (0, 1] or "auto"' if auto else "a number in (0, 1]"
        raise ApiError(422, f"parameter {name} must be {allowed}, got {value!r}", "invalid_parameter") from None


def _deadline(value: Any, name: str, text: bool = False) -> float | None:
    """Milliseconds: a JSON number, or with ``text`` a header's string."""
    if value is None:
        return None
    if text:
        try:
            value = float(value)
        except ValueError:
            value = None
    if isinstance(value, bool) or not isinstance(value, int | float) or not (0.0 < value < math.inf):
        raise ApiError(422, f"{name} must be a positive number of milliseconds", "invalid_parameter")
    return float(value)


def ask_of(params: dict[str, Any], header: str | None) -> Ask:
    """The request's scheduling parameters, validated as ``/classify`` validates its query."""
    priority = params.get("priority", "normal")
    if type(priority) is int and 0 <= priority <= len(PRIORITIES):  # Triton's levels: 1 highest, 0 the default
        priority = PRIORITIES[priority - 1] if priority else "normal"
    if priority not in PRIORITIES:
        raise ApiError(422, f"parameter priority must be one of {list(PRIORITIES)}, got {priority!r}",
                       "invalid_parameter")
    deadlines = (_deadline(params.get("deadline_ms"), "parameter deadline_ms"),
                 _deadline(header, "X-Deadline-Ms", text=True))
    return Ask.of(params.get("keep_rate"), keep_rate_of(params.get("min_keep_rate"), "min_keep_rate"), deadlines,
                  priority)


def int_param(value: Any, name: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ApiError(422, f"parameter {name} must be an integer in [{low}, {high}], got {value!r}",
                       "invalid_parameter")
    return value


def images_of(req: V2InferRequest, binary: bytes) -> list[bytes]:
    """The encoded images of the request's one BYTES input; the inputs' binary sizes must add up to the
    binary data exactly (400 otherwise: never truncated or padded)."""
    offset = 0
    images: list[bytes] | None = None
    for tensor, size in zip(req.inputs, _binary_sizes(req, len(binary)), strict=True):
        chunk = b""
        if size is not None:
            chunk, offset = binary[offset : offset + size], offset + size
        if images is not None or tensor.datatype != "BYTES":
            continue
        images = _split_binary(chunk) if size is not None else [_b64(v) for v in _flatten(tensor.data)]
        if len(images) != math.prod(tensor.shape):
            raise ApiError(422, f"input {tensor.name} has shape {tensor.shape} but {len(images)} elements",
                           "invalid_parameter")
    if not images:
        raise ApiError(422, "the request needs one BYTES input holding encoded images (base64 in JSON)",
                       "invalid_parameter")
    return images


def _binary_sizes(req: V2InferRequest, total: int) -> list[int | None]:
    """Each input's ``binary_data_size`` (a JSON integer >= 0, or absent); together exactly ``total``."""
    sizes = [(tensor.parameters or {}).get("binary_data_size") for tensor in req.inputs]
    for tensor, size in zip(req.inputs, sizes, strict=True):
        if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 0):
            raise ApiError(400, f"input {tensor.name[:64]!r}: binary_data_size must be a non-negative JSON "
                           f"integer, got {str(size)[:32]!r}", "bad_binary_data_size")
    claimed = sum(s for s in sizes if s is not None)
    if claimed != total:
        raise ApiError(400, f"the binary data after the JSON header is {total} bytes but the inputs' "
                       f"binary_data_size add up to {claimed}", "bad_binary_data_size")
    return sizes


def _flatten(data: list[Any] | None) -> list[Any]:
    out: list[Any] = []
    for v in data or []:
        out.extend(_flatten(v) if isinstance(v, list) else [v])
    return out


def _b64(value: Any) -> bytes:
    if not isinstance(value, str):
        raise ApiError(422, "BYTES elements in JSON must be base64 strings", "invalid_parameter")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as e:
        raise ApiError(400, f"a BYTES element is not valid base64: {e}", "bad_request") from e


def _split_binary(chunk: bytes) -> list[bytes]:
    """Binary BYTES tensor: each element is a 4-byte little-endian length, then that many bytes."""
    out, i = [], 0
    while i < len(chunk):
        if i + 4 > len(chunk):
            raise ApiError(400, "truncated BYTES element length in the binary data", "bad_request")
        n = int.from_bytes(chunk[i : i + 4], "little")
        if i + 4 + n > len(chunk):
            raise ApiError(400, "truncated BYTES element in the binary data", "bad_request")
        out.append(chunk[i + 4 : i + 4 + n])
        i += 4 + n
    return out
