"""The running service: models, batcher, decode pool, readiness and draining, and the one inference path
that ``/classify`` and the Open Inference Protocol routes share."""

from __future__ import annotations

import asyncio
import gc
import logging
import math
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from service.batcher import Batcher
from service.decodepool import DecodePool
from service.exceptions import ClientGone, Draining, InvalidRequest, NotReady, QueueTimeout, Unavailable
from service.job import Ask, Job
from service.metrics import Metrics
from service.registry import HostedModel, Registry, load_registry
from service.settings import Settings
from service.worker import SampleResult, WarmupError

log = logging.getLogger("service.runtime")


@dataclass(frozen=True)
class Call:
    """What the inference path needs from the request it serves (built by ``service.edge.call_of``)."""

    started: float  # clock seconds (time.monotonic) the request arrived
    gone: Callable[[], Awaitable[None]]  # returns when the client has disconnected
    log: dict[str, object]  # fields for the request's access-log line
    label: Callable[[str, float | None], None]  # the request metrics' model and keep rate labels


@dataclass(frozen=True)
class Answer:
    model: HostedModel
    job: Job  # the request as it ran: its keep rate, its time in the queue
    result: SampleResult
    decode_s: float
    total_s: float

    @property
    def keep_rate(self) -> float:
        return self.job.rate

    @property
    def queue_s(self) -> float:
        return self.job.queue_s


class Service:
    def __init__(self, settings: Settings, registry: Registry | None = None) -> None:
        self.settings = settings
        self.registry = registry
        self.metrics = Metrics()
        self.batcher: Batcher | None = None
        self.decode_pool = DecodePool(settings.decode_threads or min(4, os.cpu_count() or 1))
        self.warmed = False
        self.draining = False
        self._drain_task: asyncio.Task[bool] | None = None
        self._warm_task: asyncio.Task[None] | None = None
        self.failure: str | None = None  # why a background task died: unready for good
        self.exit_code = 0  # what the process should exit with after ``failure``
        self.on_fatal: Callable[[], None] | None = None  # the server's exit, called once on failure

    # -- lifecycle -----------------------------------------------------------------------------------
    @property
    def ready(self) -> bool:
        return self.warmed and not self.draining and self.failure is None

    async def start(self) -> None:
        """Load (unless given), start the batch formers, and warm up in the background (/readyz waits)."""
        if self.registry is None:
            self.registry = await asyncio.to_thread(load_registry, self.settings)
        self.metrics.set_build_info(",".join(sorted({m.runner.info.backend for m in self.registry})))
        self.batcher = Batcher(self.registry, self.settings, self.metrics, on_fatal=self.fail)
        self.batcher.start()
        self._warm_task = asyncio.create_task(self._warm_up(), name="warm-up")

    async def _warm_up(self) -> None:
        assert self.batcher is not None and self.registry is not None
        if self.settings.warmup:
            try:
                await self.batcher.warm_up()  # marks each model ready once it has warmed up
            except Exception as e:
                log.error("warm-up failed: %s", e, exc_info=e)
                self.fail(f"warm-up failed: {type(e).__name__}: {e}", 2 if isinstance(e, WarmupError) else 1)
                return
        else:
            for m in self.registry:
                m.ready = True
        # The ~400k objects of torch, timm, the models and the app live as long as the process: frozen, a full
        # (generation 2) collection skips them instead of holding the GIL for ~100-300 ms mid-pass.
        gc.freeze()
        self.warmed = True
        self.metrics.ready.set(0 if self.draining else 1)
        log.info("ready", extra={"models": list(self.registry.models)})

    def fail(self, reason: str, exit_code: int = 1) -> None:
        """A background task died: readiness false with ``reason`` from now on, and the server exits (when
        run by ``evit-serve``) with ``exit_code``, never silently."""
        if self.failure is not None:
            return
        self.failure, self.exit_code = reason, exit_code
        self.metrics.ready.set(0)
        if self.on_fatal is not None:
            self.on_fatal()

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
        self.decode_pool.shutdown()

    def check_room(self, hosted: HostedModel) -> None:
        """503 before a body is read when the service is not accepting or ``hosted``'s queue is full."""
        self.check_accepting()
        assert self.batcher is not None
        self.batcher.room(hosted.name)

    def check_accepting(self) -> None:
        if self.failure is not None:
            raise Unavailable(f"the service is unavailable: {self.failure}")
        if self.draining:
            raise Draining("the service is shutting down")
        if not self.warmed:
            raise NotReady("the service is not ready yet (loading or warming up)")

    # -- the inference path --------------------------------------------------------------------------
    def model(self, name: str | None) -> HostedModel:
        if self.registry is None:
            raise NotReady("the service is not ready yet (loading models)")
        return self.registry.get(name)

    async def infer(
        self, call: Call, hosted: HostedModel, keep_rate: float | None, top_k: int, want_kept: bool,
        read: Callable[[], Awaitable[bytes]], ask: Ask | None = None,
    ) -> Answer:
        """Admit, read and decode the image, queue it, and wait for its answer (or QueueTimeout / ClientGone).

        ``ask``: deadline, ``keep_rate=auto`` and priority (see ``service.scheduler``); the answer's
        ``keep_rate`` is the rate the request ran at."""
        ask = ask or Ask()
        rate = hosted.runner.snap(hosted.default_keep_rate if keep_rate is None else keep_rate)
        call.log.update(model=hosted.name, keep_rate="auto" if ask.auto else rate, priority=ask.priority.label,
                        deadline_ms=ask.deadline_ms)
        call.label(hosted.name, None if ask.auto else rate)
        if top_k > hosted.num_classes:
            raise InvalidRequest(f"top_k={top_k} is more than the model's {hosted.num_classes} classes")
        self.check_accepting()
        assert self.batcher is not None
        started = call.started
        job = self._job(ask, rate, started)
        job.top_k, job.want_kept = top_k, want_kept
        self.batcher.check(hosted.name, job)  # refused before the body is read
        data = await read()
        self.check_accepting()
        with self.batcher.admit(hosted.name, job) as ticket:  # the slot is taken once the body is complete
            t0 = time.monotonic()
            try:
                job.tensor = await self.decode_pool.run(hosted.preprocess, data, job.deadline)  # QueueTimeout past it
            finally:
                decode_s = time.monotonic() - t0
                self.metrics.decode_duration.labels(model=hosted.name).observe(decode_s)
            if t0 + decode_s >= job.deadline:
                raise QueueTimeout("request timed out (deadline or request timeout) before it could be queued")
            result = await self._wait(call.gone, self.batcher.submit(ticket, job))
        total = time.monotonic() - started
        call.label(hosted.name, job.rate)
        call.log.update(keep_rate=job.rate, batch_size=result.batch_size, queue_ms=round(job.queue_s * 1000, 3),
                        inference_ms=round(result.inference_s * 1000, 3))
        return Answer(hosted, job, result, decode_s, total)

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
        return Job(rate, deadline, ask.priority, ask.auto, floor if ask.auto else rate, target, started)

    async def _wait(self, gone: Callable[[], Awaitable[None]], item: Job) -> SampleResult:
        assert item.future is not None  # set by submit
        watcher = asyncio.ensure_future(gone())
        try:
            timeout = max(item.deadline - time.monotonic(), 0.0)
            done, _ = await asyncio.wait({item.future, watcher}, timeout=timeout,
                                         return_when=asyncio.FIRST_COMPLETED)
            if item.future.done():
                return item.future.result()  # the batcher's failure (QueueTimeout, InferenceFailed, ...) raises here
            if watcher in done:
                raise ClientGone("client closed the connection; request dropped")
            raise QueueTimeout(f"no answer within the request's deadline or the request timeout "
                               f"({self.settings.request_timeout_s:g} s)")
        finally:
            watcher.cancel()
            item.future.cancel()  # no-op when answered; otherwise the batcher drops it unrun
