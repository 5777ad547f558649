"""One hosted model's batching queue: its pending requests in run order, admission tickets, and the
scheduler (with its latency model) that decides deadlines, ``keep_rate=auto`` and priorities for it.

:class:`QueuePlan` keeps what placing a request needs up to date as the queue changes (jobs per priority
class; the predicted time of each chunk of ``max_batch`` jobs, recomputed only from the first chunk a change
touched, and all of it only when the latency model has learnt from a pass), so the event loop's work per
request does not grow with the queue's length.
"""

from __future__ import annotations

import asyncio
import itertools
import math
from collections import deque
from collections.abc import Iterable

from service.job import Job, Priority
from service.latency import LatencyModel
from service.metrics import Metrics, rate_label
from service.registry import HostedModel
from service.scheduler import Scheduler
from service.worker import DeviceWorker, SampleResult


class ModelQueue:
    def __init__(self, hosted: HostedModel, worker: DeviceWorker, scheduler: Scheduler) -> None:
        self.hosted = hosted
        self.worker = worker
        self.scheduler = scheduler  # its latency model is calibrated at warm-up, then learns from every pass
        self.items: deque[Job] = deque()  # in run order: by priority, then arrival
        self.plan = QueuePlan(self)
        self.gone = 0  # queued requests whose client left (future cancelled): dropped at the next wake
        self.next_deadline = math.inf  # no queued request's deadline is earlier (a lower bound)
        self.admitted = 0  # admitted and not yet in a batch: decoding, or waiting in ``items``
        self.wake = asyncio.Event()
        self.running = False
        self.busy_until = 0.0  # when the batch in flight is predicted to end
        self.pass_s = 0.0  # moving average of a batch's time, for Retry-After
        self.gap_s = math.inf  # moving average of the time between arrivals
        self.last_arrival: float | None = None

    def arrived(self, now: float) -> None:
        if self.last_arrival is not None:
            gap = now - self.last_arrival
            self.gap_s = gap if math.isinf(self.gap_s) else 0.7 * self.gap_s + 0.3 * gap
        self.last_arrival = now

    def fail_all(self, error: Exception) -> None:
        """Answer every queued request with ``error`` and free their slots (the queue can no longer run)."""
        while self.items:
            p = self.items.popleft()
            p.ticket.release()
            if not p.future.done():
                p.future.set_exception(error)

    def client_gone(self) -> None:
        self.gone += 1

    @property
    def latency(self) -> LatencyModel:
        return self.scheduler.latency

    def jobs(self) -> list[Job]:
        return list(self.items)

    def record(self, rates: list[float], results: list[SampleResult], metrics: Metrics) -> None:
        """A pass's metrics: its size and time, tokens by keep rate (on the event loop, before its answers)."""
        name = self.hosted.name
        metrics.batch_size.labels(model=name).observe(len(results))
        metrics.batch_inference.labels(model=name).observe(results[0].inference_s)
        per_rate: dict[str, int] = {}
        for rate, r in zip(rates, results, strict=True):
            label = rate_label(rate)
            per_rate[label] = per_rate.get(label, 0) + r.tokens
        for label, tokens in per_rate.items():
            metrics.tokens.labels(model=name, keep_rate=label).inc(tokens)

    def learn(self, rates: list[float], seconds: float, metrics: Metrics) -> None:
        """The latency model learns from a measured pass (on the event loop)."""
        self.latency.observe(sum(self.hosted.gmacs(r) for r in rates), seconds)
        self.export_latency(metrics)

    def export_latency(self, metrics: Metrics) -> None:
        c = self.latency.cost
        if c is not None:
            metrics.set_latency_model(self.hosted.name, c.overhead_s, c.seconds_per_gmac, self.latency.error)


class QueuePlan:
    """:class:`service.scheduler.RunOrder` of a :class:`ModelQueue`, kept up to date incrementally."""

    def __init__(self, queue: ModelQueue) -> None:
        self.queue = queue
        self.counts = [0] * len(Priority)
        self._ends: list[float] = []  # predicted end of chunks 0, 1, ... (a valid prefix), from ``_base``
        self._base = 0.0
        self._cost: object = None  # the latency line ``_ends`` was computed with
        self.chunks_computed = 0  # batch predictions made (for tests: work per request)

    def index(self, priority: int) -> int:
        return sum(self.counts[: priority + 1])

    def seconds_before(self, chunks: int) -> float:
        scheduler = self.queue.scheduler
        if scheduler.latency.cost is not self._cost:  # the line moved: every chunk's time did too
            self._cost = scheduler.latency.cost
            self._ends.clear()
        size = scheduler.max_batch
        while len(self._ends) < chunks:
            k = len(self._ends)
            seconds = scheduler.batch_seconds(self.rates(k * size, (k + 1) * size))
            self._ends.append((self._ends[-1] if self._ends else self._base) + seconds)
            self.chunks_computed += 1
        return (self._ends[chunks - 1] if chunks else self._base) - self._base

    def rates(self, start: int, stop: int) -> list[float]:
        return [j.rate for j in itertools.islice(self.queue.items, start, stop)]

    def inserted(self, index: int, job: Job) -> None:
        self.counts[job.priority] += 1
        del self._ends[index // self.queue.scheduler.max_batch :]

    def taken(self, jobs: Iterable[Job], rest: int) -> None:
        """The first jobs of the queue left for a batch; ``rest`` are still queued."""
        n = 0
        for j in jobs:
            self.counts[j.priority] -= 1
            n += 1
        if n == self.queue.scheduler.max_batch and self._ends:  # a whole chunk: the others keep their times
            self._base = self._ends.pop(0)
        else:
            self._ends.clear()
        if not rest:
            self._ends.clear()

    def rebuilt(self, first_change: int) -> None:
        """Requests were removed from anywhere at or after ``first_change``: recount."""
        self.counts = [0] * len(Priority)
        for j in self.queue.items:
            self.counts[j.priority] += 1
        del self._ends[first_change // self.queue.scheduler.max_batch :]


class Ticket:
    """A request's admission slot; released when its batch is formed or when the request ends early."""

    def __init__(self, queue: ModelQueue, metrics: Metrics) -> None:
        self.queue = queue
        self.metrics = metrics
        self.released = False

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.queue.admitted -= 1
            self.metrics.admitted.labels(model=self.queue.hosted.name).set(self.queue.admitted)

    def __enter__(self) -> Ticket:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
