"""A real ``python -m service`` (uvicorn) on 127.0.0.1 for tests: started, watched and stopped by PID.

Its stdout/stderr (JSON log lines) go to a file the test can read back; RSS and open file descriptors
come from ``psutil``. Every process started here is SIGKILLed on exit if the test left it running.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import httpx
import psutil
from conftest import TINY_MODEL

ROOT = Path(__file__).resolve().parents[1]
# real ViT-Ti sizes (224 px, 12 blocks) with random weights: the load and signal tests' model
VIT_TI_224 = {"name": "vit", "arch": "vit_tiny_patch16_224", "weights": "random", "model_kwargs": {}}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ok(url: str, alive: Callable[[], bool], timeout: float, detail: Callable[[], str] = str,
            request_timeout: float = 1.0) -> float:
    """Seconds until ``GET url`` answered 200 (polling); fails if ``alive()`` turns false or ``timeout`` passes,
    with ``detail()`` (e.g. the server's log) in the message."""
    start = time.monotonic()
    while True:
        assert alive(), f"{url}: the server is gone\n{detail()}"
        try:
            if httpx.get(url, timeout=request_timeout, trust_env=False).status_code == 200:
                return time.monotonic() - start
        except httpx.TransportError:
            pass
        assert time.monotonic() - start < timeout, f"{url} did not answer 200 within {timeout} s\n{detail()}"
        time.sleep(0.05)


class LiveServer:
    def __init__(self, log_dir: Path, port: int | None = None, model: dict[str, Any] | None = None,
                 **settings: object) -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_dir / f"server-{self.port}-{time.monotonic_ns()}.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith("EVIT_")}
        env.update({"EVIT_MODELS": json.dumps([model or TINY_MODEL]), "EVIT_HOST": "127.0.0.1",
                    "EVIT_PORT": str(self.port), "EVIT_DEVICE": "cpu", "EVIT_TORCH_THREADS": "1",
                    "EVIT_LOG_LEVEL": "info"})
        env.update({f"EVIT_{k.upper()}": str(v) for k, v in settings.items()})
        self._log = self.log_path.open("w")
        self.proc = subprocess.Popen([sys.executable, "-m", "service"], cwd=ROOT, env=env,
                                     stdout=self._log, stderr=subprocess.STDOUT)
        self.ps = psutil.Process(self.proc.pid)

    def wait_ready(self, timeout: float = 90.0) -> float:
        """Seconds until ``/readyz`` said 200."""
        return wait_ok(f"{self.url}/readyz", lambda: self.proc.poll() is None, timeout,
                       lambda: f"exit code {self.proc.returncode}:\n{self.log_text()[-3000:]}")

    def rss_mb(self) -> float:
        return self.ps.memory_info().rss / 2**20

    def fds(self) -> int:
        return self.ps.num_fds()

    def log_text(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def log_lines(self) -> list[dict[str, Any]]:
        """The JSON log lines (anything else, e.g. a native library's warning, is skipped)."""
        out = []
        for line in self.log_text().splitlines():
            if line.startswith("{"):
                with suppress(json.JSONDecodeError):
                    out.append(json.loads(line))
        return out

    def access(self, path: str = "/classify") -> list[dict[str, Any]]:
        return [e for e in self.log_lines() if e.get("logger") == "service.access" and e.get("path") == path]

    def signal(self, sig: int) -> None:
        os.kill(self.proc.pid, sig)

    def wait(self, timeout: float) -> int:
        return self.proc.wait(timeout=timeout)

    def close(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)
        self._log.close()


@contextmanager
def live_server(log_dir: Path, **kwargs: Any) -> Iterator[LiveServer]:
    server = LiveServer(log_dir, **kwargs)
    try:
        server.wait_ready()
        yield server
    finally:
        server.close()


@contextmanager
def thread_server(app: Any, port: int | None = None, **config: Any) -> Iterator[str]:
    """``app`` on a real uvicorn server in a thread of this process, on 127.0.0.1; yields its URL once ready."""
    import threading

    import uvicorn

    port = port or free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, access_log=False,
                                           lifespan="on", **config))
    thread = threading.Thread(target=server.run, name=f"uvicorn-{port}", daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ok(f"{url}/readyz", thread.is_alive, 60)
        yield url
    finally:
        server.should_exit = True
        thread.join(30)
