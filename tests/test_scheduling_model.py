"""Unit tests of the latency model, the offered-load window and the scheduler's decisions (explicit clock)."""

from __future__ import annotations

import math
import random

import pytest

from service.errors import api_error
from service.latency import LatencyModel, OfferedLoad
from service.policy import PassCost
from service.scheduler import PRIORITIES, Job, Scheduler, Unreachable, insert_at, rate_grid, refusal

HIGH, NORMAL, LOW = (PRIORITIES.index(p) for p in ("high", "normal", "low"))


def gmacs(rate: float) -> float:
    return 0.2 + 0.8 * rate


def exact(overhead: float = 0.01, per_gmac: float = 0.1, batch: int = 4) -> LatencyModel:
    """A model calibrated on the line exactly, with no safety margin (z = 0)."""
    return LatencyModel.from_warmup(PassCost(overhead, per_gmac), gmacs(1.0), batch, z=0.0)


# -- latency model -------------------------------------------------------------------------------------
def test_calibration_reproduces_the_warmup_line() -> None:
    model = exact(0.01, 0.1)
    assert model.calibrated and model.passes == 0
    assert model.seconds(1.0) == pytest.approx(0.11) and model.seconds(4.0) == pytest.approx(0.41)
    assert LatencyModel().seconds(1.0) is None and not LatencyModel().calibrated
    blank = LatencyModel()  # no warm-up: the first measured pass calibrates it (through the origin)
    blank.observe(2.0, 0.5)
    assert blank.seconds(2.0) == pytest.approx(0.5) and blank.seconds(4.0) == pytest.approx(1.0)


def test_learns_a_slower_device_from_measured_passes() -> None:
    model = exact(0.01, 0.1)
    rng = random.Random(0)
    for _ in range(60):  # the device is now twice as slow, passes of assorted sizes
        work = rng.uniform(0.5, 4.0)
        model.observe(work, 2 * (0.01 + 0.1 * work))
    for work in (0.5, 1.0, 4.0):
        assert model.seconds(work) == pytest.approx(2 * (0.01 + 0.1 * work), rel=0.02)
    assert model.info()["passes_observed"] == 60


def test_a_sudden_change_of_pace_is_followed_within_a_few_passes() -> None:
    model = exact(0.01, 0.1)
    for _ in range(50):
        model.observe(2.0, 0.21)
    for _ in range(5):  # another process took half the CPU: every pass takes twice as long
        model.observe(2.0, 0.42)
    assert model.seconds(2.0) == pytest.approx(0.42, rel=0.15) and model.bias > 1.5
    for _ in range(200):
        model.observe(2.0, 0.42)
    assert model.seconds(2.0) == pytest.approx(0.42, rel=0.01) and model.bias == pytest.approx(1.0, abs=0.05)


def test_same_size_passes_keep_the_calibrated_slope() -> None:
    model = exact(0.01, 0.1)
    for _ in range(200):
        model.observe(4.0, 0.41 * 1.5)  # only full batches, 1.5x slower
    assert model.seconds(4.0) == pytest.approx(0.615, rel=0.02)
    assert 0 < model.seconds(1.0) < model.seconds(4.0)  # still a line with a slope, not a constant


def test_error_and_safety_follow_the_noise() -> None:
    model = exact(0.01, 0.1)
    model.z = 2.0
    assert model.safety == pytest.approx(1.2)  # before any pass: 10 % assumed
    for _ in range(100):
        model.observe(2.0, 0.21)  # exact
    assert model.error < 0.01 and model.safety < 1.02
    model.observe(2.0, 100.0)  # one stalled pass counts as 100 % error at most
    assert model.error <= 0.1 + 0.01
    rng = random.Random(1)
    for _ in range(100):
        model.observe(2.0, 0.21 * rng.choice((0.7, 1.3)))
    assert model.error == pytest.approx(0.3, abs=0.08)


def test_offered_load_window_and_demand() -> None:
    load = OfferedLoad(window=1.0)
    load.add(0.0, HIGH, False, 1.0)
    load.add(0.5, NORMAL, True, 0.5)
    load.add(0.6, NORMAL, False, 0.7)
    load.add(0.7, LOW, True, 0.4)
    assert load.rate(0.8) == pytest.approx(4.0)
    assert load.demand(0.8, HIGH) == (1, 1.0, 0)
    assert load.demand(0.8, NORMAL) == (2, pytest.approx(1.7), 1)
    assert load.demand(0.8, LOW) == (3, pytest.approx(2.2), 1)
    assert load.demand(1.55, LOW) == (1, pytest.approx(0.7), 1)  # older than a second: forgotten


# -- scheduler -----------------------------------------------------------------------------------------
def test_rate_grid_and_run_order() -> None:
    assert rate_grid(0.25) == tuple(round(1 - 0.05 * i, 2) for i in range(16))
    assert rate_grid(0.33)[-2:] == (0.35, 0.33) and rate_grid(1.0) == (1.0,)
    queue = [Job(1.0, 9, p) for p in (HIGH, HIGH, NORMAL, LOW, LOW)]
    assert insert_at(queue, HIGH) == 2 and insert_at(queue, NORMAL) == 3 and insert_at(queue, LOW) == 5
    assert insert_at([], LOW) == 0


def scheduler(batch: int = 4, **kwargs) -> Scheduler:
    return Scheduler(exact(batch=batch), gmacs, batch, policy="mixed", **kwargs)


def test_fixed_rate_refused_when_the_queue_makes_it_late() -> None:
    s = scheduler()
    full = s.batch_seconds([1.0] * 4)  # 0.01 + 0.1 * 4 = 0.41
    assert full == pytest.approx(0.41)
    queue = [Job(1.0, 100.0) for _ in range(8)]  # two full batches ahead: the new one ends the third
    index, rate = s.place(Job(1.0, 3 * 0.11 + 2 * full + 0.01), queue, now=0.0, busy_until=0.1)
    assert (index, rate) == (8, 1.0)
    with pytest.raises(Unreachable) as e:
        s.place(Job(1.0, 0.1 + 2 * full + 0.05), queue, now=0.0, busy_until=0.1)
    assert not e.value.impossible and e.value.finish == pytest.approx(0.1 + 2 * full + 0.11)
    with pytest.raises(Unreachable) as e:
        s.place(Job(1.0, 0.05), [], now=0.0, busy_until=0.0)  # one pass alone takes 0.11
    assert e.value.impossible
    busy = api_error(refusal(Unreachable(0.0, 1.0, 0.5, 0.1), queued=8, retry_after_s=2))
    assert (busy.status, busy.error, busy.headers) == (503, "deadline_unreachable", {"Retry-After": "2"})
    assert "8 requests queued" in busy.message
    assert api_error(refusal(Unreachable(0.0, 1.0, 0.05, 0.1), 0, 1)).status == 504


def test_auto_takes_the_highest_rate_that_meets_the_deadline() -> None:
    s = scheduler()
    queue = [Job(1.0, 100.0) for _ in range(5)]  # one full batch, then one job in the new one's batch
    start = 0.41  # the new job shares the second batch with one keep-1.0 job

    def finish(rate: float) -> float:
        return start + s.batch_seconds([1.0, rate])

    deadline = finish(0.6) + 1e-6
    _, rate = s.place(Job(1.0, deadline, auto=True, min_rate=0.25), queue, now=0.0, busy_until=0.0)
    assert rate == 0.6 and finish(0.65) > deadline
    _, rate = s.place(Job(1.0, 100.0, auto=True, min_rate=0.25, target=finish(0.3)), queue, 0.0, 0.0)
    assert rate == 0.3  # without a deadline the target counts
    _, rate = s.place(Job(1.0, 100.0, auto=True, min_rate=0.5, target=0.0), queue, 0.0, 0.0)
    assert rate == 0.5  # target out of reach: the floor, since the deadline still holds
    with pytest.raises(Unreachable):
        s.place(Job(1.0, finish(0.25) - 1e-6, auto=True, min_rate=0.25), queue, 0.0, 0.0)


def test_auto_stays_within_what_the_device_sustains() -> None:
    s = scheduler(window=1.0)
    assert s.sustainable(Job(1.0, 9, auto=True, min_rate=0.25), now=0.0) == 1.0  # no recent arrivals
    for i in range(20):  # 20 requests/s of auto traffic: 20 x per-request time must fit 0.9 s
        s.load.add(i / 20, NORMAL, True, gmacs(1.0))
    rate = s.sustainable(Job(1.0, 9, auto=True, min_rate=0.25), now=0.99)
    per_request = 0.01 / 4 + 0.1 * gmacs(rate)
    assert 21 * per_request <= 0.9 < 21 * (0.01 / 4 + 0.1 * gmacs(rate + 0.05))
    _, placed = s.place(Job(1.0, 100.0, auto=True, min_rate=0.25), [], now=0.99, busy_until=0.0)
    assert placed == rate  # the deadline would allow 1.0; the arrival rate does not
    assert s.sustainable(Job(1.0, 9, HIGH, auto=True, min_rate=0.25), now=0.99) == 1.0  # high: normal yields


def test_fit_batch_lowers_auto_rates_then_sheds_low_priority() -> None:
    s = scheduler()
    now = 0.0
    fixed = Job(1.0, 10.0)
    auto = Job(1.0, 10.0, auto=True, min_rate=0.25)
    run, shed = s.fit_batch([fixed, auto], now)
    assert (run, shed) == ([fixed, auto], []) and auto.rate == 1.0  # fits: untouched
    deadline = s.batch_seconds([1.0, 0.5])
    tight = Job(1.0, deadline, auto=True, min_rate=0.25)
    run, shed = s.fit_batch([fixed, tight], now)
    assert shed == [] and tight.rate == 0.5  # the highest cap that fits
    low = Job(1.0, 0.2, LOW)
    high = Job(1.0, 0.2, HIGH)
    run, shed = s.fit_batch([high, low], now)  # both at 1.0: 0.21 > 0.2; one alone: 0.11
    assert run == [high] and shed == [low]
    lone = Job(1.0, 0.05)  # cannot make it even alone
    assert s.fit_batch([lone], now) == ([], [lone])


def test_slack_cuts_the_wait() -> None:
    s = scheduler()
    assert s.slack([], 0.0) == math.inf
    queue = [Job(1.0, 2.0, arrival=0.0), Job(1.0, 1.9, auto=True, min_rate=0.5, target=0.61, arrival=0.1)]
    span = s.batch_seconds([1.0, 1.0])  # 0.21: both would finish then if the batch went now
    # the second may wait half of its slack: from its arrival (0.1) to its latest start (target - span)
    assert s.slack(queue, 0.2) == pytest.approx(0.1 + 0.5 * (0.61 - span - 0.1) - 0.2)
    assert s.slack(queue, 0.3) == 0.0
    assert s.slack([Job(1.0, 0.1)], 0.0) == 0.0  # already late: go now
