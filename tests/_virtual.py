"""A virtual clock for driving the real ``service.batcher.Batcher`` deterministically: an event loop whose time
jumps to the next timer instead of waiting, and a simulated device whose passes take a known number of
(virtual) seconds. Whatever the device thread would post back to the loop (a pass's metrics, its answers, the
latency model's lesson) arrives when that pass ends, as it does on the real device thread."""

from __future__ import annotations

import asyncio
import concurrent.futures
import selectors
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from service.worker import SampleResult


class _JumpSelector(selectors.DefaultSelector):
    """Never sleeps: a select that would wait ``timeout`` seconds moves the loop's clock on by that much."""

    def __init__(self) -> None:
        super().__init__()
        self.loop: VirtualLoop | None = None

    def select(self, timeout: float | None = None) -> list[Any]:
        events = super().select(0)
        if events or timeout == 0:
            return events
        if timeout is None:  # nothing scheduled: only a real thread (asyncio.to_thread) can wake the loop
            return super().select(10.0)
        assert self.loop is not None
        self.loop.now += timeout
        return []


class VirtualLoop(asyncio.SelectorEventLoop):
    """An event loop on virtual time (``time()`` starts at 0). While ``device_at`` is set (a simulated pass
    runs), ``call_soon_threadsafe`` callbacks are held and delivered, in order, at the time it then says."""

    def __init__(self) -> None:
        selector = _JumpSelector()
        super().__init__(selector)
        selector.loop = self
        self.now = 0.0
        self.device_at: float | None = None
        self.held: list[tuple[float, Callable[..., Any], tuple[Any, ...]]] = []

    def time(self) -> float:
        return self.now

    def call_soon_threadsafe(self, callback: Callable[..., Any], *args: Any, context: Any = None) -> Any:
        if self.device_at is None:
            return super().call_soon_threadsafe(callback, *args, context=context)
        self.held.append((self.device_at, callback, args))
        return None

    def release_held(self) -> None:
        """Deliver the held callbacks at their times, one timer per time so that their order is kept."""
        by_time: dict[float, list[tuple[Callable[..., Any], tuple[Any, ...]]]] = {}
        for when, callback, args in self.held:
            by_time.setdefault(when, []).append((callback, args))
        self.held.clear()
        for when, calls in by_time.items():
            self.call_at(when, lambda calls=calls: [c(*a) for c, a in calls])


class _DeviceExecutor(concurrent.futures.Executor):
    """Runs a batch at once on the loop's thread (on virtual time); its future completes when the batch ends."""

    def __init__(self, loop: VirtualLoop) -> None:
        self.loop = loop

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> concurrent.futures.Future[Any]:
        loop, future = self.loop, concurrent.futures.Future()
        loop.device_at = loop.time()
        try:
            result, error = fn(*args, **kwargs), None
        except Exception as e:  # handed to the awaiting batch former, as a real executor does
            result, error = None, e
        end, loop.device_at = loop.device_at, None
        loop.release_held()
        loop.call_at(end, lambda: future.set_exception(error) if error else future.set_result(result))
        return future


@dataclass
class SimDevice:
    """A ``DeviceWorker`` whose pass over ``items`` takes ``seconds(rates, start)`` of virtual time."""

    loop: VirtualLoop
    seconds: Callable[[list[float], float], float]
    passes: list[tuple[float, list[float]]] = field(default_factory=list)  # (start, rates) of each pass

    def __post_init__(self) -> None:
        self.executor = _DeviceExecutor(self.loop)

    def forward(self, hosted: Any, items: list[Any]) -> list[SampleResult]:
        assert self.loop.device_at is not None
        rates = [p.rate for p in items]
        self.passes.append((self.loop.device_at, rates))
        s = self.seconds(rates, self.loop.device_at)
        self.loop.device_at += s
        return [SampleResult([0], [1.0], round(100 * r), None, s, len(items)) for r in rates]

    def release_memory(self) -> None:
        pass

    def close(self) -> None:
        pass


@dataclass
class SimModel:
    """What the batcher reads of a hosted model (name, device, GMACs per image, runner's rate buckets)."""

    name: str
    gmacs: Callable[[float], float]
    ready: bool = True
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def runner(self) -> Any:
        return type("Runner", (), {"info": type("Info", (), {"keep_rates": None})()})()
