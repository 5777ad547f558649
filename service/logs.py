"""Structured logs: JSON lines, one per request, with the X-Request-ID echoed to the client."""

from __future__ import annotations

import json
import logging
import re
import sys
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.auth import HEALTH_PATHS

_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message", "asctime", "taskName", "color_message",  # uvicorn's ANSI-coloured duplicate of msg
}
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")
QUIET_PATHS = HEALTH_PATHS | {"/metrics"}

access_log = logging.getLogger("service.access")


class JsonFormatter(logging.Formatter):
    """``{"timestamp", "level", "logger", "message", ...extra fields}`` on one line (the names GCP, Datadog and
    ECS log pipelines look for)."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "timestamp": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry.update({k: v for k, v in vars(record).items() if k not in _STANDARD and not k.startswith("_")})
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure_logging(level: str = "info", json_lines: bool = True) -> None:
    handler = logging.StreamHandler(sys.stderr)
    plain = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    handler.setFormatter(JsonFormatter() if json_lines else plain)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True


class RequestLogMiddleware:
    """Pure ASGI (so streaming and client-disconnect detection stay intact).

    Gives every request an id (the client's valid ``X-Request-ID`` or a new one), echoes it, and logs one
    line when the response is done, with the fields routes left in ``request.state.log``. ``on_done`` (the
    request metrics) sees the same facts.
    """

    def __init__(self, app: ASGIApp, on_done: Callable[[Scope, int, float], None] | None = None) -> None:
        self.app = app
        self.on_done = on_done

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.monotonic()
        given = dict(scope["headers"]).get(b"x-request-id", b"").decode("latin-1")
        request_id = given if _REQUEST_ID.match(given) else uuid.uuid4().hex
        state = scope.setdefault("state", {})
        state.update(request_id=request_id, started=start, log={})
        status = 500

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-request-id", request_id.encode())]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            seconds = time.monotonic() - start
            if self.on_done is not None:
                self.on_done(scope, status, seconds)
            quiet = (scope["path"] in QUIET_PATHS and status < 400) or "shed" in state  # shed: sampled by service.shed
            level = logging.DEBUG if quiet else logging.INFO
            client = scope.get("client")
            access_log.log(level, "%s %s %d", scope["method"], scope["path"], status, extra={
                "request_id": request_id, "method": scope["method"], "path": scope["path"], "status": status,
                "duration_ms": round(seconds * 1000, 3), "client": client[0] if client else None,
                **state.get("log", {}),
            })


class SampledLog:
    """Counts events by kind and logs at most one line per ``interval_s`` (with the counts so far as fields),
    so a flood of them (refused connections, shed requests) costs no log volume."""

    def __init__(self, logger: logging.Logger, level: int, kinds: tuple[str, ...] = (),
                 interval_s: float = 1.0) -> None:
        self.logger, self.level, self.interval_s = logger, level, interval_s
        self.counts: dict[str, int] = dict.fromkeys(kinds, 0)
        self._last = -interval_s

    def note(self, kind: str, message: str, *args: object, **fields: object) -> None:
        """Count one ``kind``; log ``message % args`` with ``fields`` and the counts unless a line went out
        less than ``interval_s`` ago."""
        self.counts[kind] = self.counts.get(kind, 0) + 1
        now = time.monotonic()
        if now - self._last >= self.interval_s:
            self._last = now
            self.logger.log(self.level, message, *args, extra={**fields, **self.counts})
