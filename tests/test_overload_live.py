"""Overload against a real ``python -m service``: slow uploaders hold no queue slot (admission once the body is
complete), and SIGTERM under keep-alive load loses no answer the server accepted and exits in time.
Both bounded: a few hundred sockets for a few seconds, a few keep-alive clients."""

from __future__ import annotations

import http.client
import signal
import socket
import threading
import time
import uuid

import httpx
import pytest
from _hostile import jpegs
from _live import LiveServer, live_server

pytestmark = pytest.mark.slow
BODY = jpegs(1)[0]
SLOW = 300


def post(url: str) -> int:
    return httpx.post(url + "/classify", content=BODY, headers={"content-type": "image/jpeg"}, timeout=30,
                      trust_env=False).status_code


def test_slow_uploaders_do_not_lock_the_queue(tmp_path) -> None:
    """300 clients sending their body a byte at a time; the queue has 16 slots: normal requests get 200."""
    with live_server(tmp_path, queue_size=16, body_timeout_s=60.0) as server:
        socks = []
        head = (f"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\n"
                f"Content-Length: {len(BODY)}\r\n\r\n").encode()
        try:
            for _ in range(SLOW):
                s = socket.create_connection(("127.0.0.1", server.port), timeout=10)
                s.sendall(head + BODY[:1])
                socks.append(s)
            statuses = []
            for i in range(5):  # while the uploads crawl on, a byte a second
                for s in socks:
                    s.sendall(BODY[1 + i : 2 + i])
                statuses.append(post(server.url))
                time.sleep(0.5)
        finally:
            for s in socks:
                s.close()
        assert statuses == [200] * 5


def keep_alive_client(port: int, out: list[tuple[str, int | str]], stop: threading.Event) -> None:
    """Back-to-back requests on one persistent connection (a new one after the server closes it)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    while not stop.is_set():
        rid = uuid.uuid4().hex
        try:
            conn.request("POST", "/classify", body=BODY, headers={"Content-Type": "image/jpeg", "X-Request-ID": rid})
            r = conn.getresponse()
            r.read()
            out.append((rid, r.status))
            if r.getheader("connection", "").lower() == "close":
                conn.close()
        except ConnectionRefusedError:
            out.append((rid, "refused"))
            return
        except (OSError, http.client.HTTPException) as e:
            out.append((rid, type(e).__name__))
            conn.close()
            time.sleep(0.01)
    conn.close()


def test_sigterm_on_keep_alive_loses_no_answer(tmp_path) -> None:
    drain_s = 3.0
    server = LiveServer(tmp_path, drain_timeout_s=drain_s, max_batch_size=4)
    out: list[tuple[str, int | str]] = []
    stop = threading.Event()
    try:
        server.wait_ready()
        clients = [threading.Thread(target=keep_alive_client, args=(server.port, out, stop)) for _ in range(4)]
        for t in clients:
            t.start()
        give_up = time.monotonic() + 30
        while sum(s == 200 for _, s in out) < 20 and time.monotonic() < give_up:
            time.sleep(0.05)
        server.signal(signal.SIGTERM)
        signalled = time.monotonic()
        code = server.wait(drain_s + 10)
        exit_s = time.monotonic() - signalled
        stop.set()
        for t in clients:
            t.join(30)
        logged = {e["request_id"]: e["status"] for e in server.access()}
    finally:
        stop.set()
        server.close()
    received = dict(out)
    assert code == 0 and exit_s < drain_s + 1.0
    assert sum(s == 200 for s in logged.values()) >= 20
    lost = {rid: status for rid, status in logged.items() if received.get(rid) != status}
    assert not lost  # every answer the server logged reached its client
    assert {s for s in received.values() if isinstance(s, int)} <= {200, 503}
