"""``python -m benchmarks.service``: the service against the raw pipeline, on the same model, images and batch size.

Measures, in one run: the raw pipeline in this process (decode + preprocess + batched forward, in a loop);
the service's throughput at saturation (concurrent clients on loopback) with batching on and off; p50/p99
latency at low load against the raw single-image time; ``/healthz`` latency while the model is saturated;
and the batch-formation policies (auto / mixed / grouped) on a mixed keep-rate workload. With ``--backend`` /
``--precision`` (e.g. ``--backend openvino --precision auto``) a server on that backend is loaded the same way
in every round and compared with the eager fp32 service: throughput ratio and p50/p99 latency of each
(phase ``fast``; ``--backend-only`` runs just these two). Unless ``--no-litserve``, a LitServe server
(``benchmarks.litserve_peer``: the same weights and eager fp32 EViT model at ``--keep-rate``, batched up to
``--batch-size`` with the service's default max wait as its batch timeout) takes the same load (phase
``litserve``): its req/s, p50 and p99 are printed next to the services'. Loads send multipart JPEGs (field
``file``) unless ``--raw-body`` (the services then get the raw JPEG; LitServe always the form).

All servers start first and stay up; the phases then run interleaved, round after round, and each phase
reports its median round (the low-load comparison alternates one raw image and one request). On a CPU that
other work shares, a slow spell then lands on every configuration alike instead of on whichever ran
during it. Prints the ratios the goals are stated in and writes everything to a JSON file. Not a test.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import torch

from benchmarks.servers import ROOT, SERVICE_PATH, saturate, start_litserve, start_server, stop_server, wait_ready
from evit.backends import BACKENDS
from evit.precision import PRECISIONS
from service.job import Job
from service.registry import host, resolve_device
from service.settings import ASSET_CHECKPOINT, ModelSpec, Settings
from service.worker import DeviceWorker

ASSET_IMAGES = ROOT / "../shared/assets/imagenet-sample"
MIXED_RATES = [0.5, 0.7, 1.0]
SERVERS = {"batched": {}, "unbatched": {"max_batch_size": 1}, "mixed": {"batch_policy": "mixed"},
           "grouped": {"batch_policy": "grouped"}}  # extra flags per server; "batched" uses the auto policy


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))] if ordered else float("nan")


def load_images(directory: Path, count: int) -> list[bytes]:
    """The assets' JPEGs or, without them, synthetic JPEGs of an ImageNet-like size."""
    files = sorted(directory.glob("*.JPEG"))[:count] if directory.is_dir() else []
    if files:
        return [f.read_bytes() for f in files]
    import io

    import numpy as np
    from PIL import Image

    rng, out = np.random.default_rng(0), []
    for _ in range(count):
        Image.fromarray(rng.integers(0, 256, (375, 500, 3), dtype=np.uint8)).save(buf := io.BytesIO(), "JPEG")
        out.append(buf.getvalue())
    return out


class RawPipeline:
    """Decode + preprocess + forward in this process, with the service's own model and preprocessing code.

    It runs on a worker thread like the service's: here, torch ops issued from the main thread ran up to
    3x slower than the same ops from another thread, which would flatter the service.
    """

    def __init__(self, spec: ModelSpec, batch: int, keep_rate: float) -> None:
        self.hosted = host(spec, Settings(models=[spec], device="cpu"), resolve_device("cpu"))
        self.worker = DeviceWorker(self.hosted.device)
        self.worker.executor.submit(self.worker.warm_up, self.hosted, min(batch, 8), 1).result()
        self.batch, self.keep_rate = batch, keep_rate

    def _run(self, chunk: list[bytes]) -> None:
        samples = [Job(self.keep_rate, math.inf, tensor=self.hosted.preprocess(b), top_k=5) for b in chunk]
        self.worker.forward(self.hosted, samples)

    def run(self, chunk: list[bytes]) -> None:
        self.worker.executor.submit(self._run, chunk).result()

    def _saturate(self, images: list[bytes], seconds: float) -> dict:
        done, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            self._run([images[(done + j) % len(images)] for j in range(self.batch)])
            done += self.batch
        return {"throughput": done / (time.perf_counter() - start)}

    def saturate(self, images: list[bytes], seconds: float) -> dict:
        return self.worker.executor.submit(self._saturate, images, seconds).result()


def low_load(raw: RawPipeline, url: str, images: list[bytes], keep_rate: float, pairs: int) -> dict:
    """Alternate one raw single image and one request to the idle service, ``pairs`` times."""
    raw_t, svc_t = [], []
    with httpx.Client(base_url=url, timeout=30) as c:
        for i in range(pairs):
            data = images[i % len(images)]
            t = time.perf_counter()
            raw.run([data])
            raw_t.append(time.perf_counter() - t)
            time.sleep(0.02)
            t = time.perf_counter()
            c.post("/classify", params={"keep_rate": keep_rate}, content=data,
                   headers={"content-type": "image/jpeg"}).raise_for_status()
            svc_t.append(time.perf_counter() - t)
            time.sleep(0.02)
    ms = [1000 * t for t in svc_t]
    return {"raw_single_p50_ms": 1000 * statistics.median(raw_t), "p50_ms": percentile(ms, 50),
            "p99_ms": percentile(ms, 99), "pairs": pairs}


def summarise(rounds: list[dict]) -> dict:
    """Median-throughput round, with the latencies of all rounds pooled."""
    pooled: dict[float, list[float]] = {}
    codes: dict[int, int] = {}
    for r in rounds:
        for rate, values in r.get("latencies", {}).items():
            pooled.setdefault(rate, []).extend(values)
        for code, n in r.get("codes", {}).items():
            codes[code] = codes.get(code, 0) + n
    out: dict[str, Any] = {"throughput": statistics.median(r["throughput"] for r in rounds),
                           "rounds": [r["throughput"] for r in rounds]}
    if pooled:
        out["codes"] = codes
        out["mean_ms"] = {f"{k:.2f}": 1000 * statistics.fmean(v) for k, v in pooled.items() if v}
        out["p50_ms"] = {f"{k:.2f}": 1000 * percentile(v, 50) for k, v in pooled.items() if v}
        out["p99_ms"] = {f"{k:.2f}": 1000 * percentile(v, 99) for k, v in pooled.items() if v}
    return out


def backend_flags(args: argparse.Namespace) -> dict[str, object]:
    """The compared server's flags: its backend and precision, buckets covering the benchmark's rates."""
    rates = sorted({args.keep_rate, *MIXED_RATES})
    return {"backend": args.backend, "precision": args.precision, "keep_rates": ",".join(map(str, rates))}


def server_set(args: argparse.Namespace) -> dict[str, dict[str, object]]:
    servers = {"batched": {}} if args.backend_only else dict(SERVERS)
    if args.backend != "torch" or args.precision not in ("fp32", None):
        servers["fast"] = backend_flags(args)
    return servers


def run(args: argparse.Namespace) -> dict[str, Any]:
    images = load_images(args.images, 64)
    clients = args.clients or 2 * args.batch_size
    spec = ModelSpec(arch=args.model, weights=str(args.checkpoint) if args.checkpoint else "random")
    servers = {name: start_server(args, flags) for name, flags in server_set(args).items()}
    if args.litserve:
        servers["litserve"] = start_litserve(args, Settings.model_fields["max_wait_ms"].default)
    try:
        raw = RawPipeline(spec, args.batch_size, args.keep_rate)
        for name, (proc, url) in servers.items():
            wait_ready(proc, url, path="/health" if name == "litserve" else "/readyz")
        url = {name: u for name, (_, u) in servers.items()}
        health: list[float] = []
        rate, sec, form = [args.keep_rate], args.seconds, not args.raw_body

        def load(name: str, rates: list[float], probe: list[float] | None = None,
                 seconds: float = sec) -> Callable[[], dict]:
            """A load on server ``name``: the services' route and body (``form``), or LitServe's (a form)."""
            path, as_form = ("/predict", True) if name == "litserve" else (SERVICE_PATH, form)
            return lambda: saturate(url[name], images, clients, seconds, rates, probe, path=path, form=as_form)

        phases: dict[str, Callable[[], dict]] = {"raw": lambda: raw.saturate(images, sec),
                                                 "service": load("batched", rate, health)}
        if "fast" in url:
            phases["fast"] = load("fast", rate)
        if "litserve" in url:
            phases["litserve"] = load("litserve", rate)
        if not args.backend_only:
            phases.update({"batching_off": load("unbatched", rate), "policy_auto": load("batched", MIXED_RATES),
                           "policy_mixed": load("mixed", MIXED_RATES), "policy_grouped": load("grouped", MIXED_RATES)})
        for name in url:  # first requests (LitServe's first passes took seconds): not measured
            load(name, rate, seconds=args.warmup_seconds)()
        rounds: dict[str, list[dict]] = {name: [] for name in phases}
        for r in range(args.rounds):
            for name, phase in phases.items():
                print(f"round {r + 1}/{args.rounds}: {name} ...", flush=True)
                rounds[name].append(phase())
        report: dict[str, Any] = {name: summarise(rs) for name, rs in rounds.items()}
        report["low_load"] = low_load(raw, url["batched"], images, args.keep_rate, args.pairs)
        report["service"]["healthz_ms"] = {"p50": 1000 * percentile(health, 50), "p99": 1000 * percentile(health, 99),
                                           "max": 1000 * max(health), "n": len(health)}
    finally:
        for proc, _ in servers.values():
            stop_server(proc)
    report.update(model=args.model, weights=spec.weights, batch_size=args.batch_size, keep_rate=args.keep_rate,
                  backend=args.backend, precision=args.precision, body="raw" if args.raw_body else "multipart",
                  clients=clients, rounds=args.rounds, seconds_per_phase=sec, cpus=os.cpu_count(),
                  torch_threads=torch.get_num_threads())
    return report


def print_http(report: dict[str, Any]) -> None:
    """The eager fp32 service, the compared backend and LitServe under the same load: req/s, p50/p99 of each,
    the backend's throughput over the eager service's and its p99 against LitServe's."""
    key, ratios = f"{report['keep_rate']:.2f}", report["ratios"]
    svc, fast, lit = report["service"], report.get("fast"), report.get("litserve")
    rows = {"eager fp32 service": svc, f"{report['backend']} {report['precision']} service": fast,
            "litserve (eager fp32)": lit}
    for name, r in rows.items():
        if r is not None:
            print(f"{name:28s} {r['throughput']:8.1f} req/s   p50 {r['p50_ms'][key]:.0f} ms  "
                  f"p99 {r['p99_ms'][key]:.0f} ms")
    best = fast or svc
    if fast is not None:
        ratios["backend_over_eager_fp32_service"] = ratio = fast["throughput"] / svc["throughput"]
        print(f"{report['backend']} {report['precision']} over eager fp32 service: x{ratio:.2f} (goal >= 2)")
    if lit is not None:
        ratios["throughput_over_litserve"] = best["throughput"] / lit["throughput"]
        ratios["p99_over_litserve"] = p99 = best["p99_ms"][key] / lit["p99_ms"][key]
        ratios["eager_service_over_litserve"] = svc["throughput"] / lit["throughput"]
        print(f"eager fp32 service over litserve: x{ratios['eager_service_over_litserve']:.2f} req/s")
        print(f"{'compared' if fast else 'eager'} service over litserve: x{ratios['throughput_over_litserve']:.2f} "
              f"req/s, p99 x{p99:.2f} of litserve's (goal <= 1)")


def print_report(report: dict[str, Any]) -> None:
    raw, svc, low = report["raw"], report["service"], report["low_load"]
    report["ratios"] = ratios = {
        "service_over_raw": svc["throughput"] / raw["throughput"],
        "low_load_p50_minus_raw_single_ms": low["p50_ms"] - low["raw_single_p50_ms"],
        "healthz_p99_ms_at_saturation": svc["healthz_ms"]["p99"],
    }
    print(f"\n{report['model']} ({report['weights']}), batch {report['batch_size']}, keep rate {report['keep_rate']}, "
          f"{report['clients']} clients, median of {report['rounds']} interleaved rounds")
    print(f"raw pipeline       {raw['throughput']:8.1f} img/s")
    print(f"service saturated  {svc['throughput']:8.1f} img/s   x{ratios['service_over_raw']:.3f} of raw (goal >= 0.9)")
    print_http(report)
    if "batching_off" not in report:
        return
    off = report["batching_off"]
    ratios["batching_on_over_off"] = svc["throughput"] / off["throughput"]
    print(f"batching off       {off['throughput']:8.1f} img/s   on/off x{ratios['batching_on_over_off']:.2f}")
    print(f"low load           p50 {low['p50_ms']:.1f} ms  p99 {low['p99_ms']:.1f} ms  raw single image "
          f"{low['raw_single_p50_ms']:.1f} ms  difference {ratios['low_load_p50_minus_raw_single_ms']:+.1f} ms "
          f"(goal <= +5)")
    h = svc["healthz_ms"]
    print(f"/healthz saturated p50 {h['p50']:.1f} ms  p99 {h['p99']:.1f} ms  max {h['max']:.1f} ms (goal < 50)")
    for policy in ("auto", "mixed", "grouped"):
        r = report[f"policy_{policy}"]
        means = "  ".join(f"{k}: {v:.0f} ms" for k, v in r["mean_ms"].items())
        print(f"policy {policy:8s}    {r['throughput']:8.1f} img/s   mean latency by keep rate  {means}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.service", description=__doc__.splitlines()[0])
    for flag, kind, default, text in (
        ("--model", str, "vit_tiny_patch16_224", "timm architecture"),
        ("--checkpoint", Path, ROOT / ASSET_CHECKPOINT, "weights (random when absent)"),
        ("--images", Path, ASSET_IMAGES, "folder of .JPEG files (synthetic JPEGs when absent)"),
        ("--batch-size", int, 16, "max batch size of the service and batch of the raw pipeline"),
        ("--keep-rate", float, 0.7, "keep rate of the single-rate phases"),
        ("--seconds", float, 4.0, "per phase and round"),
        ("--warmup-seconds", float, 3.0, "unmeasured load on each server before the rounds"),
        ("--rounds", int, 3, "interleaved rounds"),
        ("--pairs", int, 40, "low-load raw/service pairs"),
        ("--clients", int, 0, "concurrent clients at saturation (default 2x batch)"),
        ("--out", Path, Path("out/service-bench.json"), "JSON report"),
    ):
        p.add_argument(flag, type=kind, default=default, help=text)
    p.add_argument("--backend", choices=BACKENDS, default="torch",
                   help="also serve on this backend and compare it with the eager fp32 service")
    p.add_argument("--precision", choices=PRECISIONS, default="fp32")
    p.add_argument("--litserve", action=argparse.BooleanOptionalAction, default=True,
                   help="also load a LitServe server on the same model (needs the litserve package)")
    p.add_argument("--raw-body", action="store_true", help="send the services raw JPEG bodies, not multipart")
    p.add_argument("--backend-only", action="store_true",
                   help="only the eager fp32 service and the --backend one (no batching-off / policy servers)")
    args = p.parse_args(argv)
    if args.litserve and importlib.util.find_spec("litserve") is None:
        print("litserve is not installed (pip install litserve): no LitServe peer")
        args.litserve = False
    if args.checkpoint and not args.checkpoint.is_file():
        print(f"no checkpoint at {args.checkpoint}: random weights (timings only)")
        args.checkpoint = None
    report = run(args)
    print_report(report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
