"""Dynamic batching: one queue per model, batches formed on the event loop, run on the device's one thread.

A request is *checked* before its body is read (a full queue is refused cheaply with ``Overloaded``, 503 +
Retry-After; an unreachable deadline with ``DeadlineUnreachable``), *admitted* once its body is complete (a
slot in the model's bounded queue, taken before its image is decoded, so slow uploads hold no slot), then
*submitted* with its decoded tensor. A
model's batch former takes a batch when it holds ``max_batch_size`` requests or its oldest request has
waited ``max_wait``, and only while the model has no pass in flight: under load, requests that arrive
during a pass form the next batch, so batches grow with load. When requests arrive further apart than
``max_wait`` on average (low load), waiting could only add latency, so an idle model runs at once. Requests whose
client went away or whose deadline passed are dropped when the batch is formed: they are never run. The
batch is split into forward passes by ``policy.plan_passes`` and run on the device thread by ``passes``
(failures and out-of-memory splitting there); each pass's requests are answered as soon as that pass ends.
Errors are the core's own (``service.exceptions``); ``service.errors`` maps them to HTTP.

Deadlines, ``keep_rate=auto`` and priorities are decided by ``scheduler`` with the model's latency model
(``latency``): the queue is kept in priority order, a request that cannot meet its deadline is refused
when it arrives, the max wait is cut short when waiting would break a deadline, and a batch that would
end too late lowers its auto members' keep rates or sheds its lowest-priority members.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import deque
from collections.abc import Callable

from service.exceptions import (
    DeadlineUnreachable,
    Overloaded,
    QueueTimeout,
    Unavailable,
)
from service.job import Job, Priority
from service.latency import LatencyModel
from service.metrics import Metrics
from service.modelqueue import ModelQueue, Ticket
from service.passes import fail, run_batch
from service.registry import HostedModel, Registry
from service.scheduler import Scheduler, Unreachable, refusal
from service.settings import Settings
from service.worker import DeviceWorker

__all__ = ["Batcher", "ModelQueue", "Ticket"]

log = logging.getLogger("service.batcher")


class Batcher:
    def __init__(self, registry: Registry, settings: Settings, metrics: Metrics,
                 on_fatal: Callable[[str], None] | None = None) -> None:
        self.settings = settings
        self.metrics = metrics
        self.on_fatal = on_fatal  # called when a batch former dies (the service turns unready and exits)
        self.dead: dict[str, str] = {}  # model -> why its batch former died
        self.workers = {d: DeviceWorker(d) for d in registry.devices}
        self.queues = {m.name: ModelQueue(m, self.workers[m.device], self._scheduler(m)) for m in registry}
        self._tasks: list[asyncio.Task[None]] = []

    def _scheduler(self, hosted: HostedModel) -> Scheduler:
        """Uncalibrated until warm-up (without warm-up: until the first passes are measured)."""
        s = self.settings
        buckets = hosted.runner.info.keep_rates
        snap = None if buckets is None else hosted.runner.snap
        # a compiled runner holds one graph per rate: a mixed-rate batch is one pass per rate, predicted so too
        policy = s.batch_policy if buckets is None else "grouped"
        return Scheduler(LatencyModel(z=s.latency_safety_z), hosted.gmacs, s.max_batch_size, policy,
                         s.auto_keep_rate_step, s.load_window_s, snap)

    # -- lifecycle -----------------------------------------------------------------------------------
    def start(self) -> None:
        for q in self.queues.values():
            self.metrics.init_model(q.hosted.name)
            task = asyncio.create_task(self._form_batches(q), name=f"batcher-{q.hosted.name}")
            task.add_done_callback(lambda t, q=q: self._former_ended(q, t))
            self._tasks.append(task)

    def _former_ended(self, q: ModelQueue, task: asyncio.Task[None]) -> None:
        """A batch former only ends by cancellation; one that raised is logged, its queue answered 503,
        the model marked unready and the service told (never a model that silently answers 504)."""
        if task.cancelled() or task.exception() is None:
            return
        name, error = q.hosted.name, task.exception()
        reason = f"the batch former of model {name} died: {type(error).__name__}: {error}"
        log.error(reason, exc_info=error, extra={"model": name})
        self.dead[name] = reason
        q.hosted.ready = False
        q.fail_all(Unavailable(f"model {name} is unavailable: {reason}"))
        self.metrics.queue_depth.labels(model=name).set(0)
        if self.on_fatal is not None:
            self.on_fatal(reason)

    async def warm_up(self) -> None:
        loop = asyncio.get_running_loop()
        batch = min(self.settings.max_batch_size, 8)
        for q in self.queues.values():
            start = time.perf_counter()
            cost = await loop.run_in_executor(q.worker.executor, q.worker.warm_up, q.hosted, batch)
            q.scheduler.latency = LatencyModel.from_warmup(cost, q.hosted.gmacs(1.0), batch,
                                                           z=self.settings.latency_safety_z)
            q.export_latency(self.metrics)
            q.hosted.ready = True
            log.info("warmed up %s in %.2f s", q.hosted.name, time.perf_counter() - start,
                     extra={"model": q.hosted.name, "latency_model": q.latency.info()})

    def idle(self) -> bool:
        return all(q.admitted == 0 and not q.items and not q.running for q in self.queues.values())

    async def drain(self, timeout: float) -> bool:
        """Wait until every admitted request is answered; False if ``timeout`` passed first."""
        end = time.monotonic() + timeout
        while not self.idle():
            if time.monotonic() > end:
                return False
            await asyncio.sleep(0.01)
        return True

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for worker in self.workers.values():
            await asyncio.to_thread(worker.close)

    # -- requests ------------------------------------------------------------------------------------
    def check(self, model: str, job: Job) -> None:
        """Refuse now, before the body is read: ``Overloaded`` when ``model``'s queue is full (for low priority:
        its share of the queue), or a refusal when ``job`` is already predicted to miss its deadline."""
        q = self.room(model, job.priority)
        self._check(q, job)

    def room(self, model: str, priority: Priority = Priority.NORMAL) -> ModelQueue:
        """``model``'s queue if it has room for a request of ``priority``; else ``Overloaded`` (503 with
        Retry-After)."""
        q = self.queues[model]
        limit = self.settings.queue_size
        if priority == Priority.LOW:
            limit = max(1, int(limit * self.settings.low_priority_queue_share))
        if q.admitted >= limit:
            which = "" if limit == self.settings.queue_size else " for low-priority requests"
            raise Overloaded(f"model {model} is overloaded{which} ({q.admitted} requests queued); retry later",
                             self.retry_after(q))
        return q

    def admit(self, model: str, job: Job) -> Ticket:
        """A slot in ``model``'s queue (taken once the body is complete, so slow uploads hold none), or
        ``Overloaded`` when the queue is full (see :meth:`check`)."""
        q = self.room(model, job.priority)
        q.admitted += 1
        self.metrics.admitted.labels(model=model).set(q.admitted)
        return Ticket(q, self.metrics)

    def retry_after(self, q: ModelQueue) -> int:
        """Whole seconds until the queue has likely drained (at least 1)."""
        batches = math.ceil(q.admitted / self.settings.max_batch_size)
        return max(1, math.ceil(batches * q.pass_s))

    def submit(self, ticket: Ticket, job: Job) -> Job:
        """Queue ``job`` (its image decoded into ``job.tensor``) in run order: the scheduler places it and sets
        its keep rate (``auto``: chosen now) or refuses it (deadline unreachable)."""
        q = ticket.queue
        if q.hosted.name in self.dead:
            raise Unavailable(f"model {q.hosted.name} is unavailable: {self.dead[q.hosted.name]}")
        now = time.monotonic()
        try:
            index, job.rate = q.scheduler.place(job, q.plan, now, q.busy_until if q.running else now)
        except Unreachable as e:
            raise self._refused(q, job, e) from None
        job.future, job.ticket, job.enqueued = asyncio.get_running_loop().create_future(), ticket, now
        q.arrived(job.enqueued)
        q.items.insert(index, job)
        q.plan.inserted(index, job)
        q.next_deadline = min(q.next_deadline, job.deadline)
        job.future.add_done_callback(lambda f: f.cancelled() and q.client_gone())
        self.metrics.queue_depth.labels(model=q.hosted.name).set(len(q.items))
        q.wake.set()
        return job

    def _check(self, q: ModelQueue, job: Job) -> None:
        now = time.monotonic()
        try:
            q.scheduler.check(job, q.plan, now, q.busy_until if q.running else now)
        except Unreachable as e:
            raise self._refused(q, job, e) from None

    def _refused(self, q: ModelQueue, job: Job, e: Unreachable) -> Exception:
        self.metrics.deadline_refused.labels(model=q.hosted.name, priority=job.priority.label,
                                             stage="admission").inc()
        return refusal(e, len(q.items), self.retry_after(q))

    # -- batch formation (event loop) ----------------------------------------------------------------
    async def _form_batches(self, q: ModelQueue) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._wait_for_batch(q)
            batch, predicted = self._take(q)
            if not batch:
                continue
            q.running = True
            start = time.monotonic()
            q.busy_until = start + predicted
            try:
                await loop.run_in_executor(q.worker.executor, run_batch, q, batch, q.scheduler.policy, self.metrics,
                                           loop)
            except Exception as e:  # the pass itself failed: answer InferenceFailed, keep serving
                log.exception("batch of %d failed on %s", len(batch), q.hosted.name)
                fail([p for p in batch if not p.future.done()], e)
            finally:
                q.running = False
                measured = time.monotonic() - start
                q.pass_s = 0.8 * q.pass_s + 0.2 * measured if q.pass_s else measured
                if predicted:
                    self.metrics.batch_predicted.labels(model=q.hosted.name).observe(predicted)
                    self.metrics.batch_measured.labels(model=q.hosted.name).observe(measured)

    async def _wait_for_batch(self, q: ModelQueue) -> None:
        max_wait = self.settings.max_wait_s
        while True:
            self._drop_dead(q)
            timeout = None
            if q.items:
                now = time.monotonic()
                waited = now - q.items[0].enqueued
                full = len(q.items) >= self.settings.max_batch_size
                if full or waited >= max_wait or q.gap_s > max_wait:  # no company expected in time: go now
                    return
                timeout = min(max_wait - waited, q.scheduler.slack(q.jobs(), now))  # waiting breaks no deadline
                if timeout <= 0:
                    return
            q.wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(q.wake.wait(), timeout)

    def _drop_dead(self, q: ModelQueue) -> None:
        """Remove requests whose client left (future cancelled) or whose deadline passed (QueueTimeout): never
        run. The queue is walked only when one may be there (a client left, or the earliest deadline passed)."""
        now = time.monotonic()
        if not q.items or (not q.gone and now < q.next_deadline):
            return
        live: deque[Job] = deque()
        first_removed, earliest = len(q.items), math.inf
        for i, p in enumerate(q.items):
            if p.future.done():
                p.ticket.release()
            elif p.deadline <= now:
                p.future.set_exception(QueueTimeout("request timed out waiting in the queue"))
                p.ticket.release()
            else:
                live.append(p)
                earliest = min(earliest, p.deadline)
                continue
            first_removed = min(first_removed, i)
        q.gone, q.next_deadline = 0, earliest
        if len(live) != len(q.items):
            q.items = live
            q.plan.rebuilt(first_removed)
            self.metrics.queue_depth.labels(model=q.hosted.name).set(len(live))

    def _take(self, q: ModelQueue) -> tuple[list[Job], float]:
        """The next batch (its auto keep rates lowered or members shed if it would end too late) and its
        predicted time (0 when the latency model knows nothing yet)."""
        n = min(len(q.items), self.settings.max_batch_size)
        batch = [q.items.popleft() for _ in range(n)]
        q.plan.taken(batch, len(q.items))
        now = time.monotonic()
        name = q.hosted.name
        for p in batch:
            p.ticket.release()
            p.queue_s = now - p.enqueued
            self.metrics.queue_wait.labels(model=name).observe(p.queue_s)
        self.metrics.queue_depth.labels(model=name).set(len(q.items))
        batch, shed = q.scheduler.fit_batch(batch, now)  # may lower auto members' rates
        for p in shed:
            self.metrics.deadline_refused.labels(model=name, priority=p.priority.label, stage="batch").inc()
            if not p.future.done():
                p.future.set_exception(DeadlineUnreachable("deadline cannot be met: the request's batch would finish "
                                                           "after its deadline, so it was not run"))
        for p in batch:
            if p.auto:
                self.metrics.auto_keep_rate.labels(model=name, priority=p.priority.label).observe(p.rate)
        rates = [p.rate for p in batch]
        predicted = q.scheduler.batch_seconds(rates) if batch and q.latency.calibrated else 0.0
        return batch, predicted
