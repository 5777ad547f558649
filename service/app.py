"""``create_app(settings)``: the FastAPI application, its routes, error handlers and lifespan.

Lifespan: load the models (unless a loaded registry is given), start the batchers, warm up in the
background (``/readyz`` is 503 until done); on shutdown drain (admitted requests finish), then stop.
Middleware, outermost first: request id + access log, bearer-token auth (when tokens are set), shedding
(``service.shed``), body timeout.
"""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Literal

from fastapi import APIRouter, FastAPI, Header, Query, Request
from fastapi.responses import JSONResponse
from pydantic import BeforeValidator, Field
from starlette.routing import Route

from evit.config import check_keep_rate
from service import v2
from service.auth import protect
from service.edge import ServiceDep, call_of, count_request
from service.errors import ApiError, install_error_handlers
from service.job import PRIORITIES, Ask
from service.logs import RequestLogMiddleware
from service.registry import Registry
from service.runtime import Answer, Service
from service.schemas import (
    ClassifyResponse,
    Health,
    KeptPatches,
    KeptStage,
    ModelInfo,
    ModelsResponse,
    Prediction,
    Readiness,
    Timings,
    error_responses,
)
from service.settings import Settings
from service.shed import Shedder
from service.upload import REQUEST_BODY_DOC, BodyTimeout, UploadBudget, read_image_bytes

router = APIRouter()


def _keep_rate(value: object) -> object:
    """One clear message for a bad keep_rate (the union would report one error per member)."""
    if value is None or value == "auto":
        return value
    try:
        return check_keep_rate(float(value))  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ValueError(f"must be a number in (0, 1] or 'auto', got {value!r}") from None


KeepRate = Annotated[
    Annotated[float, Field(gt=0.0, le=1.0)] | Literal["auto"] | None,
    BeforeValidator(_keep_rate),
    Query(description="keep rate in (0, 1]: with the paper's options the fraction of patch tokens each pruning "
          "block keeps; with `--options accurate` a cost: the GMACs the paper's rule spends at that rate, spread "
          "over more, smaller prunings (`/models` lists GMACs per rate). `auto`: the highest "
          "rate the latency model predicts will meet the deadline (without one: the service's latency target) "
          "under the current load, at least `min_keep_rate`; omitted: the model's default. The answer's "
          "`keep_rate` is the rate used."),
]
MinKeepRate = Annotated[
    float | None,
    Query(gt=0.0, le=1.0, allow_inf_nan=False, description="with keep_rate=auto: the lowest rate it may "
          "choose; omitted: the service's `auto_min_keep_rate`"),
]
Deadline = Annotated[
    float | None,
    Query(gt=0.0, allow_inf_nan=False, description="answer within this many ms of arrival or not at all: a "
          "request predicted to finish later is refused at once (503 under load, 504 if even an idle model "
          "is too slow), never run late. Also the `X-Deadline-Ms` header; with both, the smaller counts."),
]
DeadlineHeader = Annotated[
    float | None,
    Header(alias="X-Deadline-Ms", gt=0.0, allow_inf_nan=False, description="the same as `deadline_ms`"),
]
Priority = Annotated[
    Literal[PRIORITIES],  # type: ignore[valid-type]
    Query(description="scheduling class: high runs first; under load low is degraded (lower auto keep "
          "rates) and shed first, and may use only part of the queue"),
]


@router.post(
    "/classify", response_model=ClassifyResponse, openapi_extra=REQUEST_BODY_DOC, tags=["inference"],
    responses=error_responses(400, 404, 408, 413, 415, 422, 500, 503, 504),
    summary="Classify one image at a chosen keep rate",
)
async def classify(
    request: Request,
    svc: ServiceDep,
    keep_rate: KeepRate = None,
    top_k: Annotated[int, Query(ge=1, description="how many classes to return")] = 5,
    model: Annotated[str | None, Query(description="hosted model name; omitted: the default model")] = None,
    return_tokens: Annotated[bool, Query(description="also return the kept patches of each pruning stage")] = False,
    min_keep_rate: MinKeepRate = None,
    deadline_ms: Deadline = None,
    x_deadline_ms: DeadlineHeader = None,
    priority: Priority = "normal",
) -> ClassifyResponse:
    hosted = svc.model(model)
    if top_k > svc.settings.max_top_k:
        raise ApiError(422, f"top_k={top_k} is over the limit of {svc.settings.max_top_k}", "invalid_parameter")
    ask = Ask.of(keep_rate, min_keep_rate, (deadline_ms, x_deadline_ms), priority)
    answer = await svc.infer(
        call_of(request), hosted, None if keep_rate == "auto" else keep_rate, top_k, return_tokens,
        lambda: read_image_bytes(request, svc.settings.max_body_bytes, request.app.state.uploads), ask,
    )
    return classify_response(answer)


def classify_response(a: Answer) -> ClassifyResponse:
    r, m = a.result, a.model
    kept = None
    if r.kept is not None:
        stages = [KeptStage(block=b, patches=p) for b, p in zip(m.runner.info.prune_blocks, r.kept, strict=False)]
        kept = KeptPatches(grid=m.grid, stages=stages)
    return ClassifyResponse(
        model=m.name,
        keep_rate=a.keep_rate,
        predictions=[
            Prediction(label=m.labels[c], class_index=c, probability=p)
            for c, p in zip(r.classes, r.probabilities, strict=True)
        ],
        tokens=r.tokens,
        timings=Timings(
            decode_ms=a.decode_s * 1000, queue_ms=a.queue_s * 1000,
            inference_ms=r.inference_s * 1000, total_ms=a.total_s * 1000,
        ),
        batch_size=r.batch_size,
        kept=kept,
    )


@router.get("/models", response_model=ModelsResponse, tags=["service"], responses=error_responses(503))
async def models(svc: ServiceDep) -> ModelsResponse:
    if svc.registry is None:
        raise ApiError(503, "models are still loading", "not_ready", {"Retry-After": "1"})
    batcher = svc.batcher
    return ModelsResponse(default=svc.registry.default, models=[
        ModelInfo(**m.info(), latency_model=batcher.queues[m.name].scheduler.info() if batcher else None)
        for m in svc.registry
    ])


@router.get("/healthz", response_model=Health, tags=["service"], summary="Liveness: the process answers")
async def healthz() -> Health:
    return Health()


@router.get(
    "/readyz", response_model=Readiness, tags=["service"],
    responses={503: {"model": Readiness, "description": "loading, warming up, or draining"}},
    summary="Readiness: models loaded and warmed up, not draining",
)
async def readyz(svc: ServiceDep) -> JSONResponse:
    state = {m.name: m.ready for m in svc.registry} if svc.registry else {}
    body = Readiness(ready=svc.ready, draining=svc.draining, models=state, error=svc.failure)
    return JSONResponse(body.model_dump(exclude_none=True), status_code=200 if svc.ready else 503)


def create_app(settings: Settings | None = None, registry: Registry | None = None) -> FastAPI:
    """The service as an ASGI app. ``registry``: models already loaded (else the lifespan loads them)."""
    settings = settings or Settings()
    service = Service(settings, registry)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await service.start()
        try:
            yield
        finally:
            await service.stop()

    docs = bool(settings.docs_path)  # "" turns off the docs and the OpenAPI document
    app = FastAPI(
        title="evit-serve",
        version="0.1.0",
        summary="Token-pruned Vision Transformers (EViT) with a per-request keep rate",
        lifespan=lifespan,
        docs_url=settings.docs_path or None,
        redoc_url="/redoc" if docs else None,
        openapi_url="/openapi.json" if docs else None,
        # FastAPI's native OpenTelemetry checks the global providers on every request (a few % of the
        # event loop at saturation); this service exports Prometheus metrics and JSON logs instead.
        telemetry={"tracing": False, "metrics": False, "logs": False},
    )
    app.state.service = service
    app.state.uploads = UploadBudget(settings.upload_budget_bytes)  # bodies being received, all routes
    install_error_handlers(app)
    app.include_router(router)
    app.include_router(v2.router)
    if settings.metrics_path:  # prometheus_client's ASGI app: gzip and OpenMetrics by negotiation
        app.router.routes.append(Route(settings.metrics_path, service.metrics.asgi_app(), methods=["GET"]))
    app.add_middleware(BodyTimeout, seconds=settings.body_timeout_s)
    app.add_middleware(Shedder, service=service)  # inside auth and the request log: see service.shed
    if settings.api_tokens:
        protect(app, [t.get_secret_value() for t in settings.api_tokens], settings.metrics_path)
    app.add_middleware(RequestLogMiddleware, on_done=functools.partial(count_request, service))
    return app
