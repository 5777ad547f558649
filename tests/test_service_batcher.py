"""``service.batcher.Batcher`` on the virtual clock of ``tests/_virtual`` (the simulated device of
test_scheduling_sim): when a batch leaves (full, or its first request waited max_wait), what a batch formed
too late sheds, and admission (the queue's limits, the low-priority share, Retry-After, a deadline checked
against the pass in flight). Exact times and counts, deterministic, no real waiting."""

from __future__ import annotations

import asyncio
import math
from types import SimpleNamespace
from unittest import mock

import pytest
import torch
from _gate import metric
from _virtual import VirtualLoop
from test_scheduling_sim import OVERHEAD, PER_GMAC, fixed_job, gmacs, sim_batcher, simulate

import service.batcher
from service.batcher import Batcher
from service.exceptions import DeadlineUnreachable, InferenceFailed, Overloaded, Unavailable
from service.job import PRIORITIES, Job
from service.passes import fail


def on_virtual_time(main):
    """Run ``main(loop)`` on a virtual-time loop, with the batcher's clock being the loop's."""
    loop = VirtualLoop()
    clock = SimpleNamespace(monotonic=loop.time, perf_counter=loop.time)
    try:
        with mock.patch.object(service.batcher, "time", clock):
            return loop.run_until_complete(main(loop))
    finally:
        loop.close()


def test_batches_leave_when_full_or_after_max_wait() -> None:
    """The batch former's wait, on the virtual clock (max_batch_size 4, max_wait 1 s, no deadlines): an idle
    model runs a request at once; requests that come closer than max_wait wait for company until the first
    has waited max_wait (a later arrival does not restart the wait), or go at once when they fill a batch;
    what is left beyond max_batch_size waits again."""
    times = [0.0, 1.0, 1.5, 2.5, 2.6, 2.7, 2.8] + [5.0] * 6
    run = simulate(times, fixed_job(deadline=math.inf), noise=0.0, max_batch_size=4, max_wait_ms=1000.0)
    passes = [(start, len(rates)) for start, rates in run.device.passes]
    # t=1.0 comes exactly max_wait after the last request: not further apart than max_wait, so it waits
    expected = [(0.0, 1), (2.0, 2), (2.8, 4), (5.0, 4), (6.0, 2)]
    assert [n for _, n in passes] == [n for _, n in expected]
    assert [t for t, _ in passes] == pytest.approx([t for t, _ in expected], abs=1e-6)
    assert all(o.finish is not None for o in run.outcomes)


def test_a_batch_formed_too_late_sheds_its_lowest_priority_members() -> None:
    """``Batcher._take`` when the batch could no longer end by its deadline: its lowest-priority members are
    answered ``DeadlineUnreachable`` (counted at stage "batch") and the rest runs, predicted as what remains."""
    def take(prior_error: float | None, late: float):
        """Three jobs (low, high, normal) due 1 s after they are queued, taken ``late`` seconds after."""
        async def main(loop: VirtualLoop):
            batcher, _ = sim_batcher(loop, lambda rates, start: 0.0, prior_error)
            jobs = [Job(1.0, loop.time() + 1.0, priority) for priority in (2, 0, 1)]
            for job in jobs:
                with batcher.admit("sim", job) as ticket:
                    batcher.submit(ticket, job)
            loop.now += late
            return batcher, jobs, batcher._take(batcher.queues["sim"])

        return on_virtual_time(main)

    batcher, (low, high, normal), (batch, predicted) = take(1.0, 0.0)
    q = batcher.queues["sim"]
    one, two, three = (q.scheduler.batch_seconds([1.0] * n) for n in (1, 2, 3))
    assert batch == [high, normal, low] and predicted == three  # in time: all of it, in priority order
    late = 1.0 - q.latency.safety * (one + two) / 2  # two would end after the deadline, one would not
    batcher, (low, high, normal), (batch, predicted) = take(1.0, late)
    assert batch == [high] and predicted == pytest.approx(one)
    for shed in (normal, low):
        assert isinstance(shed.future.exception(), DeadlineUnreachable)
        assert "deadline" in str(shed.future.exception())
    assert not high.future.done() and not batcher.queues["sim"].items
    text = batcher.metrics.render().decode()
    refused = {p: metric(text, "evit_deadline_refused_total", model="sim", priority=p, stage="batch")
               for p in PRIORITIES}
    assert refused == {"high": 0, "normal": 1, "low": 1}
    assert metric(text, "evit_queue_wait_seconds_count", model="sim") == 3
    assert metric(text, "evit_queue_depth", model="sim") == 0
    # uncalibrated (no warm-up, no pass yet): nothing is predicted or shed
    _, (low, high, normal), (batch, predicted) = take(None, 5.0)
    assert batch == [high, normal, low] and predicted == 0.0


def overloaded(call, *args) -> Overloaded:
    with pytest.raises(Overloaded) as e:
        call(*args)
    return e.value


def test_admission_limits_the_queue_and_low_priority_share() -> None:
    """queue_size 4, low priority's share a half: a third low request is refused at ``check`` and at
    ``admit`` (many can pass the check while their bodies upload); normal ones fill the rest. Retry-After:
    at least 1 s before any pass, then the queue's batches times the measured batch time."""

    async def main(loop: VirtualLoop) -> None:
        batcher, _ = sim_batcher(loop, lambda rates, start: 0.85 if start < 0.5 else 3.35, 1.0, max_batch_size=2,
                                 queue_size=4, low_priority_queue_share=0.5)
        low = [Job(1.0, math.inf, priority=2) for _ in range(3)]
        tickets = [batcher.admit("sim", job) for job in low[:2]]
        for call in (batcher.check, batcher.admit):
            e = overloaded(call, "sim", low[2])
            assert "for low-priority requests (2 requests queued)" in str(e) and e.retry_after_s == 1
        batcher.check("sim", Job(1.0, math.inf))
        tickets += [batcher.admit("sim", Job(1.0, math.inf)) for _ in range(2)]
        assert metric(batcher.metrics.render().decode(), "evit_admitted_requests", model="sim") == 4
        e = overloaded(batcher.admit, "sim", Job(1.0, math.inf, priority=0))
        assert "low-priority" not in str(e) and "(4 requests queued)" in str(e)
        for t in tickets:
            t.release()
        tiny_share, _ = sim_batcher(loop, lambda rates, start: 0.85, 1.0, queue_size=4, low_priority_queue_share=0.1)
        with tiny_share.admit("sim", low[0]):  # the share is at least one request
            assert "low-priority" in str(overloaded(tiny_share.admit, "sim", low[1]))
        batcher.start()
        try:
            await finished(batcher, await run_one(batcher))  # one batch measured: 0.85 s
            for retry_after in (2, 3):  # 2 batches of 0.85 s; then of 0.8 * 0.85 + 0.2 * 3.35 s (moving average)
                tickets = [batcher.admit("sim", Job(1.0, math.inf)) for _ in range(4)]
                assert overloaded(batcher.admit, "sim", Job(1.0, math.inf)).retry_after_s == retry_after
                for t in tickets:
                    t.release()
                await finished(batcher, await run_one(batcher))  # the next one takes 3.35 s
        finally:
            await batcher.stop()

    on_virtual_time(main)


async def run_one(batcher: Batcher) -> Job:
    job = Job(1.0, math.inf)
    with batcher.admit("sim", job) as ticket:
        batcher.submit(ticket, job)
    await asyncio.sleep(0)
    return job


async def finished(batcher: Batcher, job: Job) -> None:
    """Until ``job`` is answered and its batch's bookkeeping (measured time) done."""
    await job.future
    while batcher.queues["sim"].running:
        await asyncio.sleep(0.001)


def test_a_deadline_is_checked_against_the_pass_in_flight() -> None:
    """``check`` (before the body is read) starts a request's batch when the pass in flight is predicted to
    end, and at once when the model is idle, even if the last pass ended before its prediction."""

    async def main(loop: VirtualLoop) -> None:
        # the device takes half the time warm-up measured: passes end before their predicted end
        batcher, _ = sim_batcher(loop, lambda rates, _start: 0.5 * sum(OVERHEAD + PER_GMAC * gmacs(r) for r in rates),
                                 1.0)
        q = batcher.queues["sim"]

        def submit(model: str, job: Job) -> Job:
            with batcher.admit(model, job) as ticket:
                return batcher.submit(ticket, job)

        def job_due_within_half_the_rest() -> Job:
            """Due in time if its batch starts now; not if it starts when the pass in flight is predicted to end."""
            now, one = loop.time(), q.scheduler.batch_seconds([1.0])
            return Job(1.0, now + q.latency.safety * one + 0.5 * (q.busy_until - now))

        batcher.start()
        try:
            job = await run_one(batcher)
            assert q.running and q.busy_until > loop.time()
            for call in (batcher.check, submit):  # before the body is read, and once it is decoded
                with pytest.raises(DeadlineUnreachable) as refused:
                    call("sim", job_due_within_half_the_rest())
                # the load is the reason: retryable after the queue's predicted time, with the queue's length
                assert refused.value.retry_after_s == batcher.retry_after(q) >= 1
                assert "(0 requests queued)" in str(refused.value)
            text = batcher.metrics.render().decode()
            assert metric(text, "evit_deadline_refused_total", model="sim", priority="normal", stage="admission") == 2
            await finished(batcher, job)
            assert not q.running and q.busy_until > loop.time()  # it ended early
            batcher.check("sim", job_due_within_half_the_rest())
            await finished(batcher, submit("sim", job_due_within_half_the_rest()))
        finally:
            await batcher.stop()

    on_virtual_time(main)


def test_a_request_whose_client_left_takes_no_place_in_a_batch() -> None:
    """While a pass runs, 4 requests queue (max_batch_size 4) and 2 of their clients leave: the next batch
    holds the 2 left and the 2 that came after, never the ones gone."""

    async def main(loop: VirtualLoop) -> None:
        batcher, device = sim_batcher(loop, lambda rates, start: 1.0, 1.0, max_batch_size=4, max_wait_ms=100.0)
        batcher.start()
        try:
            first = await run_one(batcher)
            queued = [await run_one(batcher) for _ in range(4)]
            for job in queued[:2]:
                job.future.cancel()
            later = [await run_one(batcher) for _ in range(2)]
            for job in [first, *queued[2:], *later]:
                await finished(batcher, job)
            assert [len(rates) for _, rates in device.passes] == [1, 4]
            assert batcher.idle()
        finally:
            await batcher.stop()

    on_virtual_time(main)


def test_the_batch_former_survives_a_batch_shed_whole_and_a_failed_batch() -> None:
    """A batch whose every member is shed (the pass before it ran 30x its prediction) and a batch whose
    planning raised (answered ``InferenceFailed``) leave the batch former serving the next request."""

    async def main(loop: VirtualLoop) -> None:
        batcher, device = sim_batcher(loop, lambda rates, start: 1.0, 1.0)  # predicted 0.034 s
        batcher.start()
        try:
            first = await run_one(batcher)
            await asyncio.sleep(0.01)
            late = Job(1.0, loop.time() + 1.0)  # in time as predicted, but its batch can start only at 1.0
            with batcher.admit("sim", late) as ticket:
                batcher.submit(ticket, late)
            await finished(batcher, first)
            with pytest.raises(DeadlineUnreachable):
                await asyncio.wait_for(late.future, 100)
            with mock.patch.object(service.batcher, "run_batch", side_effect=RuntimeError("planning failed")):
                failed = await run_one(batcher)
                with pytest.raises(InferenceFailed, match="RuntimeError"):
                    await asyncio.wait_for(failed.future, 100)
            served = await run_one(batcher)
            assert (await asyncio.wait_for(served.future, 100)).batch_size == 1
            assert len(device.passes) == 2 and not batcher.dead
        finally:
            await batcher.stop()

    on_virtual_time(main)


def test_a_batch_runs_as_the_cost_model_plans_it() -> None:
    """Seven requests at keep rate 0.25 and one at 1.0 in one batch: with a calibrated cost model (policy
    auto), the cheap ones run first in a pass of their own, so they are answered before the full one."""

    async def main(loop: VirtualLoop) -> None:
        batcher, device = sim_batcher(loop, lambda rates, start: OVERHEAD + PER_GMAC * sum(map(gmacs, rates)), 1.0)
        batcher.start()
        try:
            first = await run_one(batcher)
            jobs = [Job(r, math.inf, min_rate=r) for r in [1.0] + [0.25] * 7]
            for job in jobs:
                with batcher.admit("sim", job) as ticket:
                    batcher.submit(ticket, job)
            for job in [first, *jobs]:
                await finished(batcher, job)
            assert [rates for _, rates in device.passes] == [[1.0], [0.25] * 7, [1.0]]
        finally:
            await batcher.stop()

    on_virtual_time(main)


def test_a_failed_pass_answers_every_request_still_waiting() -> None:
    """``passes.fail`` skips requests already answered (client gone) and answers every other one."""

    async def main(loop: VirtualLoop) -> None:
        jobs = [Job(1.0, math.inf, future=loop.create_future()) for _ in range(3)]
        jobs[0].future.cancel()  # its client left during the pass
        fail(jobs, RuntimeError("boom"))
        fail(jobs[2:], torch.cuda.OutOfMemoryError("CUDA out of memory"))  # already answered: unchanged
        for job in jobs[1:]:
            with pytest.raises(InferenceFailed, match="RuntimeError"):
                job.future.result()

    on_virtual_time(main)


def test_drain_waits_for_every_admitted_queued_and_running_request() -> None:
    """``drain`` returns True as soon as nothing is admitted, queued or running (polled every 10 ms), and
    False once its timeout passes first: an admitted request whose body is still uploading, or a queued one
    that no batch former runs, keeps it waiting."""

    async def main(loop: VirtualLoop) -> None:
        batcher, _ = sim_batcher(loop, lambda rates, start: 0.5, 1.0)
        assert batcher.idle() and await batcher.drain(1.0) is True
        ticket = batcher.admit("sim", Job(1.0, math.inf))  # admitted, its body still arriving
        start = loop.time()
        assert not batcher.idle() and await batcher.drain(2.0) is False and loop.time() - start >= 2.0
        ticket.release()
        assert await batcher.drain(2.0) is True
        job = Job(1.0, math.inf)
        with batcher.admit("sim", job) as queued:
            batcher.submit(queued, job)
        assert not batcher.idle() and await batcher.drain(1.0) is False  # queued; no former runs it yet
        answered: list[float] = []
        job.future.add_done_callback(lambda _: answered.append(loop.time()))
        batcher.start()
        try:
            assert await batcher.drain(10.0) is True and job.future.done()
            assert loop.time() - answered[0] <= 0.05  # it noticed within a poll or so, not a second later
        finally:
            await batcher.stop()

    on_virtual_time(main)


def test_a_batch_former_that_dies_answers_its_queue_and_marks_the_model_dead() -> None:
    """A batch former that raises: its queued requests get ``Unavailable`` naming the error, the queue-depth
    gauge drops to 0, and later requests are refused at ``submit`` with the same reason."""

    async def main(loop: VirtualLoop) -> None:
        batcher, _ = sim_batcher(loop, lambda rates, start: 0.5, 1.0)
        gate = asyncio.Event()

        async def dying(q) -> None:
            await gate.wait()
            raise RuntimeError("former exploded")

        with mock.patch.object(batcher, "_form_batches", dying):
            batcher.start()
        try:
            job = Job(1.0, math.inf)
            with batcher.admit("sim", job) as ticket:
                batcher.submit(ticket, job)
            depth = lambda: metric(batcher.metrics.render().decode(), "evit_queue_depth", model="sim")  # noqa: E731
            assert depth() == 1
            gate.set()
            with pytest.raises(Unavailable, match="RuntimeError: former exploded"):
                await asyncio.wait_for(job.future, 10)
            assert depth() == 0 and not batcher.queues["sim"].hosted.ready
            later = Job(1.0, math.inf)
            with batcher.admit("sim", later) as ticket, pytest.raises(
                    Unavailable, match="batch former of model sim died: RuntimeError: former exploded"):
                batcher.submit(ticket, later)
        finally:
            await batcher.stop()

    on_virtual_time(main)
