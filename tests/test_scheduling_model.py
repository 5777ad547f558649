"""Unit tests of the latency model, the offered-load window and the scheduler's decisions (explicit clock)."""

from __future__ import annotations

import math
import random

import pytest

from service.errors import api_error
from service.job import PRIORITIES, Job
from service.latency import LatencyModel, OfferedLoad
from service.policy import PassCost
from service.scheduler import Scheduler, Unreachable, insert_at, rate_grid, refusal

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


def test_sustainable_rate_with_a_margin_and_other_traffic() -> None:
    """Recent arrivals over a 2 s window: fixed-rate and high-priority ones the auto class must make room for,
    low-priority ones it ignores; the device at most 90 % busy with the margin (safety 1.2) applied."""
    latency = LatencyModel.from_warmup(PassCost(0.01, 0.1), gmacs(1.0), 4, z=2.0)
    s = Scheduler(latency, gmacs, 4, policy="mixed", window=2.0)
    assert latency.safety == pytest.approx(1.2)
    for i in range(6):
        s.load.add(0.3 * i, NORMAL, False, gmacs(1.0))
        s.load.add(0.3 * i, LOW, True, gmacs(1.0))
    for i in range(5):
        s.load.add(0.3 * i + 0.1, HIGH, False, gmacs(0.7))
        s.load.add(0.3 * i + 0.1, NORMAL, True, gmacs(0.5))
    others, others_gmacs, autos = 11, 6 * gmacs(1.0) + 5 * gmacs(0.7), 5 + 1  # + the new one

    def busy(rate: float) -> float:  # seconds of device time in the window, overhead shared by full batches
        return latency.safety * ((others + autos) * 0.01 / 4 + 0.1 * (others_gmacs + autos * gmacs(rate)))

    rate = s.sustainable(Job(1.0, 9, auto=True, min_rate=0.25), now=1.9)
    assert rate == 0.7 and busy(rate) <= 0.9 * 2.0 < busy(rate + 0.05)


def test_refusal_messages_and_codes() -> None:
    assert str(Unreachable(1.0, 3.0, 2.5, 1.2)) == "predicted to finish 2000 ms from now, deadline 1500 ms"
    what = "the request cannot be answered within its deadline (deadline_ms, or the request timeout)"
    passed = api_error(refusal(Unreachable(1.0, 2.0, 1.0, 1.5), 3, 1))  # no time left at all
    assert (passed.status, passed.headers) == (504, {})
    assert passed.message == (f"{what}: it passed before the request could be queued (reading and decoding it took "
                              "longer)")
    idle = api_error(refusal(Unreachable(2.0, 2.2, 2.0005, 2.1), 3, 1))  # 0.5 ms left, one pass takes 100 ms
    assert (idle.status, idle.headers) == (504, {})
    assert idle.message == (f"{what} even by an idle model: 0.5 ms left, one pass is predicted to take 100.0 ms; "
                            "allow a longer deadline or a lower keep rate")
    busy = api_error(refusal(Unreachable(3.0, 6.0, 5.0, 3.1), 8, 2))
    assert busy.message == (f"{what} under the current load: predicted to finish in 3000 ms (8 requests queued), "
                            "deadline in 2000 ms; retry later, allow a longer deadline_ms, or use keep_rate=auto (or "
                            "a lower min_keep_rate)")


def test_place_predicts_the_batch_it_joins() -> None:
    """A high-priority job overtakes 12 low ones: it runs in the first batch with 3 of them, exactly on time
    when its deadline is that batch's end (no margin), and late a hair before; a fixed rate is kept as asked."""
    s = scheduler()
    low = [Job(1.0, 100.0, LOW) for _ in range(12)]
    four = s.batch_seconds([1.0] * 4)
    assert s.place(Job(1.0, four, HIGH), low, 0.0, 0.0) == (0, 1.0)
    with pytest.raises(Unreachable):
        s.place(Job(1.0, four - 1e-9, HIGH), low, 0.0, 0.0)
    assert s.place(Job(0.5, 100.0, min_rate=0.5), low, 0.0, 0.0) == (0, 0.5)
    assert s.plan([Job(1.0, 9.0)] * 6, 0.0, 0.0) == [pytest.approx(four)] * 4 + [pytest.approx(four + 0.21)] * 2


def test_fit_batch_keeps_fixed_rates_and_sheds_only_late_members() -> None:
    s = scheduler()
    fixed = Job(0.5, 10.0)  # its min_rate (1.0) is auto's field: a fixed rate is never changed
    assert s.fit_batch([fixed], 0.0) == ([fixed], []) and fixed.rate == 0.5
    high, auto = Job(1.0, 0.15, HIGH), Job(1.0, 10.0, auto=True, min_rate=0.5)  # 0.19 s even at auto's floor
    assert s.fit_batch([high, auto], 0.0) == ([auto], [high]) and auto.rate == 1.0  # the late one goes
    both = s.batch_seconds([1.0, 1.0])
    on_time = Job(1.0, both, LOW)  # ends exactly at its deadline even with high: not late, so high is shed
    high = Job(1.0, 0.15, HIGH)
    assert s.fit_batch([high, on_time], 0.0) == ([on_time], [high])


def test_grid_step_runner_buckets_and_the_pass_policy() -> None:
    assert scheduler(step=0.1).grid(0.5) == (1.0, 0.9, 0.8, 0.7, 0.6, 0.5)
    buckets = (0.5, 0.7, 1.0)
    s = scheduler(snap=lambda r: min(buckets, key=lambda b: (abs(b - r), -b)))  # a compiled runner's buckets
    assert s.grid(0.25) == (1.0, 0.7, 0.5)
    deadline = s.batch_seconds([0.8]) + 1e-9  # 0.8 would fit; it is not a bucket, so auto takes 0.7
    assert s.place(Job(1.0, deadline, auto=True, min_rate=0.25), [], 0.0, 0.0)[1] == 0.7
    # one cheap-overhead line, three policies: mixed is one pass; grouped and auto (which groups here, the three
    # cheap samples answered first) pay a second overhead
    rates = [1.0, 0.25, 0.25, 0.25]
    seconds = {p: Scheduler(exact(overhead=0.001), gmacs, 4, policy=p).batch_seconds(rates)
               for p in ("mixed", "grouped", "auto")}
    assert seconds == {"mixed": pytest.approx(0.221), "grouped": pytest.approx(0.222), "auto": pytest.approx(0.222)}


def test_info_predicts_full_batches_once_calibrated() -> None:
    info = scheduler().info((1.0, 0.5, 0.33333))
    assert info["max_batch_size"] == 4 and info["calibrated"]
    assert info["predicted_batch_ms"] == {"1.00": 410.0, "0.50": 250.0, "0.33": 196.666}  # 196.6656 ms, to the us
    assert Scheduler(LatencyModel(), gmacs, 4).info()["predicted_batch_ms"] is None


def test_offered_load_counts_auto_requests_placed_and_refused() -> None:
    """``sustainable`` shares the device among a class's auto requests: each is counted as auto, once, whether
    placed (at its chosen rate) or refused at admission (``check``) or when placed."""
    s = scheduler()
    _, rate = s.place(Job(1.0, 100.0, auto=True, min_rate=0.5), [], 0.0, 0.0)
    assert s.load.demand(0.0, NORMAL) == (0, 0.0, 1) and s.load.demand(0.0, LOW) == (1, gmacs(rate), 0)
    for decide in (s.check, s.place):
        with pytest.raises(Unreachable):
            decide(Job(1.0, 0.01, auto=True, min_rate=0.5), [], 0.0, 0.0)
    assert s.load.demand(0.0, NORMAL) == (0, 0.0, 3)
