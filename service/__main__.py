"""``evit-serve`` / ``python -m service``: settings from env and flags, load the models, run uvicorn.

With ``--metrics-port`` the metrics are also served alone on that port (a second uvicorn server, in a thread).
SIGTERM drains: readiness goes false and new requests get 503 at once, admitted requests are answered,
idle keep-alive connections are closed and busy ones close after their answer (``Connection: close``),
then the server exits (status 0) within ``drain_timeout_s`` + 0.5 s. A second SIGTERM, or SIGINT, falls
back to uvicorn's own shutdown. Connections are guarded by ``service.transport`` (headers, open connections).
A background task that dies (warm-up, a model's batch former) makes the server drain and exit non-zero
with the reason on stderr: 2 when warm-up found non-finite outputs (bad weights), else 1.
"""

from __future__ import annotations

import asyncio
import logging
import os
import resource
import signal
import socket
import sys
import threading
import time
from types import FrameType

import uvicorn
from pydantic import ValidationError

from service.app import create_app
from service.flags import parse_settings
from service.logs import configure_logging
from service.registry import ModelLoadError, load_registry
from service.runtime import Service
from service.settings import Settings
from service.transport import Guard

log = logging.getLogger("service.main")


class DrainingServer(uvicorn.Server):
    """uvicorn's server, with SIGTERM starting the service's drain before the listener closes."""

    def __init__(self, config: uvicorn.Config, service: Service, guard: Guard | None = None) -> None:
        super().__init__(config)
        self.service = service
        self.guard = guard
        self._loop: asyncio.AbstractEventLoop | None = None
        service.on_fatal = self._drain_then_exit  # called on the event loop

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().startup(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if sig == signal.SIGTERM and self._loop is not None and not self.service.draining and not self.should_exit:
            self._loop.call_soon_threadsafe(self._drain_then_exit)
            return
        super().handle_exit(sig, frame)

    def _drain_then_exit(self) -> None:
        exit_by = time.monotonic() + self.service.settings.drain_timeout_s + 0.5
        if self.guard is not None:
            self.guard.drain(self.server_state.connections)
        task = self.service.begin_drain()

        def exit_now(_: object) -> None:  # uvicorn's graceful wait gets what is left of the drain timeout
            self.config.timeout_graceful_shutdown = max(exit_by - time.monotonic(), 0.1)  # type: ignore[assignment]
            self.should_exit = True

        task.add_done_callback(exit_now)


def guard_of(settings: Settings) -> Guard:
    """The connection guard, with RLIMIT_NOFILE raised (within the hard limit) to fit its connection cap."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = settings.max_connections + 256  # model files, decode threads, the listener
    if soft != resource.RLIM_INFINITY and soft < need:
        soft = need if hard == resource.RLIM_INFINITY else min(need, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    cap = settings.max_connections if soft == resource.RLIM_INFINITY else min(settings.max_connections, soft - 256)
    if cap < settings.max_connections:
        log.warning("max_connections lowered to %d to fit the open-file limit %d", cap, soft)
    return Guard(max(cap, 1), settings.header_timeout_s, settings.max_header_bytes, settings.max_headers,
                 settings.body_timeout_s, max(4 * settings.max_body_bytes, 64 * 2**20))


def main(argv: list[str] | None = None) -> int:
    try:
        settings = parse_settings(argv)
    except ValidationError as e:
        problems = "\n".join(
            f"  {'.'.join(map(str, err['loc'])) or 'settings'}: {err['msg'].removeprefix('Value error, ')}"
            for err in e.errors()
        )
        print(f"evit-serve: invalid settings:\n{problems}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level, settings.log_json)
    try:  # before the (slow) model load: a taken metrics port fails at once
        metrics_socket = bind_metrics_port(settings)
    except OSError as e:
        print(f"evit-serve: cannot serve metrics on {settings.host}:{settings.metrics_port}: {e}", file=sys.stderr)
        return 2
    try:
        registry = load_registry(settings)
    except ModelLoadError as e:
        print(f"evit-serve: {e}", file=sys.stderr)
        return 2
    app = create_app(settings, registry)
    guard = guard_of(settings)
    config = uvicorn.Config(
        app, host=settings.host, port=settings.port, log_config=None, access_log=False,
        timeout_graceful_shutdown=settings.drain_timeout_s + 5, lifespan="on", http=guard.protocol(),
    )
    service = app.state.service
    metrics = metrics_server(metrics_socket, service)
    server = DrainingServer(config, service, guard)
    try:
        server.run()
    finally:
        if metrics is not None:
            metrics.should_exit = True
    code = 0 if server.started else 1
    if service.failure is not None:
        print(f"evit-serve: {service.failure}", file=sys.stderr)
        code = service.exit_code
    # Everything is answered and logged: skip the interpreter's teardown of native libraries (torch's takes
    # seconds), which would push the exit past the drain timeout.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def bind_metrics_port(settings: Settings) -> socket.socket | None:
    """A socket bound to ``settings.metrics_port`` (None if unset); OSError if the port is taken."""
    if settings.metrics_port is None:
        return None
    sock = socket.socket(socket.AF_INET6 if ":" in settings.host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((settings.host, settings.metrics_port))
    except OSError:
        sock.close()
        raise
    return sock


def metrics_server(sock: socket.socket | None, service: Service) -> uvicorn.Server | None:
    """The metrics alone on ``sock`` (like Triton's 8002), served from a thread; None without a socket."""
    if sock is None:
        return None
    config = uvicorn.Config(service.metrics.asgi_app(), log_config=None, access_log=False, lifespan="off")
    server = uvicorn.Server(config)  # not in the main thread: SIGTERM stays the main server's
    threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="metrics-server", daemon=True).start()
    return server


if __name__ == "__main__":
    sys.exit(main())
