"""Latency-aware scheduling over one model's batching queue: deadlines, ``keep_rate=auto`` and priorities.

Pure decisions on clock values passed in (the batcher passes ``time.monotonic()``, tests a fake clock),
made with the latency model's predictions (``service.latency``).

The plan. The queue is kept in run order: by priority class (high, normal, low), then by arrival. The
batcher takes the first ``max_batch`` jobs whenever the device is free, so the plan is the run order cut
into chunks of ``max_batch``, each starting when the one before ends (the first when the pass in flight
ends), each taking what the batch-formation policy's passes over its keep rates are predicted to take.
A job's predicted finish is the end of its chunk, the span from now multiplied by the model's ``safety``.

- Placing a request (when it is admitted, and again once its image is decoded): it goes behind every
  queued job of its class or a higher one. A fixed-rate request is refused when its predicted finish is
  past its deadline. ``keep_rate=auto`` takes the highest keep rate on a grid (1.0, 0.95, ... down to its
  ``min_keep_rate``) predicted to finish by its deadline or, without one, by the latency target; when not
  even ``min_keep_rate`` meets the deadline it is refused. Refused means answered at once, never run late.
- Forming a batch: its predicted end must be within every member's deadline. If not, the auto members
  are lowered (the highest common cap on their rates that fits); if even their minimum rates do not fit,
  the late member of the lowest priority is shed and the rest tried again.
- Waiting for a fuller batch: the batcher's max wait is cut so that no queued job spends more than half
  of its slack (from its arrival to the latest start that still meets its deadline, or auto's target)
  waiting for company; the other half absorbs what the prediction misses.

Low-priority work is thus degraded and shed first: it plans behind the rest (lower auto rates, refused
first), high-priority arrivals overtake it, and it is the first shed from a batch that does not fit.
Keep rates chosen under load are not raised later: new arrivals see the shorter queue and choose higher
rates themselves, so the rates rise again as soon as the load falls.
"""

from __future__ import annotations

import bisect
import functools
import math
from collections.abc import Callable, Sequence
from typing import Protocol

from service.exceptions import DeadlineUnreachable
from service.job import Job
from service.latency import LatencyModel, OfferedLoad
from service.policy import plan_passes

__all__ = ["Scheduler", "Unreachable", "insert_at", "rate_grid", "refusal"]

UTILIZATION = 0.9  # auto keeps the device at most this busy with the recent arrivals
WAIT_SHARE = 0.5  # a job waits for a fuller batch at most this share of its slack


class Unreachable(Exception):
    """The job is predicted to finish after its deadline: ``finish`` in this queue, ``idle_finish`` alone."""

    def __init__(self, now: float, finish: float, deadline: float, idle_finish: float) -> None:
        super().__init__(f"predicted to finish {(finish - now) * 1e3:.0f} ms from now, "
                         f"deadline {(deadline - now) * 1e3:.0f} ms")
        self.now, self.finish, self.deadline, self.idle_finish = now, finish, deadline, idle_finish

    @property
    def impossible(self) -> bool:
        """Not even an idle model would make it: retrying will not help, only a longer deadline."""
        return self.idle_finish > self.deadline


def refusal(e: Unreachable, queued: int, retry_after_s: int) -> DeadlineUnreachable:
    """The refusal of a request at arrival: retryable (``retry_after_s``) only when the load is the reason.
    A request without ``deadline_ms`` has the request timeout as its deadline."""
    left, eta = (e.deadline - e.now) * 1e3, (e.finish - e.now) * 1e3
    what = "the request cannot be answered within its deadline (deadline_ms, or the request timeout)"
    if left <= 0:
        return DeadlineUnreachable(f"{what}: it passed before the request could be queued (reading and decoding it "
                                   "took longer)")
    if e.impossible:
        return DeadlineUnreachable(f"{what} even by an idle model: {left:.1f} ms left, one pass is predicted to "
                                   f"take {(e.idle_finish - e.now) * 1e3:.1f} ms; allow a longer deadline or a lower "
                                   "keep rate")
    return DeadlineUnreachable(f"{what} under the current load: predicted to finish in {eta:.0f} ms ({queued} "
                               f"requests queued), deadline in {left:.0f} ms; retry later, allow a longer deadline_ms, "
                               "or use keep_rate=auto (or a lower min_keep_rate)", retry_after_s)


def insert_at(queue: Sequence[Job], priority: int) -> int:
    """Index a new job of ``priority`` takes in ``queue`` (run order): behind its class and higher ones."""
    return bisect.bisect_right([j.priority for j in queue], priority)


class RunOrder(Protocol):
    """What placing a job needs of a queue in run order (``ListOrder`` here; ``modelqueue.QueuePlan`` keeps
    it up to date incrementally, so that placing costs O(max_batch), not a walk of the whole queue)."""

    def index(self, priority: int) -> int:
        """Where a new job of ``priority`` goes (:func:`insert_at`)."""
        ...

    def seconds_before(self, chunks: int) -> float:
        """Predicted seconds of the first ``chunks`` chunks of ``max_batch`` jobs (before any safety factor)."""
        ...

    def rates(self, start: int, stop: int) -> list[float]:
        """Keep rates of the jobs at ``start:stop``."""
        ...


class ListOrder:
    """:class:`RunOrder` of a plain list of jobs, computed on each call."""

    def __init__(self, queue: Sequence[Job], scheduler: Scheduler) -> None:
        self.queue = queue
        self.scheduler = scheduler

    def index(self, priority: int) -> int:
        return insert_at(self.queue, priority)

    def seconds_before(self, chunks: int) -> float:
        size = self.scheduler.max_batch
        return sum(self.scheduler.batch_seconds(self.rates(a, a + size)) for a in range(0, chunks * size, size))

    def rates(self, start: int, stop: int) -> list[float]:
        return [j.rate for j in self.queue[start:stop]]


class Scheduler:
    def __init__(
        self, latency: LatencyModel, gmacs: Callable[[float], float], max_batch: int,
        policy: str = "auto", step: float = 0.05, window: float = 2.0,
        snap: Callable[[float], float] | None = None,
    ) -> None:
        self.latency = latency
        self.gmacs = gmacs  # per-image GMACs at a keep rate
        self.snap = snap  # the runner's: the rate that runs for a requested one (None: any rate runs)
        self.max_batch = max_batch
        self.policy = policy
        self.step = step
        self.load = OfferedLoad(window)

    def grid(self, min_rate: float) -> tuple[float, ...]:
        rates = rate_grid(min_rate, self.step)
        return rates if self.snap is None else tuple(sorted({self.snap(r) for r in rates}, reverse=True))

    def batch_seconds(self, rates: Sequence[float]) -> float:
        """Predicted time of one batch at these keep rates: its passes as the policy splits them, summed."""
        cost = self.latency.cost
        assert cost is not None
        passes = plan_passes(rates, self.gmacs, cost, self.policy)
        return sum(cost.seconds(sum(self.gmacs(rates[i]) for i in p)) for p in passes)

    def _finish(self, now: float, end: float) -> float:
        return now + self.latency.safety * max(end - now, 0.0)

    # -- decisions -----------------------------------------------------------------------------------
    def place(self, job: Job, queue: Sequence[Job] | RunOrder, now: float, busy_until: float) -> tuple[int, float]:
        """Where ``job`` goes in ``queue`` (jobs in run order, or a :class:`RunOrder`) and the keep rate it runs
        at (auto: chosen here, once); raises :class:`Unreachable`. ``busy_until``: when the pass in flight is
        predicted to end (``now`` or earlier when idle). The request counts in the offered load once: here,
        placed or refused."""
        try:
            i, rate = self._place(job, queue, now, busy_until, choose=True)
        except Unreachable:
            self.load.add(now, job.priority, job.auto, self.gmacs(job.floor))
            raise
        self.load.add(now, job.priority, job.auto, self.gmacs(rate))
        return i, rate

    def check(self, job: Job, queue: Sequence[Job] | RunOrder, now: float, busy_until: float) -> None:
        """Raises :class:`Unreachable` when ``job`` would miss its deadline even at its lowest rate (at
        admission, before its image is read: the rate is chosen by ``place`` once it is decoded)."""
        try:
            self._place(job, queue, now, busy_until, choose=False)
        except Unreachable:
            self.load.add(now, job.priority, job.auto, self.gmacs(job.floor))
            raise

    def sustainable(self, job: Job, now: float) -> float:
        """The highest keep rate at which the device keeps up with the recent arrivals of the job's class
        and higher ones, auto requests of its class all at that rate (``UTILIZATION`` at most)."""
        cost = self.latency.cost
        assert cost is not None
        others, others_gmacs, autos = self.load.demand(now, job.priority)
        autos += 1  # this one
        per_request = cost.overhead_s / self.max_batch  # full batches: the pass overhead is shared
        budget = UTILIZATION * self.load.window / self.latency.safety
        room = budget - (others + autos) * per_request - cost.seconds_per_gmac * others_gmacs
        max_gmacs = room / (autos * cost.seconds_per_gmac)
        return _highest(self.grid(job.min_rate), lambda r: self.gmacs(r) <= max_gmacs)

    def _place(self, job: Job, queue: Sequence[Job] | RunOrder, now: float, busy_until: float, choose: bool
               ) -> tuple[int, float]:
        order = queue if hasattr(queue, "seconds_before") else ListOrder(queue, self)  # type: ignore[arg-type]
        i = order.index(job.priority)
        if not self.latency.calibrated:
            return i, job.rate  # nothing to predict with yet: the deadline is only enforced by the clock
        size = self.max_batch
        first = i - i % size  # where the job's chunk starts
        start = max(now, busy_until) + order.seconds_before(first // size)
        mates = order.rates(first, first + size - 1)  # the job goes at i, among these

        def finish(rate: float) -> float:
            return self._finish(now, start + self.batch_seconds([*mates, rate]))

        rate = job.floor  # the check: finishing gets later with the rate, so the floor decides
        if job.auto and choose:
            ceiling = self.sustainable(job, now)
            rate = _highest([r for r in self.grid(job.min_rate) if r <= ceiling], lambda r: finish(r) <= job.due)
        end = finish(rate)
        if end > job.deadline:
            raise Unreachable(now, end, job.deadline, self._finish(now, now + self.batch_seconds([job.floor])))
        return i, rate

    def plan(self, queue: Sequence[Job], now: float, busy_until: float) -> list[float]:
        """Predicted finish of every job in ``queue`` (run order)."""
        out: list[float] = []
        start = max(now, busy_until)
        for a in range(0, len(queue), self.max_batch):
            chunk = queue[a : a + self.max_batch]
            start += self.batch_seconds([j.rate for j in chunk])
            out += [self._finish(now, start)] * len(chunk)
        return out

    def slack(self, queue: Sequence[Job], now: float) -> float:
        """How long the next batch may still wait for company: until some queued job has spent half of
        its slack (arrival to the latest start that meets its deadline or target, if the batch went now)."""
        if not queue or not self.latency.calibrated:
            return math.inf
        finishes = self.plan(queue, now, now)
        waits = (j.arrival + WAIT_SHARE * (j.due - (f - now) - j.arrival) - now for j, f in zip(queue, finishes,
                                                                                                 strict=True))
        return max(min(waits), 0.0)

    def fit_batch(self, batch: Sequence[Job], now: float) -> tuple[list[Job], list[Job]]:
        """(jobs to run, jobs to shed) for a batch going now; lowers auto members' ``rate`` when needed."""
        run, shed = list(batch), []
        if not self.latency.calibrated:
            return run, shed
        while run:
            deadline = min(j.deadline for j in run)
            top = max((j.rate for j in run if j.auto), default=1.0)
            caps = [c for c in self.grid(min((j.min_rate for j in run if j.auto), default=1.0)) if c <= top]
            cap = _highest(caps, functools.partial(self._capped_fits, run, now, deadline))
            if self._capped_fits(run, now, deadline, cap):
                for j in run:
                    j.rate = _capped(j, cap)
                return run, shed
            late_at = self._finish(now, now + self.batch_seconds([_capped(j, cap) for j in run]))
            victim = max((j for j in run if j.deadline < late_at), key=lambda j: (j.priority, j.rate))
            run.remove(victim)
            shed.append(victim)
        return run, shed

    def info(self, rates: Sequence[float] = (1.0, 0.7, 0.5, 0.25)) -> dict[str, object]:
        """For ``/models``: the latency model and the predicted time of a full batch at a few keep rates (None
        while uncalibrated: without warm-up, until the first pass is measured)."""
        predicted = None
        if self.latency.calibrated:
            predicted = {f"{r:.2f}": round(self.batch_seconds([r] * self.max_batch) * 1e3, 3) for r in rates}
        return {**self.latency.info(), "max_batch_size": self.max_batch, "predicted_batch_ms": predicted}

    def _capped_fits(self, run: Sequence[Job], now: float, deadline: float, cap: float) -> bool:
        """Whether ``run`` ends by ``deadline`` with its auto members' rates capped at ``cap``."""
        return self._finish(now, now + self.batch_seconds([_capped(j, cap) for j in run])) <= deadline


def _capped(job: Job, cap: float) -> float:
    return max(min(job.rate, cap), job.min_rate) if job.auto else job.rate


@functools.lru_cache(maxsize=256)
def rate_grid(min_rate: float, step: float = 0.05) -> tuple[float, ...]:
    """Keep rates auto chooses from, highest first: 1.0, 1.0 - step, ... down to ``min_rate`` itself."""
    n = math.floor((1.0 - min_rate) / step + 1e-9)
    rates = [round(1.0 - i * step, 6) for i in range(n + 1)]
    if rates[-1] > min_rate + 1e-9:
        rates.append(min_rate)
    return tuple(rates)


def _highest(grid: Sequence[float], ok: Callable[[float], bool]) -> float:
    """The first (highest) value of ``grid`` (descending) for which ``ok`` holds, assuming ``ok`` turns
    true at some point and stays true; the last value when it never holds."""
    lo, hi = 0, len(grid) - 1
    while lo < hi:
        mid = (lo + hi) // 2
        if ok(grid[mid]):
            hi = mid
        else:
            lo = mid + 1
    return grid[lo]
