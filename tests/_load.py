"""Load for the reliability tests: closed loop (capacity) and open loop (scheduled arrivals), every answer classified.

Unlike ``evit-loadtest`` (latency percentiles per keep rate), this keeps each request's fate: its status,
whether a 503 carried ``Retry-After``, its request id, and, for transport failures, whether the
connection was refused (nobody accepted the request) or dropped after the request went out.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import urlencode, urlsplit

CLEAN_REJECTIONS = frozenset({400, 401, 404, 408, 413, 415, 422, 499, 503, 504})


@dataclass(frozen=True)
class Outcome:
    request_id: str
    status: int | None  # None: no HTTP answer
    seconds: float  # from the scheduled send time to the answer (or failure)
    retry_after: str | None = None
    error: str | None = None  # the JSON ``error`` type, or why no answer came (ConnectError, Timeout, ...)
    json_error_body: bool = False
    lag: float = 0.0  # how late the client itself sent (event loop busy), seconds
    server_s: float | None = None  # the service's own total time for a 200 (``timings.total_ms``)
    done_at: float = 0.0  # time.perf_counter() when the answer (or failure) came

    @property
    def kind(self) -> str:
        """accepted | rejected | refused (connect failed) | dropped (no answer) | hung | crash."""
        if self.status == 200:
            return "accepted"
        if self.status is None:
            return {"ConnectError": "refused", "Timeout": "hung"}.get(self.error or "", "dropped")
        clean = self.status in CLEAN_REJECTIONS and self.json_error_body
        if self.status == 503 and not self.retry_after:
            clean = False
        return "rejected" if clean else "crash"


def _parse(rid: str, raw: bytes, seconds: float, lag: float, done_at: float) -> Outcome:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    error, is_json, server_s = None, False, None
    try:
        payload = json.loads(body)
    except ValueError:
        payload = None
    if isinstance(payload, dict) and status == 200:
        server_s = payload.get("timings", {}).get("total_ms", 0.0) / 1000
    elif isinstance(payload, dict):
        error, is_json = payload.get("error"), payload.get("status") == status
    return Outcome(rid, status, seconds, headers.get("retry-after"), error, is_json, lag, server_s, done_at)


def summary(outcomes: Sequence[Outcome]) -> Counter[str]:
    return Counter(o.kind for o in outcomes)


def p99(values: Sequence[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))] if ordered else 0.0


class Client:
    """A minimal HTTP/1.1 client on asyncio streams, one connection per request (``Connection: close``).

    httpx costs milliseconds of CPU per request; at 10x overload on a shared 2-core machine that made the
    client, not the server, the bottleneck (its own event loop queued answers for seconds). This one costs
    a fraction of that, so the latencies it reports are the server's.
    """

    def __init__(self, url: str, bodies: Sequence[bytes], timeout: float, path: str = "/classify",
                 headers: dict[str, str] | None = None) -> None:
        parts = urlsplit(url)
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or 80
        self.path = path
        self.bodies = itertools.cycle(bodies)
        self.timeout = timeout
        extra = {"content-type": "image/jpeg", **(headers or {})}
        self.head = "".join(f"{k}: {v}\r\n" for k, v in extra.items())

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None

    async def send(self, scheduled: float | None = None, **params: object) -> Outcome:
        now = time.perf_counter()
        scheduled = now if scheduled is None else scheduled
        rid = uuid.uuid4().hex
        body = next(self.bodies)
        target = self.path + ("?" + urlencode(params) if params else "")
        request = (f"POST {target} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\nConnection: close\r\n"
                   f"Content-Length: {len(body)}\r\nX-Request-ID: {rid}\r\n{self.head}\r\n").encode() + body
        try:
            async with asyncio.timeout(self.timeout):
                reader, writer = await asyncio.open_connection(self.host, self.port)
                try:
                    writer.write(request)
                    await writer.drain()
                    raw = await reader.read()  # the server closes after its answer
                finally:
                    writer.close()
        except TimeoutError:
            raw, failure = b"", "Timeout"
        except ConnectionRefusedError:
            raw, failure = b"", "ConnectError"
        except OSError as e:  # reset, broken pipe: the connection died under the request
            raw, failure = b"", type(e).__name__
        else:
            failure = "EmptyResponse"
        done = time.perf_counter()
        if not raw.startswith(b"HTTP/1."):
            return Outcome(rid, None, done - scheduled, error=failure, lag=now - scheduled, done_at=done)
        return _parse(rid, raw, done - scheduled, now - scheduled, done)

    async def closed_loop(self, concurrency: int, seconds: float, stop_unless_200: bool = False,
                          out: list[Outcome] | None = None) -> list[Outcome]:
        """``concurrency`` clients back to back for ``seconds``; with ``stop_unless_200`` each client stops at
        its first other answer (as a load balancer stops routing to a server that refuses or vanished).
        Outcomes are appended to ``out`` as they come, so a caller can watch the run's progress."""
        end = time.perf_counter() + seconds
        out = [] if out is None else out

        async def worker() -> None:
            while time.perf_counter() < end:
                outcome = await self.send()
                out.append(outcome)
                if stop_unless_200 and outcome.status != 200:
                    return

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return out

    async def open_loop(self, rate: float, seconds: float) -> tuple[list[Outcome], float]:
        """Requests at ``rate``/s for ``seconds`` (constant spacing, latency from the schedule); and the
        rate actually achieved (sends per second of the sending window)."""
        start = time.perf_counter()
        tasks = []
        for i in itertools.count():
            scheduled = start + i / rate
            if scheduled - start >= seconds:
                break
            delay = scheduled - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(self.send(scheduled)))
        window = time.perf_counter() - start
        return list(await asyncio.gather(*tasks)), len(tasks) / max(window, 1e-9)
