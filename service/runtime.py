"""The running service: models, batcher, decode pool, readiness and draining, and the one inference path
that ``/classify`` and the Open Inference Protocol routes share."""

from __future__ import annotations

import asyncio
import logging
import math
import os
import re
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Annotated
from urllib.parse import parse_qs

from fastapi import Depends, Request
from starlette.types import Receive, Scope

from service.batcher import Batcher, Pending
from service.errors import CLIENT_GONE, ApiError
from service.metrics import NO_MODEL, Metrics
from service.registry import HostedModel, Registry, load_registry
from service.scheduler import PRIORITIES, Ask, Job
from service.settings import Settings
from service.worker import Sample, SampleResult

log = logging.getLogger("service.runtime")

_V2_INFER = re.compile(r"^/v2/models/([^/]+)(?:/versions/[^/]+)?/infer$")


@dataclass(frozen=True)
class Answer:
    model: HostedModel
    keep_rate: float
    result: SampleResult
    decode_s: float
    queue_s: float
    total_s: float


class Service:
    def __init__(self, settings: Settings, registry: Registry | None = None) -> None:
        self.settings = settings
        self.registry = registry
        self.metrics = Metrics()
        self.batcher: Batcher | None = None
        threads = settings.decode_threads or min(4, os.cpu_count() or 1)
        self.decode_pool = ThreadPoolExecutor(threads, thread_name_prefix="evit-decode")
        self.warmed = False
        self.draining = False
        self._drain_task: asyncio.Task[bool] | None = None
        self._warm_task: asyncio.Task[None] | None = None

    # -- lifecycle -----------------------------------------------------------------------------------
    @property
    def ready(self) -> bool:
        return self.warmed and not self.draining

    async def start(self) -> None:
        """Load (unless given), start the batch formers, and warm up in the background (/readyz waits)."""
        if self.registry is None:
            self.registry = await asyncio.to_thread(load_registry, self.settings)
        self.batcher = Batcher(self.registry, self.settings, self.metrics)
        self.batcher.start()
        self._warm_task = asyncio.create_task(self._warm_up(), name="warm-up")

    async def _warm_up(self) -> None:
        assert self.batcher is not None and self.registry is not None
        if self.settings.warmup:
            await self.batcher.warm_up()
        for m in self.registry:
            m.ready = True
        self.warmed = True
        self.metrics.ready.set(0 if self.draining else 1)
        log.info("ready", extra={"models": list(self.registry.models)})

    def begin_drain(self) -> asyncio.Task[bool]:
        """Readiness false and new requests 503 from now on; the task ends when admitted requests are answered."""
        if self._drain_task is None:
            self.draining = True
            self.metrics.ready.set(0)
            log.info("draining: refusing new requests, finishing admitted ones")
            self._drain_task = asyncio.create_task(self._drain(), name="drain")
        return self._drain_task

    async def _drain(self) -> bool:
        if self.batcher is None:
            return True
        done = await self.batcher.drain(self.settings.drain_timeout_s)
        log.info("drained" if done else "drain timed out with requests still admitted")
        return done

    async def stop(self) -> None:
        await self.begin_drain()
        if self._warm_task is not None:
            self._warm_task.cancel()
            await asyncio.gather(self._warm_task, return_exceptions=True)
        if self.batcher is not None:
            await self.batcher.stop()
        self.decode_pool.shutdown(wait=False, cancel_futures=True)

    def check_accepting(self) -> None:
        if self.draining:
            raise ApiError(503, "the service is shutting down", "draining", {"Retry-After": "1"})
        if not self.warmed:
            raise ApiError(503, "the service is not ready yet (loading or warming up)", "not_ready",
                           {"Retry-After": "1"})

    # -- the inference path --------------------------------------------------------------------------
    def model(self, name: str | None) -> HostedModel:
        if self.registry is None:
            raise ApiError(503, "the service is not ready yet (loading models)", "not_ready", {"Retry-After": "1"})
        return self.registry.get(name)

    async def infer(
        self, request: Request, hosted: HostedModel, keep_rate: float | None, top_k: int, want_kept: bool,
        read: Callable[[], Awaitable[bytes]], ask: Ask | None = None,
    ) -> Answer:
        """Admit, read and decode the image, queue it, and wait for its answer (or 504 / client gone).

        ``ask``: deadline, ``keep_rate=auto`` and priority (see ``service.scheduler``); the answer's
        ``keep_rate`` is the rate the request ran at."""
        ask = ask or Ask()
        rate = hosted.runner.snap(hosted.default_keep_rate if keep_rate is None else keep_rate)
        request.state.log.update(model=hosted.name, keep_rate="auto" if ask.auto else rate, priority=ask.priority,
                                 deadline_ms=ask.deadline_ms)
        request.state.metric_labels = (hosted.name, None if ask.auto else rate)
        if top_k > hosted.num_classes:
            raise ApiError(422, f"top_k={top_k} is more than the model's {hosted.num_classes} classes",
                           "invalid_parameter")
        self.check_accepting()
        assert self.batcher is not None
        started: float = request.state.started
        job = self._job(ask, rate, started)
        with self.batcher.admit(hosted.name, job) as ticket:
            data = await read()
            t0 = time.monotonic()
            loop = asyncio.get_running_loop()
            try:
                tensor = await loop.run_in_executor(self.decode_pool, hosted.preprocess, data)
            finally:
                decode_s = time.monotonic() - t0
                self.metrics.decode_duration.labels(model=hosted.name).observe(decode_s)
            if t0 + decode_s >= job.deadline:
                raise ApiError(504, "request timed out (deadline or request timeout) before it could be queued",
                               "timeout")
            item = self.batcher.submit(ticket, Sample(tensor, rate, top_k, want_kept), job)
            result = await self._wait(request.receive, item)
        total = time.monotonic() - started
        used = item.sample.keep_rate
        request.state.metric_labels = (hosted.name, used)
        request.state.log.update(keep_rate=used, batch_size=result.batch_size, queue_ms=round(item.queue_s * 1000, 3),
                                 inference_ms=round(result.inference_s * 1000, 3))
        return Answer(hosted, used, result, decode_s, item.queue_s, total)

    def _job(self, ask: Ask, rate: float, started: float) -> Job:
        """The scheduler's view of a request that arrived at ``started``."""
        s = self.settings
        deadline = started + s.request_timeout_s
        if ask.deadline_ms is not None:
            deadline = min(deadline, started + ask.deadline_ms / 1e3)
        target = math.inf  # fixed keep rates have no target: only a deadline
        if ask.auto:
            target = deadline if ask.deadline_ms is not None else started + s.latency_target_ms / 1e3
        floor = ask.min_keep_rate or s.auto_min_keep_rate
        return Job(rate, deadline, PRIORITIES.index(ask.priority), ask.auto, floor if ask.auto else rate, target,
                   started)

    async def _wait(self, receive: Receive, item: Pending) -> SampleResult:
        watcher = asyncio.ensure_future(_client_gone(receive))
        try:
            timeout = max(item.job.deadline - time.monotonic(), 0.0)
            done, _ = await asyncio.wait({item.future, watcher}, timeout=timeout,
                                         return_when=asyncio.FIRST_COMPLETED)
            if item.future.done():
                return item.future.result()  # an ApiError (504 from the queue, 500) raises here
            if watcher in done:
                raise ApiError(CLIENT_GONE, "client closed the connection; request dropped", "client_closed_request")
            raise ApiError(504, f"no answer within the request's deadline or the request timeout "
                           f"({self.settings.request_timeout_s:g} s)", "timeout")
        finally:
            watcher.cancel()
            item.future.cancel()  # no-op when answered; otherwise the batcher drops it unrun

    # -- request metrics (called by the logging middleware once per response) ------------------------
    def count_request(self, scope: Scope, status: int, seconds: float) -> None:
        path = scope["path"]
        name_in_path = _V2_INFER.match(path)
        if path != "/classify" and name_in_path is None:
            return
        state = scope.get("state", {})
        labels = state.get("metric_labels")
        if labels is None:  # refused before the route ran (422): label with the model it named, if hosted
            named = name_in_path.group(1) if name_in_path else _query_param(scope, "model")
            labels = (self._hosted_name(named), None)
        self.metrics.count_request(labels[0], labels[1], status, seconds)

    def _hosted_name(self, name: str | None) -> str:
        """A metric label that only ever holds hosted model names."""
        if self.registry is None:
            return NO_MODEL
        name = name or self.registry.default
        return name if name in self.registry.models else NO_MODEL


async def get_service(request: Request) -> Service:
    return request.app.state.service  # async: a sync dependency would cost a thread-pool hop per request


ServiceDep = Annotated[Service, Depends(get_service)]


async def _client_gone(receive: Receive) -> None:
    """Returns when the client disconnects (the body has been read, so nothing else can arrive)."""
    while (await receive())["type"] != "http.disconnect":
        pass


def _query_param(scope: Scope, key: str) -> str | None:
    values = parse_qs(scope.get("query_string", b"").decode("latin-1")).get(key)
    return values[0] if values else None
