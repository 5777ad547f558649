"""``python -m service.bench``: the service against the raw pipeline, on the same model, images and batch size.

Measures, in one run: the raw pipeline in this process (decode + preprocess + batched forward, in a loop);
the service's throughput at saturation (concurrent clients on loopback) with batching on and off; p50/p99
latency at low load against the raw single-image time; ``/healthz`` latency while the model is saturated;
and the batch-formation policies (auto / mixed / grouped) on a mixed keep-rate workload. Prints the ratios
the goals are stated in and writes everything to a JSON file. Not a test: timings depend on the machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import torch

from service.registry import host, resolve_device
from service.settings import ASSET_CHECKPOINT, ModelSpec, Settings
from service.worker import DeviceWorker, Sample

ROOT = Path(__file__).resolve().parents[1]
ASSET_IMAGES = ROOT / "../shared/assets/imagenet-sample"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))] if ordered else float("nan")


def load_images(directory: Path, count: int) -> list[bytes]:
    files = sorted(directory.glob("*.JPEG"))[:count] if directory.is_dir() else []
    if files:
        return [f.read_bytes() for f in files]
    import io

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    out = []
    for _ in range(count):  # no assets: synthetic JPEGs of ImageNet-like sizes
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (375, 500, 3), dtype=np.uint8)).save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


# -- the raw pipeline --------------------------------------------------------------------------------------
def raw_pipeline(spec: ModelSpec, images: list[bytes], batch: int, keep_rate: float, seconds: float) -> dict:
    settings = Settings(models=[spec], device="cpu")
    hosted = host(spec, settings, resolve_device("cpu"))
    worker = DeviceWorker(hosted.device, None)
    worker.warm_up(hosted, batch=min(batch, 8), repeats=1)

    def run(chunk: list[bytes]) -> None:
        samples = [Sample(hosted.preprocess(b), keep_rate, 5, False) for b in chunk]
        worker.forward(hosted, samples, record=False)

    singles = []
    for data in images[:20]:
        t = time.perf_counter()
        run([data])
        singles.append(time.perf_counter() - t)
    done, i, start = 0, 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        chunk = [images[(i + j) % len(images)] for j in range(batch)]
        run(chunk)
        done, i = done + batch, i + batch
    elapsed = time.perf_counter() - start
    worker.close()
    return {"throughput": done / elapsed, "single_p50_ms": 1000 * statistics.median(singles), "images": done}


# -- the service -------------------------------------------------------------------------------------------
@contextmanager
def server(args: argparse.Namespace, **flags: object):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "service", "--model", args.model, "--port", str(port), "--device", "cpu",
           "--max-batch-size", str(args.batch_size), "--log-level", "warning"]
    cmd += ["--checkpoint", str(args.checkpoint)] if args.checkpoint else ["--random-weights"]
    for k, v in flags.items():
        cmd += [f"--{k.replace('_', '-')}", str(v)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("EVIT_")}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited: {proc.stderr.read() if proc.stderr else ''}")
            try:
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("server not ready in time")
            time.sleep(0.2)
        yield url
    finally:
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()


async def _load(url: str, images: list[bytes], clients: int, seconds: float, rates: list[float]) -> dict:
    """``clients`` closed-loop clients for ``seconds``; latency per keep rate, throughput, status codes."""
    latencies: dict[float, list[float]] = {r: [] for r in rates}
    codes: dict[int, int] = {}
    stop = time.monotonic() + seconds
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:

        async def one_client(c: int) -> None:
            n = c
            while time.monotonic() < stop:
                rate = rates[n % len(rates)]
                t = time.perf_counter()
                r = await client.post("/classify", params={"keep_rate": rate}, content=images[n % len(images)],
                                      headers={"content-type": "image/jpeg"})
                codes[r.status_code] = codes.get(r.status_code, 0) + 1
                if r.status_code == 200:
                    latencies[rate].append(time.perf_counter() - t)
                n += clients

        start = time.perf_counter()
        await asyncio.gather(*(one_client(c) for c in range(clients)))
        elapsed = time.perf_counter() - start
    ok = sum(len(v) for v in latencies.values())
    return {
        "throughput": ok / elapsed, "codes": codes,
        "mean_ms": {f"{r:.2f}": 1000 * statistics.fmean(v) for r, v in latencies.items() if v},
        "p50_ms": {f"{r:.2f}": 1000 * percentile(v, 50) for r, v in latencies.items() if v},
    }


def saturate(url: str, images: list[bytes], clients: int, seconds: float, rates: list[float],
             probe_health: bool = False) -> dict:
    health: list[float] = []
    done = threading.Event()

    def probe() -> None:
        with httpx.Client(base_url=url, timeout=10) as c:
            time.sleep(1.0)  # let the load build up first
            while not done.is_set():
                t = time.perf_counter()
                c.get("/healthz")
                health.append(time.perf_counter() - t)
                time.sleep(0.05)

    prober = threading.Thread(target=probe, daemon=True)
    if probe_health:
        prober.start()
    result = asyncio.run(_load(url, images, clients, seconds, rates))
    done.set()
    if probe_health:
        prober.join()
        result["healthz_ms"] = {"p50": 1000 * percentile(health, 50), "p99": 1000 * percentile(health, 99),
                                "max": 1000 * max(health), "n": len(health)}
    return result


def low_load(url: str, images: list[bytes], keep_rate: float, count: int) -> dict:
    times = []
    with httpx.Client(base_url=url, timeout=30) as c:
        for i in range(count):
            t = time.perf_counter()
            r = c.post("/classify", params={"keep_rate": keep_rate}, content=images[i % len(images)],
                       headers={"content-type": "image/jpeg"})
            r.raise_for_status()
            times.append(time.perf_counter() - t)
            time.sleep(0.02)  # low load: no overlap between requests
    return {"p50_ms": 1000 * percentile(times, 50), "p99_ms": 1000 * percentile(times, 99), "n": count}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m service.bench", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="vit_tiny_patch16_224")
    p.add_argument("--checkpoint", type=Path, default=ROOT / ASSET_CHECKPOINT)
    p.add_argument("--images", type=Path, default=ASSET_IMAGES)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--keep-rate", type=float, default=0.7)
    p.add_argument("--seconds", type=float, default=8.0, help="per saturation phase")
    p.add_argument("--clients", type=int, default=0, help="concurrent clients at saturation (default 2x batch)")
    p.add_argument("--out", type=Path, default=Path("service-bench.json"))
    args = p.parse_args(argv)
    if args.checkpoint and not args.checkpoint.is_file():
        print(f"no checkpoint at {args.checkpoint}: random weights (timings only)")
        args.checkpoint = None
    clients = args.clients or 2 * args.batch_size
    images = load_images(args.images, 64)
    weights = str(args.checkpoint) if args.checkpoint else "random"
    spec = ModelSpec(arch=args.model, weights=weights)
    torch.set_num_threads(os.cpu_count() or 1)
    rate = [args.keep_rate]
    mixed = [0.5, 0.7, 1.0]

    report: dict[str, Any] = {"model": args.model, "weights": weights, "batch_size": args.batch_size,
                              "keep_rate": args.keep_rate, "clients": clients, "images": len(images),
                              "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    print(f"raw pipeline ({args.model}, batch {args.batch_size}, keep rate {args.keep_rate}) ...", flush=True)
    report["raw"] = raw_pipeline(spec, images, args.batch_size, args.keep_rate, args.seconds)
    print("service, batching on ...", flush=True)
    with server(args) as url:
        report["service"] = saturate(url, images, clients, args.seconds, rate, probe_health=True)
        report["low_load"] = low_load(url, images, args.keep_rate, 40)
        report["policy_auto"] = saturate(url, images, clients, args.seconds, mixed)
    print("service, batching off ...", flush=True)
    with server(args, max_batch_size=1) as url:
        report["batching_off"] = saturate(url, images, clients, args.seconds, rate)
    for policy in ("mixed", "grouped"):
        print(f"service, policy {policy} on mixed keep rates ...", flush=True)
        with server(args, batch_policy=policy) as url:
            report[f"policy_{policy}"] = saturate(url, images, clients, args.seconds, mixed)
    report["ratios"] = ratios = {
        "service_over_raw": report["service"]["throughput"] / report["raw"]["throughput"],
        "batching_on_over_off": report["service"]["throughput"] / report["batching_off"]["throughput"],
        "low_load_p50_minus_raw_single_ms": report["low_load"]["p50_ms"] - report["raw"]["single_p50_ms"],
        "healthz_p99_ms_at_saturation": report["service"]["healthz_ms"]["p99"],
    }
    args.out.write_text(json.dumps(report, indent=2))
    print(f"\nraw pipeline       {report['raw']['throughput']:8.1f} img/s   single image "
          f"{report['raw']['single_p50_ms']:.1f} ms")
    print(f"service saturated  {report['service']['throughput']:8.1f} img/s   x{ratios['service_over_raw']:.3f} "
          f"of raw (goal >= 0.9)")
    print(f"batching off       {report['batching_off']['throughput']:8.1f} img/s   on/off "
          f"x{ratios['batching_on_over_off']:.2f}")
    print(f"low load           p50 {report['low_load']['p50_ms']:.1f} ms  p99 {report['low_load']['p99_ms']:.1f} ms"
          f"   p50 - raw single {ratios['low_load_p50_minus_raw_single_ms']:+.1f} ms (goal <= 5)")
    h = report["service"]["healthz_ms"]
    print(f"/healthz saturated p50 {h['p50']:.1f} ms  p99 {h['p99']:.1f} ms  max {h['max']:.1f} ms (goal < 50)")
    for policy in ("auto", "mixed", "grouped"):
        r = report[f"policy_{policy}"]
        means = "  ".join(f"{k}: {v:.0f} ms" for k, v in r["mean_ms"].items())
        print(f"policy {policy:8s}    {r['throughput']:8.1f} img/s   mean latency by keep rate  {means}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
