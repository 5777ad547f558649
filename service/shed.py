"""Cheap shedding: inference requests that would be refused anyway (the model's queue is full, or the service
is draining) are answered 503 + Retry-After by a pure ASGI layer in front of everything else.

It sits inside the request-log middleware (request id, metrics) and authentication, outside everything
else: no routing, validation, dependency injection, body read or exception handling runs for these
requests, and their access-log line is at debug level; this module logs at most one line a second (``shed``
counts every shed request so far). Under a flood of clients that ignore Retry-After the event loop stays
free for the requests it admits and for ``/healthz``. The request metrics count every shed request like any
other 503 (label: the model it named).

An ``overloaded`` refusal is held ``shed_delay_ms`` before it is sent: a client that honours Retry-After
loses nothing, one that resends at once (a closed-loop flood) is slowed to one refusal per delay per
connection, so refusals cannot take the CPU (and the GIL) the inference thread needs.
"""

from __future__ import annotations

import asyncio
import json
import logging

from starlette.types import ASGIApp, Receive, Scope, Send

from service.edge import V2_INFER, query_param
from service.errors import error_body
from service.exceptions import Overloaded
from service.logs import SampledLog
from service.modelqueue import ModelQueue
from service.runtime import Service

log = logging.getLogger("service.shed")


class Shedder:
    def __init__(self, app: ASGIApp, service: Service) -> None:
        self.app = app
        self.service = service
        self.delay_s = service.settings.shed_delay_ms / 1e3
        self.log = SampledLog(log, logging.INFO, ("shed",))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        refusal = self._refusal(scope) if scope["type"] == "http" and scope["method"] == "POST" else None
        if refusal is None:
            await self.app(scope, receive, send)
            return
        error, message, retry, labels = refusal
        if self.delay_s and error == "overloaded":  # hold the answer: a client that resends at once then costs
            await asyncio.sleep(self.delay_s)  # at most one refusal per delay (it holds no CPU meanwhile)
        state = scope.setdefault("state", {})
        state["shed"] = True  # the access log line goes to debug level
        state["metric_labels"] = labels  # as the route would have counted it
        body = json.dumps(error_body(scope["path"], 503, error, message, state.get("request_id"))).encode()
        await send({"type": "http.response.start", "status": 503, "headers": [
            (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
            (b"retry-after", retry.encode())]})
        await send({"type": "http.response.body", "body": body})
        self.log.note("shed", "shed %s %s (503)", scope["path"], error, error=error, path=scope["path"])

    def _refusal(self, scope: Scope) -> tuple[str, str, str, tuple[str, float | None] | None] | None:
        """(error, message, Retry-After, metric labels) when the request would be refused before its body
        is read."""
        svc = self.service
        path = scope["path"]
        named = V2_INFER.match(path)
        if path != "/classify" and named is None:
            return None
        batcher, registry = svc.batcher, svc.registry
        if batcher is None or registry is None or not (svc.warmed or svc.draining):
            return None  # the route gives the precise answer
        name = named.group(1) if named else query_param(scope, "model")
        q = batcher.queues.get(name or registry.default)
        labels = None if q is None else (q.hosted.name, None if named else _rate(scope, q))
        if svc.draining:
            return "draining", "the service is shutting down", "1", labels
        if q is None:
            return None
        try:  # the batcher's own room check, for a normal-priority request (the route judges the others)
            batcher.room(q.hosted.name)
        except Overloaded as e:
            return "overloaded", e.message, str(e.retry_after_s), labels
        return None


def _rate(scope: Scope, q: ModelQueue) -> float | None:
    """The keep-rate label ``/classify`` gives a request: its ``keep_rate`` (None for auto), else the default."""
    given = query_param(scope, "keep_rate")
    if given is None:
        return q.hosted.default_keep_rate
    try:
        return float(given)
    except ValueError:
        return None
