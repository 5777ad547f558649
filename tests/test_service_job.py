"""One job record per request: an IntEnum priority, the API's Ask, and auto's rate chosen once (at placing)."""

from __future__ import annotations

import pytest

from service.job import PRIORITIES, Ask, Job, Priority
from service.latency import LatencyModel
from service.policy import PassCost
from service.scheduler import Scheduler, Unreachable


def gmacs(rate: float) -> float:
    return 0.2 + 0.8 * rate


def scheduler() -> Scheduler:
    latency = LatencyModel.from_warmup(PassCost(0.01, 0.1), gmacs(1.0), 4, z=0.0)
    return Scheduler(latency, gmacs, 4, policy="mixed")


def test_priority_is_an_int_enum_with_the_api_labels() -> None:
    assert PRIORITIES == ("high", "normal", "low") and Priority.HIGH < Priority.NORMAL < Priority.LOW
    assert [p.label for p in Priority] == list(PRIORITIES)
    assert Ask.of(0.5, None, (None, 30.0, 20.0), "low") == Ask(False, None, 20.0, Priority.LOW)
    assert Ask.of("auto", 0.3, (None,), "high").auto
    assert Job(1.0, 9.0, 2).priority is Priority.LOW  # ints (run order) are accepted and become the enum
    assert Job(0.7, 9.0).floor == 0.7 and Job(1.0, 9.0, auto=True, min_rate=0.4).floor == 0.4


def test_admission_checks_the_floor_without_choosing_a_rate() -> None:
    s = scheduler()
    queue = [Job(1.0, 100.0) for _ in range(5)]
    auto = Job(1.0, 100.0, auto=True, min_rate=0.25)
    s.check(auto, queue, 0.0, 0.0)
    assert auto.rate == 1.0 and s.load.demand(0.0, Priority.LOW) == (0, 0.0, 0)  # nothing chosen, nothing counted
    _, rate = s.place(auto, queue, 0.0, 0.0)
    assert s.load.demand(0.0, Priority.LOW) == (1, pytest.approx(gmacs(rate)), 0)  # counted once, when placed
    tight = Job(1.0, 0.41 + s.batch_seconds([1.0, 0.25]) - 1e-6, auto=True, min_rate=0.25)  # floor misses it
    for decide in (s.check, s.place):  # both refuse exactly when even the floor misses the deadline
        with pytest.raises(Unreachable):
            decide(tight, queue, 0.0, 0.0)
    assert s.load.demand(0.0, Priority.LOW)[0] == 3  # a refusal counts (check and place each)
    ok = Job(1.0, 0.41 + s.batch_seconds([1.0, 0.25]) + 1e-6, auto=True, min_rate=0.25)
    s.check(ok, queue, 0.0, 0.0)
    assert s.place(ok, queue, 0.0, 0.0)[1] == 0.25
