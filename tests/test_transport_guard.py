"""Hostile transport against a real ``python -m service``: oversized and countless headers, half-open header
connections beyond the connection cap, headers that never finish, and a refusal sent while the client is
still uploading its body (``service.transport``). Every probe is bounded in connections, bytes and time."""

from __future__ import annotations

import contextlib
import http.client
import resource
import socket
import time

import httpx
import pytest
from _hostile import jpegs
from _live import live_server

pytestmark = pytest.mark.slow
CAP = 256
LIMITS = dict(max_connections=CAP, header_timeout_s=3.0, max_body_bytes=2**20, max_batch_size=4)
FLOOD = 3000
BODY = jpegs(1)[0]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with live_server(tmp_path_factory.mktemp("transport"), **LIMITS) as s:
        yield s


def classify(url: str) -> int:
    return httpx.post(url + "/classify", content=BODY, headers={"content-type": "image/jpeg"}, timeout=30,
                      trust_env=False).status_code


def raw_exchange(port: int, payload: bytes, chunk: int = 65536) -> bytes:
    """Send ``payload`` (stopping quietly if the server closes), then read what the server answered."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        try:
            for i in range(0, len(payload), chunk):
                s.sendall(payload[i : i + chunk])
        except OSError:
            pass
        try:
            return s.recv(4096)
        except OSError:
            return b""


def status_of(answer: bytes) -> int | None:
    return int(answer.split()[1]) if answer.startswith(b"HTTP/1.1 ") else None


@pytest.mark.parametrize("headers", [
    b"X-Big: " + b"a" * 2**20 + b"\r\n",  # one 1 MB header
    b"".join(b"X-%d: 1\r\n" % i for i in range(100_000)),  # 100,000 headers
], ids=["1MB-header", "100k-headers"])
def test_huge_headers_refused(server, headers: bytes) -> None:
    rss = server.rss_mb()
    answer = raw_exchange(server.port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + headers + b"\r\n")
    assert status_of(answer) in (431, None)  # 431, or closed before the answer could be read
    assert b"200 OK" not in answer
    assert classify(server.url) == 200  # still healthy
    assert server.rss_mb() - rss < 100


def test_header_timeout_closes_slow_headers(server) -> None:
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        start = time.monotonic()
        answer = s.recv(4096)  # blocks until the server gives up on the headers
        waited = time.monotonic() - start
    assert status_of(answer) == 408
    assert LIMITS["header_timeout_s"] - 0.5 < waited < LIMITS["header_timeout_s"] + 5


def _raise_fd_limit(want: int) -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < want:
        soft = min(want, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    return soft


def test_half_open_flood_stays_under_cap(server) -> None:
    count = min(FLOOD, _raise_fd_limit(FLOOD + 200) - 200)
    base = server.fds()
    socks: list[socket.socket] = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                s.connect(("127.0.0.1", server.port))
            socks.append(s)
        deadline = time.monotonic() + 20  # until the server holds (about) the cap: it accepted the flood
        while (peak := server.fds()) - base < CAP - 16 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert peak - base >= CAP - 16, peak - base  # (the rest keeps arriving: `during` is read after more)
        statuses = [classify(server.url) for _ in range(3)]
        during = server.fds()
    finally:
        for s in socks:
            s.close()
    assert statuses == [200, 200, 200]
    assert peak - base <= CAP + 16 and during - base <= CAP + 16
    assert classify(server.url) == 200


def test_refusal_reaches_client_sending_whole_body(server) -> None:
    """http.client sends the whole body before reading: the early 413 must arrive, not a reset."""
    body = b"\0" * (4 * 2**20)
    for _ in range(3):
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
        conn.request("POST", "/classify", body=body, headers={"Content-Type": "image/jpeg"})
        r = conn.getresponse()
        assert r.status == 413 and b"body_too_large" in r.read()
        conn.close()
