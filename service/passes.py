"""One formed batch on the device thread: split into passes by the cost-model policy, each pass run by the
model's runner (through the device worker), its answers and metrics handed back to the event loop. A pass
that fails answers only its own requests (``InferenceFailed``); one that runs out of device memory is retried
in halves, down to single samples, and what still does not fit gets ``OutOfMemory`` (retryable)."""

from __future__ import annotations

import asyncio
import logging

import torch

from service.exceptions import InferenceFailed, OutOfMemory
from service.job import Job
from service.metrics import Metrics
from service.modelqueue import ModelQueue
from service.policy import plan_passes
from service.worker import SampleResult

log = logging.getLogger("service.batcher")


def run_batch(q: ModelQueue, batch: list[Job], policy: str, metrics: Metrics, loop: asyncio.AbstractEventLoop) -> None:
    """Runs on ``q``'s device thread: the batch's passes, in the order ``plan_passes`` gives them."""
    passes = plan_passes([p.rate for p in batch], q.hosted.gmacs, q.latency.cost, policy)
    for indices in passes:
        items = [batch[i] for i in indices if not batch[i].future.done()]  # clients gone since forming
        if items:
            _forward(q, items, metrics, loop)


def _forward(q: ModelQueue, items: list[Job], metrics: Metrics, loop: asyncio.AbstractEventLoop) -> None:
    """One pass; on out-of-memory, the two halves separately (recursively); failures answer only ``items``."""
    hosted = q.hosted
    try:
        results = q.worker.forward(hosted, items)
    except torch.cuda.OutOfMemoryError:
        results = None  # retried below, once the exception (and the pass's tensors it holds) is gone
    except Exception as e:
        log.exception("forward pass of %d failed on %s", len(items), hosted.name)
        loop.call_soon_threadsafe(fail, items, e)
        return
    if results is not None:
        loop.call_soon_threadsafe(_done, q, items, results, metrics)  # one wake-up of the event loop per pass
        return
    q.worker.release_memory()
    if len(items) == 1:
        log.error("out of memory on %s for a single sample", hosted.name, extra={"model": hosted.name})
        loop.call_soon_threadsafe(fail, items, torch.cuda.OutOfMemoryError("a single sample"))
        return
    half = len(items) // 2
    log.warning("out of memory for a pass of %d on %s: retrying as %d + %d", len(items), hosted.name,
                half, len(items) - half, extra={"model": hosted.name})
    _forward(q, items[:half], metrics, loop)
    _forward(q, items[half:], metrics, loop)


def _done(q: ModelQueue, items: list[Job], results: list[SampleResult], metrics: Metrics) -> None:
    """On the event loop: the pass's metrics, then its answers, then what the latency model learns from it."""
    rates = [p.rate for p in items]
    q.record(rates, results, metrics)
    resolve(items, results)
    q.learn(rates, results[0].inference_s, metrics)


def resolve(items: list[Job], results: list[SampleResult]) -> None:
    for p, r in zip(items, results, strict=True):
        if not p.future.done():
            p.future.set_result(r)


def fail(items: list[Job], error: Exception) -> None:
    for p in items:
        if p.future.done():
            continue
        if isinstance(error, torch.cuda.OutOfMemoryError):  # a capacity problem: worth retrying later
            p.future.set_exception(OutOfMemory("inference ran out of device memory, even for this image "
                                               "alone; retry later"))
        else:
            p.future.set_exception(InferenceFailed(f"inference failed: {type(error).__name__}"))
