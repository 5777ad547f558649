"""Connection guard: uvicorn's httptools protocol with bounded headers, a header-read timeout, a cap on open
connections, refusals that reach clients still sending their body, and a drain that closes keep-alive.

uvicorn bounds neither the time a client may take to send its headers nor their size and count, nor the
number of open connections (``limit_concurrency`` only answers 503 once the headers are read, and every
idle connection still holds a file descriptor). :class:`GuardedHttp` adds, per connection:

- **headers**: the request line and headers count toward ``max_header_bytes`` (raw bytes received while
  the headers are incomplete, so a header that never ends is cut off too) and ``max_headers``; over
  either: 431 and the connection is closed.
- **header timeout**: headers must be complete ``header_timeout_s`` after the connection opens or the
  previous answer ends (an idle keep-alive connection is closed quietly; a partial request gets 408).
- **open connections**: at ``max_connections``, a new connection evicts the oldest one that is waiting
  for headers (a half-open or idle keep-alive one); when every connection is busy, it gets a canned 503.
- **refusals delivered**: an answer sent before the request body arrived (a 503, a 413) leaves the rest
  of the body to be read and discarded, bounded in bytes and time (then the connection is closed), and
  the connection is kept alive after it; when the server closes a connection whose body is still arriving
  (e.g. while draining) it does the same before closing. A client that sends its whole body before
  reading (Python's ``http.client``) sees the answer instead of a connection reset.
- **drain**: :meth:`Guard.drain` closes idle keep-alive connections and makes busy ones close after their
  answer (``Connection: close``); requests that arrive while draining are answered with it too.
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass, field
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from service.logs import SampledLog

log = logging.getLogger("service.transport")


def _canned(status: int, reason: str, message: str) -> bytes:
    body = json.dumps({"status": status, "error": reason, "message": message}).encode()
    head = (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
            "connection: close\r\nretry-after: 1\r\n\r\n")
    return head.encode() + body


TOO_MANY = _canned(503, "overloaded", "too many open connections; retry later")
HEADERS_TOO_LARGE = _canned(431, "headers_too_large", "request headers are over the size or count limit")
HEADER_TIMEOUT = _canned(408, "header_timeout", "request headers did not arrive in time")


@dataclass
class Guard:
    """Limits and shared state of every guarded connection of one server."""

    max_connections: int = 1000
    header_timeout_s: float = 10.0
    max_header_bytes: int = 32768
    max_headers: int = 100
    linger_s: float = 5.0  # a lingering close reads the unread body for at most this long ...
    linger_bytes: int = 64 * 2**20  # ... and at most this much of it
    open: int = 0
    waiting: dict[GuardedHttp, None] = field(default_factory=dict)  # waiting for headers, oldest first
    draining: bool = False
    refusals: SampledLog = field(default_factory=lambda: SampledLog(log, logging.WARNING, (
        "refused", "evicted", "header_timeout", "headers_too_large", "lingered", "discarded")))

    @property
    def counts(self) -> dict[str, int]:
        """Refusals so far, by kind."""
        return self.refusals.counts

    def note(self, what: str) -> None:
        """Count a refusal; log at most one line a second (with the counts), so floods cost no log volume."""
        self.refusals.note(what, "connection guard: %s", what, open_connections=self.open)

    def evict_oldest_waiting(self) -> bool:
        if not self.waiting:
            return False
        oldest = next(iter(self.waiting))
        oldest.close_waiting()
        self.note("evicted")
        return True

    def drain(self, connections: set[Any]) -> None:
        """Idle keep-alive connections closed; busy ones close after their answer; new answers close too."""
        self.draining = True
        for c in list(connections):
            c.shutdown()

    def protocol(self) -> type[GuardedHttp]:
        """The protocol class to give ``uvicorn.Config(http=...)``, bound to this guard."""
        return type("GuardedHttpBound", (GuardedHttp,), {"guard": self})


class _Lingering:
    """The connection's transport, whose ``close`` first reads the rest of an unfinished request body."""

    def __init__(self, transport: asyncio.Transport, protocol: GuardedHttp) -> None:
        self._t = transport
        self._p = protocol
        self.lingering = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self._t, name)

    def is_closing(self) -> bool:
        return self.lingering or self._t.is_closing()

    def close(self) -> None:
        p = self._p
        if self.lingering or self._t.is_closing():
            return
        cycle = p.cycle
        if cycle is None or not cycle.more_body or p.parser is None:
            self._t.close()
            return
        self.lingering = True  # discard the body (uvicorn's on_body drops it once the answer is complete)
        p.guard.note("lingered")
        p.linger_left = p.guard.linger_bytes
        p.loop.call_later(p.guard.linger_s, self._t.close)
        self._t.resume_reading()

    def finish(self) -> None:
        self._t.close()


class GuardedHttp(HttpToolsProtocol):
    """uvicorn's httptools protocol under a :class:`Guard` (see the module docstring)."""

    guard: Guard

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.rejected = False
        self.header_bytes = 0  # request line + headers, as parsed
        self.header_count = 0
        self.raw_bytes = 0  # bytes received while the headers are incomplete
        self.linger_left = 0
        self._timer: asyncio.TimerHandle | None = None

    # -- connection --------------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        g = self.guard
        if g.open >= g.max_connections and not g.evict_oldest_waiting():
            self.rejected = True
            transport.write(TOO_MANY)
            transport.close()
            g.note("refused")
            return
        g.open += 1
        super().connection_made(_Lingering(transport, self))  # type: ignore[arg-type]
        self._await_headers()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.rejected and self.transport is None:
            return  # refused in connection_made: uvicorn never saw it
        self.guard.open -= 1
        self._headers_done()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self.rejected:
            return
        transport: _Lingering = self.transport  # type: ignore[assignment]
        if self.linger_left:  # discarding the body of an answered request
            self.linger_left -= len(data)
            if self.linger_left <= 0:
                transport.finish()
                return
        elif self._timer is not None:
            self.raw_bytes += len(data)
        super().data_received(data)
        if self._timer is not None and not self.linger_left and self.raw_bytes > self.guard.max_header_bytes:
            self._refuse(HEADERS_TOO_LARGE, "headers_too_large")

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self.transport.is_closing() or (self.cycle is not None and not self.cycle.response_complete):
            return
        if self.cycle is not None and self.cycle.more_body:  # answered before the body arrived: discard the
            self.linger_left = self.guard.linger_bytes  # rest, bounded in bytes and time, then keep alive
            self._timer = self.loop.call_later(self.guard.linger_s, self._discard_timeout)
            return
        self._await_headers()  # idle keep-alive: the next request's headers are due in time

    def shutdown(self) -> None:
        self._headers_done()
        super().shutdown()

    # -- parser callbacks --------------------------------------------------------------------------
    def on_message_begin(self) -> None:
        super().on_message_begin()
        self.header_bytes = self.header_count = 0

    def on_url(self, url: bytes) -> None:
        super().on_url(url)
        self.header_bytes += len(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self.header_bytes += len(name) + len(value) + 4
        self.header_count += 1
        if self.header_count <= self.guard.max_headers:  # never store more than the limit
            super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._headers_done()
        g = self.guard
        if self.rejected:
            return
        if self.header_bytes > g.max_header_bytes or self.header_count > g.max_headers:
            self._refuse(HEADERS_TOO_LARGE, "headers_too_large")
            return
        super().on_headers_complete()
        cycle = self.cycle
        if cycle is None:
            return
        if g.draining:
            cycle.keep_alive = False  # answer with Connection: close

    def on_body(self, body: bytes) -> None:
        if not self.rejected:
            super().on_body(body)

    def on_message_complete(self) -> None:
        if self.rejected:
            return
        super().on_message_complete()
        transport: _Lingering = self.transport  # type: ignore[assignment]
        if transport.lingering:
            transport.finish()  # the whole body is in: the answer has been read or will be
        elif self.linger_left:  # the body of an answered request is discarded: the connection is idle
            self.linger_left = 0
            self.guard.counts["discarded"] += 1
            self._await_headers()

    # -- guard -------------------------------------------------------------------------------------
    def _await_headers(self) -> None:
        self._headers_done()
        self.raw_bytes = 0
        self.guard.waiting[self] = None
        self._timer = self.loop.call_later(self.guard.header_timeout_s, self._header_timeout)

    def _headers_done(self) -> None:
        self.guard.waiting.pop(self, None)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _discard_timeout(self) -> None:
        self._timer = None
        self.linger_left = 0
        self.transport.finish()  # type: ignore[attr-defined]

    def _header_timeout(self) -> None:
        self._timer = None
        if self.raw_bytes:
            self._refuse(HEADER_TIMEOUT, "header_timeout")
        else:
            self.close_waiting()
            self.guard.note("header_timeout")

    def close_waiting(self) -> None:
        """Close a connection that holds no request (half-open or idle keep-alive)."""
        self._headers_done()
        self.rejected = True
        self.transport.close()

    def _refuse(self, answer: bytes, what: str) -> None:
        self._headers_done()
        self.rejected = True
        self.transport.write(answer)
        self.transport.finish()  # type: ignore[attr-defined]
        self.guard.note(what)
