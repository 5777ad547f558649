"""Servers and loopback load for ``benchmarks.service``: start ``python -m service`` processes (and the LitServe
peer, ``benchmarks.litserve_peer``), saturate them with closed-loop clients (a minimal HTTP/1.1 client, so the
load costs the shared CPU little) sending multipart or raw JPEGs, and probe ``/healthz``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(cmd: list[str]) -> subprocess.Popen:
    """``cmd`` in its own session (process group), so ``stop_server`` also ends the workers it forks."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("EVIT_")}
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)


def start_server(args: argparse.Namespace, flags: dict[str, object]) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "service", "--model", args.model, "--port", str(port), "--device", "cpu",
           "--max-batch-size", str(args.batch_size), "--log-level", "warning"]
    cmd += ["--checkpoint", str(args.checkpoint)] if args.checkpoint else ["--random-weights"]
    for k, v in flags.items():  # a boolean setting: --x / --no-x
        flag = k.replace("_", "-")
        cmd += ([f"--{'' if v else 'no-'}{flag}"] if isinstance(v, bool) else [f"--{flag}", str(v)])
    return spawn(cmd), f"http://127.0.0.1:{port}"


def start_litserve(args: argparse.Namespace, max_wait_ms: float) -> tuple[subprocess.Popen, str]:
    """The LitServe peer (``benchmarks.litserve_peer``) on the same model, weights, keep rate and batching."""
    port = free_port()
    cmd = [sys.executable, "-m", "benchmarks.litserve_peer", "--model", args.model, "--port", str(port),
           "--keep-rate", str(args.keep_rate), "--max-batch-size", str(args.batch_size),
           "--batch-timeout-ms", str(max_wait_ms)]
    cmd += ["--checkpoint", str(args.checkpoint)] if args.checkpoint else []
    return spawn(cmd), f"http://127.0.0.1:{port}"


def wait_ready(proc: subprocess.Popen, url: str, timeout: float = 300, path: str = "/readyz") -> None:
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"server {url} exited with status {proc.returncode}")
        try:
            if httpx.get(f"{url}{path}", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"server {url} not ready in time")
        time.sleep(0.2)


def stop_server(proc: subprocess.Popen) -> None:
    """SIGTERM to the server's process group (``spawn`` made one), SIGKILL after 60 s."""
    for sig, wait in ((signal.SIGTERM, 60), (signal.SIGKILL, None)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:  # the whole group is gone
            break
        try:
            proc.wait(timeout=wait)
            break
        except subprocess.TimeoutExpired:
            continue


async def _post(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, head: bytes, body: bytes,
                with_close: bool = False) -> Any:
    """One HTTP/1.1 request on a kept-alive connection; returns the status (the answer is read and dropped),
    with ``with_close`` also whether the server closes the connection after it (``Connection: close``).

    A minimal client on purpose: httpx spent 3-5 ms of CPU per request here, CPU that the server under
    test, on the same two cores, would then not have.
    """
    writer.write(head + body)
    status_line = await reader.readline()
    length, closing = 0, False
    while (line := await reader.readline()) not in (b"\r\n", b""):
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            length = int(value)
        elif name == b"connection":
            closing = value.strip().lower() == b"close"
    await reader.readexactly(length)
    status = int(status_line.split()[1])
    return (status, closing) if with_close else status


SERVICE_PATH = "/classify?keep_rate={rate}"
BOUNDARY = "evit-bench-7d4f1c"


def request_body(image: bytes, form: bool) -> tuple[str, bytes]:
    """(content type, body): a multipart form with the JPEG as field ``file`` (what browsers and ``requests``
    send), or with ``form`` false the raw JPEG."""
    if not form:
        return "image/jpeg", image
    head = (f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="image.jpg"\r\n'
            "Content-Type: image/jpeg\r\n\r\n").encode()
    return f"multipart/form-data; boundary={BOUNDARY}", head + image + f"\r\n--{BOUNDARY}--\r\n".encode()


async def _load(url: str, images: list[bytes], clients: int, seconds: float, rates: list[float], path: str,
                form: bool) -> dict:
    """``clients`` closed-loop clients for ``seconds``; latencies per keep rate, throughput, status codes.
    ``path`` may name ``{rate}``, the keep rate a request asks for."""
    latencies: dict[float, list[float]] = {r: [] for r in rates}
    codes: dict[int, int] = {}
    stop = time.monotonic() + seconds
    host, port = url.removeprefix("http://").split(":")
    bodies = [request_body(image, form) for image in images]

    async def one_client(n: int) -> None:
        reader, writer = await asyncio.open_connection(host, int(port))
        while time.monotonic() < stop:
            rate, (kind, body) = rates[n % len(rates)], bodies[n % len(bodies)]
            head = (f"POST {path.format(rate=rate)} HTTP/1.1\r\nHost: {host}\r\nContent-Type: {kind}\r\n"
                    f"Content-Length: {len(body)}\r\n\r\n").encode()
            t = time.perf_counter()
            code = await _post(reader, writer, head, body)
            codes[code] = codes.get(code, 0) + 1
            if code == 200:
                latencies[rate].append(time.perf_counter() - t)
            n += clients
        writer.close()

    start = time.perf_counter()
    await asyncio.gather(*(one_client(c) for c in range(clients)))
    elapsed = time.perf_counter() - start
    return {"throughput": sum(map(len, latencies.values())) / elapsed, "codes": codes, "latencies": latencies}


def probe_health(url: str, out: list[float], done: threading.Event, start_after_s: float = 0.0) -> None:
    """Time ``GET /healthz`` every 50 ms into ``out`` (seconds), after ``start_after_s``, until ``done`` is set."""
    with httpx.Client(base_url=url, timeout=10, trust_env=False) as c:
        time.sleep(start_after_s)
        while not done.is_set():
            t = time.perf_counter()
            c.get("/healthz")
            out.append(time.perf_counter() - t)
            time.sleep(0.05)


def saturate(url: str, images: list[bytes], clients: int, seconds: float, rates: list[float],
             health: list[float] | None = None, path: str = SERVICE_PATH, form: bool = True) -> dict:
    """Load ``url`` (``form``: multipart bodies, else raw JPEGs); with ``health``, also time ``/healthz``
    every 50 ms from another thread meanwhile."""
    done = threading.Event()
    prober = None if health is None else threading.Thread(  # the load builds up for a moment first
        target=probe_health, args=(url, health, done, min(1.0, seconds / 4)), daemon=True)
    if prober:
        prober.start()
    result = asyncio.run(_load(url, images, clients, seconds, rates, path, form))
    done.set()
    if prober:
        prober.join()
    return result
