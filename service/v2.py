"""Open Inference Protocol (KServe V2) REST routes over the same batcher as ``/classify``.

``POST /v2/models/{name}/infer`` takes the images as one BYTES input (shape ``[N]``): in JSON, each
element is the base64 of an encoded image; with the binary tensor data extension (what Triton's clients
and perf_analyzer send), the JSON header is followed by the raw elements, each prefixed by its 4-byte
little-endian length. Request parameters: ``keep_rate`` (in (0, 1] or ``"auto"``, default the model's),
``top_k``, ``binary_data_output`` (service/v2_binary.py), and the scheduling parameters of ``/classify``:
``min_keep_rate``, ``deadline_ms`` (also the ``X-Deadline-Ms`` header; the smaller counts) and
``priority``; every image of the request is scheduled with them. The answer's parameters give
``keep_rate`` (the first image's) and ``keep_rates`` (each one's).
Outputs (all by default, or those the request names): ``probabilities`` FP32 ``[N, k]``, ``classes``
INT64 ``[N, k]``, ``labels`` BYTES ``[N, k]``, ``tokens`` INT64 ``[N]``; in JSON, or as binary data when asked.
``GET /v2/models/{name}/config`` gives Triton's model configuration (what perf_analyzer and model-analyzer
read at start-up). Errors have the protocol's body, ``{"error": "<message>", "code": "<type>", ...}``.
"""

from __future__ import annotations

import asyncio
import functools

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from service.edge import ServiceDep, call_of
from service.errors import ApiError
from service.job import PRIORITIES, Ask
from service.registry import HostedModel
from service.runtime import Answer, Service
from service.schemas import (
    TritonDynamicBatching,
    TritonInstanceGroup,
    TritonModelConfig,
    TritonTensorConfig,
    V2ErrorResponse,
    V2InferResponse,
    V2Live,
    V2ModelMetadata,
    V2ModelReady,
    V2Ready,
    V2ServerMetadata,
    V2Tensor,
    V2TensorMetadata,
)
from service.schemas import error_responses as _error_responses
from service.upload import read_body
from service.v2_binary import BINARY_ANSWER_DOC, binary_outputs, respond
from service.v2_request import HEADER_LENGTH, ask_of, images_of, int_param, keep_rate_of, parse

router = APIRouter(prefix="/v2", tags=["open inference protocol"])
VERSION = "1"
OUTPUTS = ("probabilities", "classes", "labels", "tokens")
TRITON_TYPES = {"FP32": "TYPE_FP32", "INT64": "TYPE_INT64", "BYTES": "TYPE_STRING"}
OUTPUT_META = (V2TensorMetadata(name="probabilities", datatype="FP32", shape=[-1, -1]),
               V2TensorMetadata(name="classes", datatype="INT64", shape=[-1, -1]),
               V2TensorMetadata(name="labels", datatype="BYTES", shape=[-1, -1]),
               V2TensorMetadata(name="tokens", datatype="INT64", shape=[-1]))
error_responses = functools.partial(_error_responses, model=V2ErrorResponse)  # the protocol's error body


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
        outputs=list(OUTPUT_META),
        parameters={k: info[k] for k in ("architecture", "default_keep_rate", "prune_blocks", "gmacs",
                                         "random_weights", "input_size")},
    )


@router.get("/models/{model_name}/config", response_model=TritonModelConfig, responses=error_responses(404))
@router.get("/models/{model_name}/versions/{version}/config", response_model=TritonModelConfig,
            responses=error_responses(404), include_in_schema=False)
async def model_config(model_name: str, svc: ServiceDep, version: str = VERSION) -> TritonModelConfig:
    """Triton's model configuration: dims leave out the batch dimension, as with ``max_batch_size`` > 0."""
    hosted = _model(svc, model_name, version)
    s, info = svc.settings, hosted.info()
    return TritonModelConfig(
        name=hosted.name, platform="pytorch_evit", backend="evit", max_batch_size=s.max_batch_size,
        input=[TritonTensorConfig(name="image", data_type="TYPE_STRING", dims=[1])],
        output=[TritonTensorConfig(name=o.name, data_type=TRITON_TYPES[o.datatype], dims=o.shape[1:] or [1])
                for o in OUTPUT_META],
        dynamic_batching=TritonDynamicBatching(preferred_batch_size=[s.max_batch_size],
                                               max_queue_delay_microseconds=round(s.max_wait_ms * 1000),
                                               priority_levels=len(PRIORITIES), default_priority_level=2),
        instance_group=[TritonInstanceGroup(name=hosted.name, kind="KIND_CPU" if info["device"] == "cpu"
                                            else "KIND_GPU")],
        parameters={k: {"string_value": str(info[k])} for k in ("architecture", "default_keep_rate",
                                                                  "prune_blocks", "dtype")},
    )


@router.get("/models/{model_name}/ready", response_model=V2ModelReady,
            responses={404: error_responses(404)[404], 503: {"model": V2ModelReady}})
async def model_ready(model_name: str, svc: ServiceDep) -> JSONResponse:
    hosted = _model(svc, model_name, VERSION)
    ok = hosted.ready and svc.ready
    return JSONResponse({"name": hosted.name, "ready": ok}, status_code=200 if ok else 503)


_INFER = dict(response_model=V2InferResponse, response_model_exclude_none=True,
              responses={**BINARY_ANSWER_DOC, **error_responses(400, 404, 408, 413, 415, 422, 500, 503, 504)})


@router.post("/models/{model_name}/infer", **_INFER)
@router.post("/models/{model_name}/versions/{version}/infer", include_in_schema=False, **_INFER)
async def infer(model_name: str, request: Request, svc: ServiceDep, version: str = VERSION) -> Response:
    hosted = _model(svc, model_name, version)
    request.state.metric_labels = (hosted.name, None)
    svc.check_room(hosted)  # admission before the body is read
    body = await read_body(request, svc.settings.max_body_bytes, request.app.state.uploads)
    req, binary = parse(body, request.headers.get(HEADER_LENGTH))
    params = req.parameters or {}
    ask = ask_of(params, request.headers.get("x-deadline-ms"))
    keep_rate = None if ask.auto else keep_rate_of(params.get("keep_rate"), "keep_rate", auto=True)
    top_k = int_param(params.get("top_k", 5), "top_k", 1, min(hosted.num_classes, svc.settings.max_top_k))
    images = images_of(req, binary)
    if len(images) > svc.settings.queue_size:
        raise ApiError(413, f"{len(images)} images in one request; at most {svc.settings.queue_size}",
                       "too_many_images")
    wanted = [o.name for o in req.outputs] if req.outputs else list(OUTPUTS)
    unknown = sorted(set(wanted) - set(OUTPUTS))
    if unknown:
        raise ApiError(422, f"unknown outputs {unknown}; this model has {list(OUTPUTS)}", "invalid_parameter")
    as_binary = binary_outputs(req, wanted)
    answers = await _run(svc, request, hosted, keep_rate, top_k, images, ask)
    return respond(V2InferResponse(
        model_name=hosted.name, model_version=VERSION, id=req.id,
        parameters={"keep_rate": answers[0].keep_rate, "keep_rates": [a.keep_rate for a in answers],
                    "batch_sizes": [a.result.batch_size for a in answers]},
        outputs=[_output(name, answers, top_k) for name in wanted],
    ), as_binary)


def _model(svc: Service, name: str, version: str) -> HostedModel:
    if version != VERSION:
        raise ApiError(404, f"model {name} has only version {VERSION}", "unknown_version")
    return svc.model(name)


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
