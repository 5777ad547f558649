"""``evit-serve`` / ``python -m service``: settings from env and flags, load the models, run uvicorn.

With ``--metrics-port`` the metrics are also served alone on that port (a second uvicorn server, in a thread).
SIGTERM drains: readiness goes false and new requests get 503 at once, admitted requests are answered,
then the server exits (status 0). A second SIGTERM, or SIGINT, falls back to uvicorn's own shutdown.
A background task that dies (warm-up, a model's batch former) makes the server drain and exit non-zero
with the reason on stderr: 2 when warm-up found non-finite outputs (bad weights), else 1.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import sys
import threading
from types import FrameType

import uvicorn
from pydantic import ValidationError

from service.app import create_app
from service.flags import parse_settings
from service.logs import configure_logging
from service.registry import ModelLoadError, load_registry
from service.runtime import Service
from service.settings import Settings

log = logging.getLogger("service.main")


class DrainingServer(uvicorn.Server):
    """uvicorn's server, with SIGTERM starting the service's drain before the listener closes."""

    def __init__(self, config: uvicorn.Config, service: Service) -> None:
        super().__init__(config)
        self.service = service
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
        task = self.service.begin_drain()
        task.add_done_callback(lambda _: setattr(self, "should_exit", True))


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
    config = uvicorn.Config(
        app, host=settings.host, port=settings.port, log_config=None, access_log=False,
        timeout_graceful_shutdown=settings.drain_timeout_s + 5, lifespan="on",
    )
    service = app.state.service
    metrics = metrics_server(metrics_socket, service)
    try:
        DrainingServer(config, service).run()
    finally:
        if metrics is not None:
            metrics.should_exit = True
    if service.failure is not None:
        print(f"evit-serve: {service.failure}", file=sys.stderr)
        return service.exit_code
    return 0


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
