"""Signals under load against a real ``python -m service``: SIGKILL then restart on the same port (clients
see prompt connection errors, never hangs; the new process is ready and serving), then SIGTERM (every
request the server accepted is answered before it exits 0; new ones get 503 + Retry-After).

Accepted vs lost is decided from both ends: each request carries an ``X-Request-ID`` and the server logs
one JSON line per request it handled, so a request the server answered but the client never received
would show up as lost.
"""

from __future__ import annotations

import asyncio
import signal
import time
from types import SimpleNamespace

import httpx
import pytest
from _gate import metric
from _hostile import jpegs
from _live import VIT_TI_224, LiveServer
from _load import Client, Outcome, summary
from _reliability import record

pytestmark = pytest.mark.slow
MODEL = VIT_TI_224
LIMITS = dict(queue_size=64, request_timeout_s=10.0, drain_timeout_s=20.0, max_batch_size=8)
BODIES = jpegs(8)
CLIENTS = 16


@pytest.fixture(scope="module")
def box(tmp_path_factory):
    """The servers of this module (each test starts its own: any order, alone or together); all closed at
    the end."""
    state = SimpleNamespace(log_dir=tmp_path_factory.mktemp("signals"), servers=[])
    try:
        yield state
    finally:
        for server in state.servers:
            server.close()


async def load_then_signal(server: LiveServer, sig: int, after: float) -> tuple[list[Outcome], float]:
    """CLIENTS back-to-back clients (each stops at its first non-200); ``sig`` after ``after`` seconds and
    once at least CLIENTS requests were answered (a slow, shared CPU must not make the load too thin)."""
    outcomes: list[Outcome] = []
    async with Client(server.url, BODIES, timeout=30) as client:
        load = asyncio.create_task(client.closed_loop(CLIENTS, 60.0, stop_unless_200=True, out=outcomes))
        await asyncio.sleep(after)
        give_up = time.perf_counter() + 30
        while sum(o.status == 200 for o in outcomes) < CLIENTS and time.perf_counter() < give_up:
            await asyncio.sleep(0.05)
        server.signal(sig)
        signalled = time.perf_counter()
        return await load, signalled


def fresh(box, port: int | None = None) -> LiveServer:
    server = LiveServer(box.log_dir, port=port, model=MODEL, **LIMITS)
    box.servers.append(server)
    server.wait_ready()
    return server


def test_sigkill_under_load_then_restart(box) -> None:
    server = fresh(box)
    outcomes, killed = asyncio.run(load_then_signal(server, signal.SIGKILL, 1.5))
    assert server.wait(10) == -signal.SIGKILL
    kinds = summary(outcomes)
    failed = [o for o in outcomes if o.status != 200]  # each client stops at its first failure
    assert len(failed) == CLIENTS and all(o.done_at >= killed for o in failed)
    assert {o.kind for o in failed} <= {"dropped", "refused"}  # clean connection errors, not timeouts or 5xx
    assert kinds["accepted"] >= CLIENTS  # the load was running when the kill came
    slowest = max(o.done_at for o in failed) - killed
    assert slowest < 10.0  # nobody hung (the clients' timeout is 30 s; a connection error comes at once)

    start = time.monotonic()
    restarted = fresh(box, server.port)
    ready_s = time.monotonic() - start
    r = httpx.post(restarted.url + "/classify", content=BODIES[0], headers={"content-type": "image/jpeg"}, timeout=30)
    assert r.status_code == 200
    assert metric(httpx.get(restarted.url + "/metrics").text, "evit_requests_total", code="200") == 1  # a new process
    in_flight = sum(o.kind == "dropped" for o in failed)
    record("sigkill_restart", {
        "what": f"{CLIENTS} back-to-back clients, SIGKILL after 1.5 s and {CLIENTS} answers, restart on the same port",
        "sent": len(outcomes) + 1, "answered": sum(o.status is not None for o in outcomes) + 1,
        "unaccepted": kinds["refused"], "accepted": kinds["accepted"] + 1, "rejected": kinds["refused"],
        "crashes": kinds["crash"], "memory_growth_mb": None,  # the one exit is the SIGKILL itself
        "notes": f"the {in_flight} requests in flight at the kill are lost by definition (SIGKILL leaves no time "
                 f"to answer): each got a connection error within {slowest:.2f} s of the kill, none hung; "
                 f"{kinds['refused']} sent after it were refused at connect; restarted process ready "
                 f"{ready_s:.1f} s after launch and answered 200",
    })


def test_sigterm_under_load_loses_no_accepted_request(box) -> None:
    server = fresh(box)
    outcomes, terminated = asyncio.run(load_then_signal(server, signal.SIGTERM, 1.5))
    assert server.wait(30) == 0
    handled = {e["request_id"]: e["status"] for e in server.access()}
    kinds = summary(outcomes)
    answered_after = [o for o in outcomes if o.status == 200 and o.done_at > terminated]
    refused = [o for o in outcomes if o.status == 503]
    no_answer = [o for o in outcomes if o.status is None]
    lost = [o for o in no_answer if o.request_id in handled]  # the server handled it, the client never heard
    lost += [o for o in outcomes if handled.get(o.request_id) == 200 and o.status != 200]
    assert not lost
    assert set(kinds) <= {"accepted", "rejected", "refused", "dropped"} and not kinds.get("crash")
    assert all(o.error == "draining" and o.retry_after for o in refused)
    assert all(handled.get(o.request_id) == 200 for o in outcomes if o.status == 200)
    assert answered_after  # requests queued at SIGTERM were answered during the drain
    assert any(e.get("message") == "drained" for e in server.log_lines())
    record("sigterm", {
        "what": f"{CLIENTS} back-to-back clients, SIGTERM after 1.5 s and {CLIENTS} answers "
                f"(drain timeout {LIMITS['drain_timeout_s']:g} s)",
        "sent": len(outcomes), "accepted": kinds["accepted"], "rejected": len(refused) + len(no_answer),
        "answered": sum(o.status is not None for o in outcomes),
        "unaccepted": sum(o.request_id not in handled for o in no_answer),  # reached a closed listener
        "crashes": kinds["crash"], "memory_growth_mb": None,
        "notes": f"{len(answered_after)} requests accepted before the signal were answered 200 after it; "
                 f"{len(refused)} got 503 draining + Retry-After; {len(no_answer)} reached a closed listener (never "
                 "handled by the server, per its request log); exit status 0",
    })
