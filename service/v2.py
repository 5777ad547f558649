"""Open Inference Protocol (KServe V2) REST routes over the same batcher as ``/classify``.

``POST /v2/models/{name}/infer`` takes the images as one BYTES input (shape ``[N]``): in JSON, each
element is the base64 of an encoded image; with the binary tensor data extension (what Triton's clients
and perf_analyzer send), the JSON header is followed by the raw elements, each prefixed by its 4-byte
little-endian length. Request parameters: ``keep_rate`` (in (0, 1] or ``"auto"``, default the model's),
``top_k``, and the scheduling parameters of ``/classify``: ``min_keep_rate``, ``deadline_ms`` (also the
``X-Deadline-Ms`` header; the smaller counts) and ``priority``; every image of the request is scheduled
with them. The answer's parameters give ``keep_rate`` (the first image's) and ``keep_rates`` (each one's).
Outputs (all by default, or those the request names): ``probabilities`` FP32 ``[N, k]``, ``classes``
INT64 ``[N, k]``, ``labels`` BYTES ``[N, k]``, ``tokens`` INT64 ``[N]``; answers are always JSON.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import math
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import ValidationError

from evit.config import check_keep_rate
from service.edge import ServiceDep, call_of
from service.errors import ApiError
from service.registry import HostedModel
from service.runtime import Answer, Service
from service.scheduler import PRIORITIES, Ask
from service.schemas import (
    V2InferRequest,
    V2InferResponse,
    V2Live,
    V2ModelMetadata,
    V2ModelReady,
    V2Ready,
    V2ServerMetadata,
    V2Tensor,
    V2TensorMetadata,
    error_responses,
)
from service.upload import read_body

router = APIRouter(prefix="/v2", tags=["open inference protocol"])
VERSION = "1"
OUTPUTS = ("probabilities", "classes", "labels", "tokens")
HEADER_LENGTH = "inference-header-content-length"


@router.get("", response_model=V2ServerMetadata)
async def server_metadata() -> V2ServerMetadata:
    return V2ServerMetadata(name="evit-serve", version="0.1.0", extensions=["binary_tensor_data"])


@router.get("/health/live", response_model=V2Live)
async def live() -> V2Live:
    return V2Live(live=True)


@router.get("/health/ready", response_model=V2Ready, responses={503: {"model": V2Ready}})
async def ready(svc: ServiceDep) -> JSONResponse:
    return JSONResponse({"ready": svc.ready}, status_code=200 if svc.ready else 503)


@router.get("/models/{model_name}", response_model=V2ModelMetadata, responses=error_responses(404))
@router.get("/models/{model_name}/versions/{version}", response_model=V2ModelMetadata,
            responses=error_responses(404), include_in_schema=False)
async def model_metadata(model_name: str, svc: ServiceDep, version: str = VERSION) -> V2ModelMetadata:
    hosted = _model(svc, model_name, version)
    info = hosted.info()
    return V2ModelMetadata(
        name=hosted.name, versions=[VERSION], platform="pytorch_evit",
        inputs=[V2TensorMetadata(name="image", datatype="BYTES", shape=[-1])],
        outputs=[V2TensorMetadata(name="probabilities", datatype="FP32", shape=[-1, -1]),
                 V2TensorMetadata(name="classes", datatype="INT64", shape=[-1, -1]),
                 V2TensorMetadata(name="labels", datatype="BYTES", shape=[-1, -1]),
                 V2TensorMetadata(name="tokens", datatype="INT64", shape=[-1])],
        parameters={k: info[k] for k in ("architecture", "default_keep_rate", "prune_blocks", "gmacs",
                                         "random_weights", "input_size")},
    )


@router.get("/models/{model_name}/ready", response_model=V2ModelReady,
            responses={404: error_responses(404)[404], 503: {"model": V2ModelReady}})
async def model_ready(model_name: str, svc: ServiceDep) -> JSONResponse:
    hosted = _model(svc, model_name, VERSION)
    ok = hosted.ready and svc.ready
    return JSONResponse({"name": hosted.name, "ready": ok}, status_code=200 if ok else 503)


_INFER = dict(response_model=V2InferResponse, response_model_exclude_none=True,
              responses=error_responses(400, 404, 408, 413, 415, 422, 503, 504))


@router.post("/models/{model_name}/infer", **_INFER)
@router.post("/models/{model_name}/versions/{version}/infer", include_in_schema=False, **_INFER)
async def infer(model_name: str, request: Request, svc: ServiceDep, version: str = VERSION) -> V2InferResponse:
    hosted = _model(svc, model_name, version)
    request.state.metric_labels = (hosted.name, None)
    body = await read_body(request, svc.settings.max_body_bytes)
    req, binary = _parse(body, request.headers.get(HEADER_LENGTH))
    params = req.parameters or {}
    ask = _ask(params, request.headers.get("x-deadline-ms"))
    keep_rate = None if ask.auto else _keep_rate(params.get("keep_rate"), "keep_rate", auto=True)
    top_k = _int_param(params.get("top_k", 5), "top_k", 1, min(hosted.num_classes, svc.settings.max_top_k))
    images = _images(req, binary)
    if len(images) > svc.settings.queue_size:
        raise ApiError(413, f"{len(images)} images in one request; at most {svc.settings.queue_size}",
                       "too_many_images")
    wanted = [o.name for o in req.outputs] if req.outputs else list(OUTPUTS)
    unknown = sorted(set(wanted) - set(OUTPUTS))
    if unknown:
        raise ApiError(422, f"unknown outputs {unknown}; this model has {list(OUTPUTS)}", "invalid_parameter")
    answers = await _run(svc, request, hosted, keep_rate, top_k, images, ask)
    return V2InferResponse(
        model_name=hosted.name, model_version=VERSION, id=req.id,
        parameters={"keep_rate": answers[0].keep_rate, "keep_rates": [a.keep_rate for a in answers],
                    "batch_sizes": [a.result.batch_size for a in answers]},
        outputs=[_output(name, answers, top_k) for name in wanted],
    )


def _model(svc: Service, name: str, version: str) -> HostedModel:
    if version != VERSION:
        raise ApiError(404, f"model {name} has only version {VERSION}", "unknown_version")
    return svc.model(name)


def _parse(body: bytes, header_length: str | None) -> tuple[V2InferRequest, bytes]:
    """The JSON request and, with the binary data extension, the bytes after it."""
    if header_length is not None:
        if not header_length.isdigit() or int(header_length) > len(body):
            raise ApiError(400, f"bad {HEADER_LENGTH}: {header_length!r} for a body of {len(body)} bytes")
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


def _keep_rate(value: Any, name: str, auto: bool = False) -> float | None:
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


def _ask(params: dict[str, Any], header: str | None) -> Ask:
    """The request's scheduling parameters, validated as ``/classify`` validates its query."""
    priority = params.get("priority", "normal")
    if priority not in PRIORITIES:
        raise ApiError(422, f"parameter priority must be one of {list(PRIORITIES)}, got {priority!r}",
                       "invalid_parameter")
    deadlines = (_deadline(params.get("deadline_ms"), "parameter deadline_ms"),
                 _deadline(header, "X-Deadline-Ms", text=True))
    return Ask.of(params.get("keep_rate"), _keep_rate(params.get("min_keep_rate"), "min_keep_rate"), deadlines,
                  priority)


def _int_param(value: Any, name: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ApiError(422, f"parameter {name} must be an integer in [{low}, {high}], got {value!r}",
                       "invalid_parameter")
    return value


def _images(req: V2InferRequest, binary: bytes) -> list[bytes]:
    """The encoded images of the request's one BYTES input."""
    offset = 0
    images: list[bytes] | None = None
    for tensor in req.inputs:
        size = (tensor.parameters or {}).get("binary_data_size")
        chunk = b""
        if size is not None:
            chunk, offset = binary[offset : offset + int(size)], offset + int(size)
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


async def _run(svc: Service, request: Request, hosted: HostedModel, keep_rate: float | None, top_k: int,
               images: list[bytes], ask: Ask) -> list[Answer]:
    call = call_of(request)

    async def one(data: bytes) -> Answer:
        async def read() -> bytes:
            return data

        return await svc.infer(call, hosted, keep_rate, top_k, False, read, ask)

    results = await asyncio.gather(*(one(img) for img in images), return_exceptions=True)
    for r in results:
        if isinstance(r, BaseException):
            raise r
    return list(results)  # type: ignore[arg-type]


def _output(name: str, answers: list[Answer], k: int) -> V2Tensor:
    n = len(answers)
    if name == "probabilities":
        return V2Tensor(name=name, datatype="FP32", shape=[n, k],
                        data=[p for a in answers for p in a.result.probabilities])
    if name == "classes":
        return V2Tensor(name=name, datatype="INT64", shape=[n, k], data=[c for a in answers for c in a.result.classes])
    if name == "labels":
        return V2Tensor(name=name, datatype="BYTES", shape=[n, k],
                        data=[a.model.labels[c] for a in answers for c in a.result.classes])
    return V2Tensor(name=name, datatype="INT64", shape=[n], data=[a.result.tokens for a in answers])
