"""Pydantic models for every response body of the service, errors included (they document the OpenAPI)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field


class Prediction(BaseModel):
    label: str
    class_index: int
    probability: float


class Timings(BaseModel):
    decode_ms: float = Field(description="validating, decoding and preprocessing the image")
    queue_ms: float = Field(description="waiting in the batching queue")
    inference_ms: float = Field(description="the forward pass of the request's batch")
    total_ms: float = Field(description="from request arrival to the answer")


class KeptStage(BaseModel):
    block: int = Field(description="0-based block after whose attention the tokens were reorganized")
    patches: list[int] = Field(description="original patch indices (row-major) still their own token")


class KeptPatches(BaseModel):
    grid: tuple[int, int] = Field(description="patch grid (rows, columns) of the model input")
    stages: list[KeptStage]


class ClassifyResponse(BaseModel):
    model: str
    keep_rate: float = Field(description="the keep rate used (with keep_rate=auto: the one the scheduler chose)")
    predictions: list[Prediction] = Field(description="top-k classes, most probable first")
    tokens: int = Field(description="tokens the transformer blocks processed, summed over blocks")
    timings: Timings
    batch_size: int = Field(description="samples in the forward pass that served this request")
    kept: KeptPatches | None = Field(None, description="with return_tokens=true: kept patches per stage")


class ModelInfo(BaseModel):
    name: str
    architecture: str
    input_size: tuple[int, int, int]
    num_classes: int
    num_patches: int
    prune_blocks: tuple[int, ...]
    fuse: bool
    fusion: str = Field(description="what becomes of the tokens a pruning block does not keep: 'one' fused token "
                        "(the paper), merged into their 'nearest' kept token, or 'drop'ped")
    default_keep_rate: float
    weights: str = Field(description="'hub', 'random' or the checkpoint path")
    random_weights: bool = Field(description="true: predictions are meaningless")
    device: str
    dtype: str
    backend: str = Field("torch", description="what runs the passes: torch (eager), onnxruntime or openvino")
    precision: str = Field("fp32", description="fp32, bf16 or fp16")
    keep_rates: list[float] | None = Field(
        None, description="compiled backends: the keep-rate buckets a request's rate snaps to (null: any rate)")
    ready: bool
    gmacs: dict[str, float] = Field(description="GMACs per image at a few keep rates")
    tokens: dict[str, int] = Field(description="tokens the blocks process per image at those keep rates")
    latency_model: dict[str, Any] | None = Field(
        None, description="the scheduler's latency model: pass time = overhead + time per GMAC (calibrated at "
        "warm-up, updated from every pass), its recent relative error and safety factor, and the predicted time "
        "of a full batch at a few keep rates")


class ModelsResponse(BaseModel):
    default: str
    models: list[ModelInfo]


class Health(BaseModel):
    status: str = "ok"


class Readiness(BaseModel):
    ready: bool
    draining: bool
    models: dict[str, bool]
    error: str | None = Field(None, description="why the service will not become ready (a failed warm-up or "
                              "a dead batch task); the process exits after it")


class ErrorResponse(BaseModel):
    status: int = Field(description="the HTTP status code, repeated")
    error: str = Field(description="a stable machine-readable error type, e.g. 'payload_too_large'")
    message: str = Field(description="what went wrong, for humans")
    request_id: str | None = None
    details: list[dict[str, Any]] | None = Field(None, description="per-field problems (422)")


_ERRORS: dict[int, str] = {
    400: "The image could not be decoded (corrupt, truncated or empty).",
    404: "No hosted model has that name.",
    408: "The request body did not fully arrive within the body timeout (EVIT_BODY_TIMEOUT_S) after its headers.",
    413: "The body is over the byte limit or the image over the pixel limit (checked before decoding).",
    415: "The body is not an image type the service accepts.",
    422: "A parameter is invalid (keep_rate outside (0, 1] or not a number, top_k out of range, ...).",
    499: "The client went away before the answer; the request was dropped before inference.",
    500: "The forward pass failed (`inference_failed`: that pass's requests only; the message names the "
         "exception type, never its text) or an unexpected error (`internal_error`; details only in the log).",
    503: "Not ready (loading, warming up or draining), overloaded (queue full), or the request's deadline cannot "
         "be met under the current load (`deadline_unreachable`; refused at arrival, not run). See Retry-After.",
    504: "The request was not answered within its deadline or the request timeout, or its deadline cannot be "
         "met even by an idle model (`deadline_unreachable`); it was not run.",
}


def error_responses(*codes: int, model: type[BaseModel] = ErrorResponse) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses=`` entries for the given status codes, all with the ``model`` error body."""
    out: dict[int | str, dict[str, Any]] = {}
    for code in codes:
        entry: dict[str, Any] = {"model": model, "description": _ERRORS[code]}
        if code == 503:
            entry["headers"] = {
                "Retry-After": {"description": "seconds after which a retry should succeed",
                                "schema": {"type": "integer"}}
            }
        out[code] = entry
    return out


# -- Open Inference Protocol (KServe V2) ------------------------------------------------------------------
class V2ErrorResponse(BaseModel):
    """The protocol's error body (what tritonclient and KServe clients show), with the service's fields beside it."""

    error: str = Field(description="what went wrong, for humans (the protocol's field)")
    code: str = Field(description="a stable machine-readable error type, e.g. 'undecodable_image'")
    status: int = Field(description="the HTTP status code, repeated")
    request_id: str | None = None
    details: list[dict[str, Any]] | None = Field(None, description="per-field problems (422)")


class V2Tensor(BaseModel):
    name: str
    datatype: str
    shape: list[int]
    parameters: dict[str, Any] | None = None
    data: list[Any] | None = None  # row-major, flat or nested; absent when sent as binary data


class V2RequestedOutput(BaseModel):
    name: str
    parameters: dict[str, Any] | None = None


class V2InferRequest(BaseModel):
    id: str | None = None
    parameters: dict[str, Any] | None = Field(None, description="keep_rate (float in (0, 1]), top_k (int)")
    inputs: list[V2Tensor]
    outputs: list[V2RequestedOutput] | None = None


class V2InferResponse(BaseModel):
    model_name: str
    model_version: str | None = None
    id: str | None = None
    parameters: dict[str, Any] | None = None
    outputs: list[V2Tensor]


class V2TensorMetadata(BaseModel):
    name: str
    datatype: str
    shape: list[int]


class V2ModelMetadata(BaseModel):
    name: str
    versions: list[str]
    platform: str
    inputs: list[V2TensorMetadata]
    outputs: list[V2TensorMetadata]
    parameters: dict[str, Any] | None = None


class V2ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str]


class V2Live(BaseModel):
    live: bool


class V2Ready(BaseModel):
    ready: bool


class V2ModelReady(BaseModel):
    name: str
    ready: bool


# -- Triton's model configuration (GET /v2/models/{name}/config), the fields its tools read -----------------
class TritonTensorConfig(BaseModel):
    name: str
    data_type: str  # TYPE_FP32, TYPE_INT64, TYPE_STRING
    dims: list[int]  # without the batch dimension (max_batch_size > 0)


class TritonDynamicBatching(BaseModel):
    preferred_batch_size: list[int]
    max_queue_delay_microseconds: int
    priority_levels: int  # the request parameter priority: 1 high, 2 normal, 3 low (or the names)
    default_priority_level: int


class TritonInstanceGroup(BaseModel):
    name: str
    kind: str  # KIND_CPU | KIND_GPU
    count: int = 1


class TritonModelConfig(BaseModel):
    name: str
    platform: str
    backend: str
    version_policy: dict[str, Any] = {"latest": {"num_versions": 1}}
    max_batch_size: int
    input: list[TritonTensorConfig]
    output: list[TritonTensorConfig]
    dynamic_batching: TritonDynamicBatching
    instance_group: list[TritonInstanceGroup]
    parameters: dict[str, dict[str, str]] = Field(default_factory=dict)  # {"key": {"string_value": "..."}}
