"""The request deadline covers the wait for a decode thread and the decode itself (``service.decodepool``).

One decode thread (and so one spare). Slow decodes are injected: the model's preprocessor holds any body
starting with ``SLOW`` for up to 5 s. A slow decode past its deadline gets 504 at the deadline and is isolated
on the spare thread, so normal requests behind it are served; once the spare is taken too, normal requests
still get their answer (504) at their own deadline, never after the slow decodes end.
"""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
from _gate import until
from _reliability import Tally, record

pytestmark = pytest.mark.anyio
HOLD_S = 5.0


def slow_decodes(app) -> threading.Event:
    """Bodies starting with SLOW hold their decode thread until the returned event is set (or HOLD_S)."""
    hosted = app.state.service.registry.get("tiny")
    original, release = hosted.preprocess, threading.Event()

    def preprocess(data: bytes):
        if data.startswith(b"SLOW"):
            release.wait(HOLD_S)
        return original(data)

    hosted.preprocess = preprocess
    return release


async def timed(client, body: bytes, deadline_ms: float | None = None) -> tuple[int, float]:
    headers = {"X-Deadline-Ms": str(deadline_ms)} if deadline_ms else {}
    start = time.monotonic()
    r = await client.post("/classify", content=body, headers=headers)
    return r.status_code, time.monotonic() - start


async def test_slow_decodes_do_not_hold_normal_requests_past_their_deadline(serve, tiny_settings,
                                                                            image_bytes) -> None:
    image = image_bytes()
    slow = b"SLOW" + image  # not an image once released: 400
    async with serve(tiny_settings(decode_threads=1, request_timeout_s=5.0)) as (app, client):
        pool = app.state.service.decode_pool
        tally = Tally(client, ("/classify",))  # what was sent and answered, by status, at the client
        release = slow_decodes(app)
        try:
            # 1. one slow decode: 504 at its 300 ms deadline, isolated; normal requests behind it are served
            first = asyncio.create_task(timed(client, slow, 300))
            await until(lambda: pool.free == 0)  # the slow decode holds the one thread
            normal = await asyncio.gather(*(timed(client, image) for _ in range(3)))
            code, seconds = await first
            assert code == 504 and 0.27 <= seconds < HOLD_S / 2  # at its deadline, not when the decode ends
            assert all(code == 200 and s < HOLD_S / 2 for code, s in normal), normal
            assert pool.overrunning == 1
            # 2. the spare is taken: a second slow decode keeps its slot; normal requests get 504 at their
            # own 800 ms deadline (waiting for a thread), not when the slow decodes end
            second = asyncio.create_task(timed(client, slow, 300))
            await until(lambda: pool.free == 0)  # the second slow decode holds the thread (the spare is taken)
            starved = await asyncio.gather(*(timed(client, image, 800) for _ in range(3)))
            assert (await second)[0] == 504
            assert all(code == 504 and 0.72 <= s < HOLD_S / 2 for code, s in starved), starved
        finally:
            release.set()
        await until(lambda: (pool.free, pool.overrunning) == (pool.threads, 0))  # the held decodes end
        after = await asyncio.gather(*(timed(client, image) for _ in range(3)))
        assert all(code == 200 for code, _ in after)
        body = (await client.get("/metrics")).text
        assert 'evit_requests_total{code="504",keep_rate="1.00",model="tiny"} 5.0' in body
    record("decode_deadline", {
        "what": "1 decode thread + 1 spare, request timeout 5 s; decodes held 5 s for bodies marked slow "
                "(deadline 300 ms); normal requests behind them (no deadline, then 800 ms)",
        "sent": tally.sent, "answered": tally.answered, "accepted": tally.codes[200],
        "rejected": sum(n for c, n in tally.codes.items() if 400 <= c < 500 or c in (503, 504)),
        "crashes": sum(n for c, n in tally.codes.items() if c >= 500 and c not in (503, 504)),
        "memory_growth_mb": "-",
        "notes": f"slow: 504 after {(await first)[1]:.2f} s; the 3 normal requests behind it 200 within "
                 f"{max(s for _, s in normal):.2f} s (isolated on the spare); with the spare taken, 3 normal "
                 f"requests 504 after {max(s for _, s in starved):.2f} s (their 0.8 s deadline), not after the "
                 f"{HOLD_S:g} s decode; all 200 again once released",
    })


async def test_pool_slots_survive_timeouts_and_cancellations() -> None:
    from service.decodepool import DecodePool
    from service.exceptions import QueueTimeout

    pool, gate = DecodePool(1), threading.Event()

    def hold(data: bytes) -> bytes:
        gate.wait(HOLD_S)
        return data

    now = time.monotonic()
    running = asyncio.create_task(pool.run(hold, b"a", now + 10))
    waiting = asyncio.create_task(pool.run(hold, b"b", now + 10))
    await until(lambda: pool.free == 0 and len(pool._waiters) == 1)  # one decode runs, one waits for its slot
    waiting.cancel()  # a client gone while waiting for a thread: it must not take the slot with it
    with pytest.raises(QueueTimeout) as late:
        await pool.run(hold, b"c", now + 0.1)  # waits for the one slot until its deadline
    assert "no decode thread" in late.value.message  # the edge maps QueueTimeout to 504 (test_service_errors)
    with pytest.raises(QueueTimeout):
        await pool.run(hold, b"d", time.monotonic() - 1)  # already late: not even queued for a thread
    gate.set()
    assert await running == b"a" and waiting.cancelled()
    assert await pool.run(bytes.upper, b"e", time.monotonic() + 5) == b"E"
    assert (pool.free, pool.overrunning, len(pool._waiters)) == (1, 0, 0)
    pool.shutdown()
