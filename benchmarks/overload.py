"""Overload benchmark: goodput, ``/healthz`` latency and status codes under N x overload from clients that
ignore Retry-After, against one ``python -m service`` (``python -m benchmarks.overload``).

Each of ``--rounds`` rounds runs three phases of ``--seconds``:

1. Capacity: ``--batch-size`` closed-loop keep-alive clients: answers/s (200s).
2. Overload, open loop: arrivals at ``--overload`` x that capacity, each sent whether
   or not earlier ones were refused (no back-off), on kept-alive connections (a new one when none is free
   or the server closed one).
3. Flood: ``--flood-clients`` closed-loop clients, each sending again at once after any answer (as
   ``hey -c 64``): the offered load is whatever the server can refuse.

During 2 and 3 ``/healthz`` is probed every 50 ms from another thread. Prints, all from this one run:
capacity, and for 2 and 3 the offered load and goodput as multiples of the capacity measured just before
(per round and their mean), ``/healthz`` p50/p99 over all probes, the status codes seen, and whether the
server's ``evit_requests_total`` counters match them.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import threading
import time
from collections import Counter
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from benchmarks.servers import _post, probe_health, saturate, start_server, stop_server, wait_ready
from benchmarks.service import percentile

ASSETS = Path(__file__).resolve().parents[2] / "shared" / "assets"  # as tests/conftest.py: ../shared/assets
if not ASSETS.exists():
    ASSETS = Path("/work/shared/assets")


class Pool:
    """Kept-alive connections to one server; ``send`` borrows an idle one or opens a new one."""

    def __init__(self, url: str) -> None:
        self.host, port = url.removeprefix("http://").split(":")
        self.port = int(port)
        self.idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        self.opened = 0

    async def send(self, body: bytes) -> int | str:
        conn = self.idle.pop() if self.idle else None
        if conn is None:
            conn = await asyncio.open_connection(self.host, self.port)
            self.opened += 1
        head = (f"POST /classify HTTP/1.1\r\nHost: {self.host}\r\nContent-Type: image/jpeg\r\n"
                f"Content-Length: {len(body)}\r\n\r\n").encode()
        try:
            code, closing = await _post(conn[0], conn[1], head, body, with_close=True)
        except (OSError, asyncio.IncompleteReadError, ValueError, IndexError) as e:
            conn[1].close()
            return type(e).__name__
        if closing:
            conn[1].close()
        else:
            self.idle.append(conn)
        return code


async def open_loop(url: str, images: list[bytes], rate: float, seconds: float) -> tuple[Counter, float]:
    """Poisson arrivals at ``rate``/s for ``seconds``; the status (or error) of each, and the time it took."""
    pool, codes, tasks = Pool(url), Counter(), []
    rng = random.Random(0)

    async def one(body: bytes) -> None:
        codes[await pool.send(body)] += 1

    start = time.perf_counter()
    next_at = start
    while next_at - start < seconds:
        await asyncio.sleep(max(0.0, next_at - time.perf_counter()))
        tasks.append(asyncio.create_task(one(images[len(tasks) % len(images)])))
        next_at += rng.expovariate(rate)
    await asyncio.gather(*tasks)
    return codes, time.perf_counter() - start


async def flood(url: str, images: list[bytes], clients: int, seconds: float) -> tuple[Counter, float]:
    """``clients`` closed-loop clients, each sending again as soon as it has an answer (as ``hey -c``)."""
    pool, codes = Pool(url), Counter()
    stop = time.perf_counter() + seconds

    async def client(n: int) -> None:
        while time.perf_counter() < stop:
            codes[await pool.send(images[n % len(images)])] += 1
            n += clients

    start = time.perf_counter()
    await asyncio.gather(*(client(c) for c in range(clients)))
    return codes, time.perf_counter() - start


def counted(url: str) -> Counter:
    """``evit_requests_total`` by status code, from the server's /metrics."""
    out: Counter = Counter()
    for family in text_string_to_metric_families(httpx.get(url + "/metrics", trust_env=False).text):
        for s in family.samples:
            if s.name == "evit_requests_total":
                out[int(s.labels["code"])] += int(s.value)
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    """``--rounds`` rounds of (capacity, open-loop overload, flood), so each overload is compared with the
    capacity measured just before it on a machine whose load drifts."""
    images = [p.read_bytes() for p in sorted((ASSETS / "imagenet-sample").glob("*.JPEG"))[:16]]
    if not images:
        raise SystemExit(f"no JPEGs under {ASSETS / 'imagenet-sample'}")
    flags = {"queue_size": args.queue_size, "request_timeout_s": args.request_timeout_s,
             "shed_delay_ms": args.shed_delay_ms}
    proc, url = start_server(args, flags)
    capacities: list[float] = []
    rows: dict[str, list[dict[str, Any]]] = {f"open loop {args.overload:g}x": [], f"flood -c {args.flood_clients}": []}
    try:
        wait_ready(proc, url)
        saturate(url, images, args.batch_size, 2.0, [1.0])  # warm the caches and the latency model
        for _ in range(args.rounds):
            capacity = saturate(url, images, args.batch_size, args.seconds, [1.0])["throughput"]
            capacities.append(capacity)
            loads = (open_loop(url, images, args.overload * capacity, args.seconds),
                     flood(url, images, args.flood_clients, args.seconds))
            for row, load in zip(rows.values(), loads, strict=True):
                row.append(overloaded(url, load, capacity))
    finally:
        stop_server(proc)
    return {"capacity": sum(capacities) / len(capacities), "rows": {k: combine(v) for k, v in rows.items()}}


def overloaded(url: str, load: Coroutine[Any, Any, tuple[Counter, float]], capacity: float) -> dict[str, Any]:
    """Run ``load`` while probing /healthz; goodput against ``capacity``, codes, and the server's counters."""
    before = counted(url)
    health: list[float] = []
    done = threading.Event()
    prober = threading.Thread(target=probe_health, args=(url, health, done), daemon=True)
    prober.start()
    codes, elapsed = asyncio.run(load)
    done.set()
    prober.join()
    server = counted(url) - before
    return {"offered": sum(codes.values()) / elapsed / capacity, "ratio": codes[200] / elapsed / capacity,
            "health": health, "codes": codes,
            "match": {k: v for k, v in codes.items() if isinstance(k, int)} == server}


def combine(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Rounds of one kind of overload: mean ratios, /healthz percentiles over every probe, codes summed."""
    health = [h for r in rounds for h in r["health"]]
    return {"offered_x": sum(r["offered"] for r in rounds) / len(rounds),
            "ratio": sum(r["ratio"] for r in rounds) / len(rounds), "ratios": [r["ratio"] for r in rounds],
            "healthz_p50_ms": percentile(health, 50) * 1e3, "healthz_p99_ms": percentile(health, 99) * 1e3,
            "codes": dict(sum((r["codes"] for r in rounds), Counter())),
            "counters_match": all(r["match"] for r in rounds)}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="vit_tiny_patch16_224")
    default_ckpt = ASSETS / "weights" / "vit_tiny_patch16_224.augreg_in21k_ft_in1k.safetensors"
    p.add_argument("--checkpoint", type=Path, default=default_ckpt if default_ckpt.exists() else None)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--queue-size", type=int, default=8)
    p.add_argument("--request-timeout-s", type=float, default=10.0)
    p.add_argument("--overload", type=float, default=10.0, help="offered load as a multiple of capacity")
    p.add_argument("--seconds", type=float, default=20.0, help="length of each phase")
    p.add_argument("--flood-clients", type=int, default=64, help="closed-loop clients that never back off")
    p.add_argument("--shed-delay-ms", type=float, default=100.0, help="the server's --shed-delay-ms")
    p.add_argument("--rounds", type=int, default=2, help="rounds of capacity, open loop, flood")
    r = run(p.parse_args(argv))
    print(f"capacity {r['capacity']:.1f}/s (mean of the rounds)")
    for name, row in r["rows"].items():
        ratios = " ".join(f"{x:.2f}" for x in row["ratios"])
        print(f"{name}: offered {row['offered_x']:.1f}x capacity  goodput/capacity {row['ratio']:.2f} (rounds: "
              f"{ratios})  /healthz p50 {row['healthz_p50_ms']:.1f} ms p99 {row['healthz_p99_ms']:.1f} ms  "
              f"codes {row['codes']}  counters match: {row['counters_match']}")


if __name__ == "__main__":
    main()
