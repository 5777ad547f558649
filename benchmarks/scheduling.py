"""``python -m benchmarks.scheduling``: keep_rate=auto against a fixed keep rate 1.0 under overload, with evit-loadtest.

One server (default DeiT-S with random weights: only timings matter here; ``--model vit_tiny_patch16_224``
takes the real ViT-Ti from ../shared/assets), then:

1. right before each overload run, its capacity: the full model's throughput C at keep rate 1.0 with
   evit-loadtest (closed loop, 3 x batch-size clients) and, from the server's metrics, the time of one
   batch T (mean measured batch time). On a CPU shared with other work capacity drifts, so each run is
   loaded relative to the capacity measured just before it;
2. an open-loop overload (Poisson arrivals at ``--load`` x C, default 2x) with a deadline of
   ``--deadline-factor`` x T (default 4x) per request (``deadline_ms``), run three ways: fixed keep rate
   1.0 with the deadline (requests that cannot make it are refused at once) and ``keep_rate=auto`` with
   the deadline, alternating for ``--rounds`` rounds (a CPU shared with other work then slows both
   alike), and once fixed 1.0 without a deadline (plain queueing).

Reports for each: requests answered within the deadline (of all sent), goodput (answers within the
deadline per second), p99 of the answered requests, the mean keep rate used, and the status codes.
Goal: auto >= 95 % within the deadline where fixed 1.0 keeps under 50 %. Writes ``results.json`` (and
each run's evit-loadtest outputs) under ``--out``. About three minutes. Not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from benchmarks.servers import ROOT, start_server, stop_server, wait_ready
from benchmarks.service import ASSET_IMAGES
from service.loadtest import cli as loadtest
from service.loadtest import promscrape
from service.settings import ASSET_CHECKPOINT

SETTLE_S = 3.0  # between runs: the server's offered-load window (2 s) forgets the previous run


def scrape(url: str) -> promscrape.Snapshot:
    return promscrape.parse_metrics(httpx.get(f"{url}/metrics", timeout=10).text)


def run_loadtest(url: str, out: Path, argv: list[str]) -> dict[str, Any]:
    """One evit-loadtest run (in this process); its results.json."""
    code = loadtest.main(["--url", url, "--out", str(out), "--quiet", *argv])
    results = json.loads((out / "results.json").read_text())
    results["exit_code"] = code
    return results


def capacity(url: str, args: argparse.Namespace, images: list[str], name: str) -> dict[str, float]:
    """The full model's throughput in a closed loop at keep rate 1.0 (3 x batch-size clients: full batches),
    and the mean time and size of its batches (server metrics, the loop's 1 s warm-up included)."""
    before = scrape(url)
    res = run_loadtest(url, args.out / name, ["--concurrency", str(3 * args.batch_size), "--duration",
                                              str(args.capacity_seconds), "--warmup", "1", "--keep-rates", "1.0",
                                              *images])
    delta = promscrape.diff(before, scrape(url))

    def total(metric: str) -> float:
        return sum(v for (n, _), v in delta.items() if n == metric)

    return {
        "throughput": res["overall"]["throughput"],
        "batch_seconds": total("evit_batch_measured_seconds_sum") / total("evit_batch_measured_seconds_count"),
        "mean_batch_size": total("evit_batch_size_sum") / max(total("evit_batch_size_count"), 1),
    }


def measured(url: str, args: argparse.Namespace, images: list[str], name: str, keep_rate: str,
             with_deadline: bool) -> dict[str, Any]:
    """Capacity measured right before, then the overload at ``--load`` x that capacity."""
    cap = capacity(url, args, images, f"{name}-capacity")
    rate, deadline_ms = args.load * cap["throughput"], args.deadline_factor * cap["batch_seconds"] * 1000
    print(f"{name}: capacity {cap['throughput']:.1f} req/s (batches of {cap['mean_batch_size']:.1f} in "
          f"{cap['batch_seconds'] * 1000:.0f} ms); {rate:.1f} req/s, deadline {deadline_ms:.0f} ms", flush=True)
    result = overload(url, args, images, name, keep_rate, rate, deadline_ms, with_deadline)
    return {**result, "capacity": cap, "arrival_rate": rate, "deadline_ms": deadline_ms}


def overload(url: str, args: argparse.Namespace, images: list[str], name: str, keep_rate: str,
             rate: float, deadline_ms: float, with_deadline: bool) -> dict[str, Any]:
    time.sleep(SETTLE_S)
    params = ["--param", f"deadline_ms={deadline_ms:.1f}"] if with_deadline else []
    if keep_rate == "auto":
        params += ["--param", f"min_keep_rate={args.min_keep_rate:g}"]
    timeout = max(10.0, 10 * deadline_ms / 1000)  # the client gives up on answers far past the deadline
    before = scrape(url)
    res = run_loadtest(url, args.out / name, ["--rate", f"{rate:.3f}", "--duration", str(args.seconds),
                                              "--warmup", "2", "--keep-rates", keep_rate, "--slo-ms",
                                              f"{deadline_ms:.1f}", "--timeout", f"{timeout:.1f}", *params, *images])
    o = res["overall"]
    delta = promscrape.diff(before, scrape(url))
    refused = {dict(labels)["stage"]: v for (n, labels), v in delta.items() if n == "evit_deadline_refused_total"}
    return {
        "sent": o["sent"], "ok": o["ok"], "within": o["within_slo"], "seconds": res["seconds"],
        "p50_ms": o["p50_ms"], "p99_ms": o["p99_ms"], "mean_keep_rate": o.get("mean_keep_rate_used"),
        "errors": o["errors"], "client_send_lag_p99_ms": res["client_send_lag"]["p99_ms"],
        "load_average": os.getloadavg()[0], "server_deadline_refused": refused,
        "latency_model": httpx.get(f"{url}/models", timeout=10).json()["models"][0].get("latency_model"),
    }


def combine(rounds: list[dict[str, Any]], keep_rate: str, with_deadline: bool) -> dict[str, Any]:
    """The rounds of one configuration together: counts summed, p99 the median round's."""
    sent, ok, within = (sum(r[k] for r in rounds) for k in ("sent", "ok", "within"))
    seconds = sum(r["seconds"] for r in rounds)
    errors: dict[str, int] = {}
    for r in rounds:
        for code, n in r["errors"].items():
            errors[code] = errors.get(code, 0) + n
    used = [(r["mean_keep_rate"], r["ok"]) for r in rounds if r["mean_keep_rate"] is not None]
    p99 = sorted(r["p99_ms"] for r in rounds if r["p99_ms"] is not None)
    return {
        "keep_rate": keep_rate, "deadline_sent": with_deadline, "sent": sent, "ok": ok,
        "within_deadline": within / sent if sent else 0.0, "goodput": within / seconds if seconds else 0.0,
        "p99_ms": p99[len(p99) // 2] if p99 else None,
        "mean_keep_rate": sum(m * n for m, n in used) / sum(n for _, n in used) if used else None,
        "errors": errors, "rounds": rounds,
    }


CONFIGS = {"fixed_1.0": ("1.0", True), "auto": ("auto", True)}  # interleaved, round after round
BASELINE = {"fixed_1.0_no_deadline": ("1.0", False)}  # plain queueing, once (its backlog takes long to drain)


def run(args: argparse.Namespace) -> dict[str, Any]:
    images = ["--images", str(args.images)] if args.images.is_dir() else []
    flags = {"max_wait_ms": 5, "queue_size": 1024, "request_timeout_s": 120, "torch_threads": args.torch_threads}
    proc, url = start_server(args, flags)
    try:
        wait_ready(proc, url)
        rounds: dict[str, list[dict[str, Any]]] = {name: [] for name in (*CONFIGS, *BASELINE)}
        for i in range(args.rounds):
            for name, (keep_rate, with_deadline) in CONFIGS.items():
                rounds[name].append(measured(url, args, images, f"{name}-{i}", keep_rate, with_deadline))
        for name, (keep_rate, with_deadline) in BASELINE.items():
            rounds[name].append(measured(url, args, images, name, keep_rate, with_deadline))
    finally:
        stop_server(proc)
    runs = {name: combine(rs, *{**CONFIGS, **BASELINE}[name]) for name, rs in rounds.items()}
    every = [r for rs in rounds.values() for r in rs]
    return {"model": args.model, "weights": str(args.checkpoint) if args.checkpoint else "random",
            "batch_size": args.batch_size, "load": args.load, "deadline_factor": args.deadline_factor,
            "seconds": args.seconds, "rounds": args.rounds, "min_keep_rate": args.min_keep_rate,
            "torch_threads": args.torch_threads, "runs": runs, "cpus": os.cpu_count(),
            "capacity_range": [min(r["capacity"]["throughput"] for r in every),
                               max(r["capacity"]["throughput"] for r in every)],
            "deadline_ms_range": [min(r["deadline_ms"] for r in every), max(r["deadline_ms"] for r in every)]}


def print_report(report: dict[str, Any]) -> None:
    lo, hi = report["capacity_range"]
    d_lo, d_hi = report["deadline_ms_range"]
    print(f"\n{report['model']} ({report['weights']}), batch {report['batch_size']}: {report['load']:g}x the capacity "
          f"measured before each run ({lo:.1f} to {hi:.1f} req/s at keep rate 1.0), Poisson; deadline "
          f"{report['deadline_factor']:g}x one batch ({d_lo:.0f} to {d_hi:.0f} ms); auto's min_keep_rate "
          f"{report['min_keep_rate']:g}; {report['rounds']} x {report['seconds']:g} s per run")
    print(f"{'run':24s} {'sent':>5s} {'within':>7s} {'goodput/s':>9s} {'p99 ms':>8s} {'keep rate':>9s}  codes")
    for name, r in report["runs"].items():
        codes = {"200": r["ok"], **r["errors"]}
        p99 = f"{r['p99_ms']:.0f}" if r["p99_ms"] is not None else "-"
        rate = f"{r['mean_keep_rate']:.2f}" if r["mean_keep_rate"] is not None else "-"
        rounds = ", ".join(f"{100 * x['within'] / x['sent']:.0f} %" for x in r["rounds"] if x["sent"])
        print(f"{name:24s} {r['sent']:5d} {100 * r['within_deadline']:6.1f}% {r['goodput']:9.1f} {p99:>8s} "
              f"{rate:>9s}  {codes}  rounds: {rounds}")
    auto, fixed = report["runs"]["auto"], report["runs"]["fixed_1.0"]
    loads = [r["load_average"] for run in report["runs"].values() for r in run["rounds"]]
    print(f"goal: auto >= 95 % within the deadline ({100 * auto['within_deadline']:.1f} %), fixed 1.0 < 50 % "
          f"({100 * fixed['within_deadline']:.1f} %); 1-minute load average {min(loads):.1f} to {max(loads):.1f} "
          f"on {report['cpus']} CPUs")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.scheduling", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="deit_small_patch16_224", help="on a small CPU, a model whose passes dwarf "
                   "the per-request work that pruning does not shrink (decoding, HTTP, the load generator)")
    p.add_argument("--checkpoint", type=Path, help="weights (default: the real ViT-Ti from ../shared/assets for "
                   "vit_tiny_patch16_224, random weights for other models)")
    p.add_argument("--images", type=Path, default=ASSET_IMAGES)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--load", type=float, default=2.0, help="arrival rate, in multiples of the measured capacity")
    p.add_argument("--deadline-factor", type=float, default=4.0, help="deadline, in multiples of one batch's time")
    p.add_argument("--min-keep-rate", type=float, default=0.25, help="auto's floor (min_keep_rate); at 2x "
                   "capacity it must be low enough to absorb the load (accuracy: docs/scheduling.md)")
    p.add_argument("--seconds", type=float, default=15.0, help="per overload run")
    p.add_argument("--rounds", type=int, default=2, help="fixed and auto runs alternate this many times")
    p.add_argument("--capacity-seconds", type=float, default=5.0, help="capacity run before each overload run")
    p.add_argument("--torch-threads", type=int, default=1, help="the server's; on a small shared CPU, more "
                   "threads than free cores make every pass slower and noisier (decoding and the load "
                   "generator need the other cores)")
    p.add_argument("--out", type=Path, default=Path("runs/bench-auto"))
    args = p.parse_args(argv)
    if args.checkpoint is None and args.model == "vit_tiny_patch16_224":
        args.checkpoint = ROOT / ASSET_CHECKPOINT
    if args.checkpoint and not args.checkpoint.is_file():
        print(f"no checkpoint at {args.checkpoint}: random weights (timings only)")
        args.checkpoint = None
    report = run(args)
    print_report(report)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
