"""One hosted model's batching queue: its pending requests in run order, admission tickets, and the
scheduler (with its latency model) that decides deadlines, ``keep_rate=auto`` and priorities for it."""

from __future__ import annotations

import asyncio
import math
from collections import deque

from service.job import Job
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
