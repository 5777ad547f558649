"""The event loop's scheduling work per request does not grow with the queue: placing a request against a
queue of 1,024 makes O(1) batch predictions (``QueuePlan``; a request that overtakes queued ones makes the
chunks behind it be predicted again, once), with the same answers as the full walk (``ListOrder``), and the
batcher's dead-request sweep does not walk the queue when nothing can be dead.
Work is counted (batch predictions, queue walks), not timed."""

from __future__ import annotations

import math
import random
from collections import deque
from types import SimpleNamespace

from service.batcher import Batcher
from service.job import Job
from service.latency import LatencyModel, OfferedLoad
from service.modelqueue import QueuePlan
from service.scheduler import ListOrder, Scheduler

BATCH = 16
QUEUED = 1024


def gmacs(rate: float) -> float:
    return 0.2 + 1.0 * rate


def counting_scheduler() -> tuple[Scheduler, list[int]]:
    s = Scheduler(LatencyModel([(gmacs(1.0), 0.01), (BATCH * gmacs(1.0), 0.05)]), gmacs, BATCH)
    calls = [0]
    predict = s.batch_seconds

    def counted(rates):
        calls[0] += 1
        return predict(rates)

    s.batch_seconds = counted  # type: ignore[method-assign]
    return s, calls


def fill(plan: QueuePlan, queue: SimpleNamespace, sched: Scheduler, n: int, seed: int = 0,
         priorities: tuple[int, ...] = (1,)) -> None:
    """Place and insert ``n`` jobs of mixed rates (and ``priorities``), as ``Batcher.submit`` does."""
    rng = random.Random(seed)
    for _ in range(n):
        job = Job(rng.choice([1.0, 0.7, 0.5]), math.inf, priority=rng.choice(priorities))
        index, job.rate = sched.place(job, plan, 0.0, 0.0)
        queue.items.insert(index, job)
        plan.inserted(index, job)


def test_placing_costs_o1_predictions_and_matches_the_full_walk() -> None:
    sched, calls = counting_scheduler()
    queue = SimpleNamespace(items=deque(), scheduler=sched)
    plan = QueuePlan(queue)
    fill(plan, queue, sched, QUEUED)
    assert calls[0] <= 3 * QUEUED  # a few predictions per request; a full walk makes ~QUEUED**2 / (2 * BATCH)
    fill(plan, queue, sched, QUEUED // 4, seed=2, priorities=(0, 1, 1, 2))  # overtaking: chunks behind recomputed

    jobs = list(queue.items)
    sched.place(Job(1.0, math.inf, priority=2), plan, 0.0, 0.0)  # predicts the chunks left stale
    for priority in (0, 1, 2):
        for rate in (1.0, 0.5):
            probe = Job(rate, math.inf, priority=priority)
            calls[0] = 0
            incremental = sched.place(probe, plan, 0.0, 0.0)
            cached = calls[0]
            walked = sched.place(probe, ListOrder(jobs, sched), 0.0, 0.0)
            assert incremental == walked
            assert cached <= 2  # the job's own chunk (the chunks before it are cached)

    calls[0] = 0
    sched.latency.observe(gmacs(1.0) * BATCH, 0.08)  # a measured pass moves the line: recompute once
    sched.place(Job(1.0, math.inf, priority=2), plan, 0.0, 0.0)
    assert calls[0] <= len(queue.items) // BATCH + 2
    calls[0] = 0
    sched.place(Job(1.0, math.inf, priority=2), plan, 0.0, 0.0)
    assert calls[0] <= 2


def test_taking_a_batch_keeps_the_other_chunks_cached() -> None:
    sched, calls = counting_scheduler()
    queue = SimpleNamespace(items=deque(), scheduler=sched)
    plan = QueuePlan(queue)
    fill(plan, queue, sched, QUEUED, seed=1, priorities=(0, 1, 2))
    sched.place(Job(1.0, math.inf, priority=2), plan, 0.0, 0.0)  # everything cached
    taken = [queue.items.popleft() for _ in range(BATCH)]
    plan.taken(taken, len(queue.items))
    calls[0] = 0
    probe = Job(1.0, math.inf, priority=2)
    assert sched.place(probe, plan, 0.0, 0.0) == sched.place(
        probe, ListOrder(list(queue.items), sched), 0.0, 0.0)
    assert calls[0] <= 2 + QUEUED // BATCH + 1  # the walk's own predictions; the plan made at most 2


class CountingDeque(deque):
    walks = 0

    def __iter__(self):
        CountingDeque.walks += 1
        return super().__iter__()


def test_dead_request_sweep_skips_the_queue_when_nothing_can_be_dead() -> None:
    loop_future = SimpleNamespace(done=lambda: False)
    items = CountingDeque(Job(1.0, 1e12, future=loop_future) for _ in range(QUEUED))  # type: ignore[arg-type]
    q = SimpleNamespace(items=items, gone=0, next_deadline=1e12)
    CountingDeque.walks = 0
    for _ in range(100):
        Batcher._drop_dead(None, q)  # type: ignore[arg-type]
    assert CountingDeque.walks == 0
    q.gone = 1  # a client left: one walk, which finds nobody to drop and resets the count
    Batcher._drop_dead(None, q)  # type: ignore[arg-type]
    Batcher._drop_dead(None, q)  # type: ignore[arg-type]
    assert CountingDeque.walks == 1 and q.gone == 0 and q.next_deadline == 1e12


def test_offered_load_answers_from_running_sums() -> None:
    """``demand`` equals a walk of the window's arrivals, without walking them."""
    rng = random.Random(3)
    load = OfferedLoad(window=1.0)
    load._events = CountingDeque()
    arrivals: list[tuple[float, int, bool, float]] = []
    CountingDeque.walks = 0
    for i in range(600):
        now = i * 0.01
        event = (now, rng.choice([0, 1, 2]), rng.random() < 0.5, rng.choice([0.5, 1.2]))
        load.add(*event)
        arrivals.append(event)
        for priority in (0, 1, 2):
            recent = [e for e in arrivals if e[0] >= now - 1.0 and e[1] <= priority]
            others = [e for e in recent if e[1] < priority or not e[2]]
            autos = sum(1 for e in recent if e[1] == priority and e[2])
            got = load.demand(now, priority)
            assert got[0] == len(others) and got[2] == autos
            assert math.isclose(got[1], sum(e[3] for e in others), abs_tol=1e-6)
    assert CountingDeque.walks == 0
