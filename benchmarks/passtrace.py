"""``python -m benchmarks.passtrace``: a per-pass trace of the service under the HTTP benchmark's load.

Starts ``python -m service`` (ViT-Ti, the given backend, keep 0.7, max batch 8) wrapped so that it writes one
line per forward pass (start, duration, batch size) and per garbage collection (start, duration,
generation, objects collected) to a JSON-lines file, loads it with the benchmark's closed-loop clients
(multipart JPEGs), and reports the slowest passes against the median and the collections that overlap them.
``--no-freeze`` serves with ``gc.freeze()`` (end of warm-up) made a no-op, to compare. Not a test.

    python -m benchmarks.passtrace --backend openvino --seconds 30 [--no-freeze]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.servers import ROOT, free_port, saturate, spawn, stop_server, wait_ready
from benchmarks.service import ASSET_IMAGES, load_images, percentile
from service.settings import ASSET_CHECKPOINT


def install(trace: Path, freeze: bool, pinning: bool) -> None:
    """In the service process: time every pass, decode and collection into ``trace`` (line-buffered: the
    service leaves with ``os._exit``)."""
    from service.images import Preprocessor
    from service.worker import DeviceWorker

    out = trace.open("a", buffering=1)
    forward, preprocess = DeviceWorker.forward, Preprocessor.__call__

    def timed_preprocess(self: Preprocessor, data: bytes) -> Any:
        t = time.perf_counter()
        tensor = preprocess(self, data)
        out.write(json.dumps({"decode": t, "s": time.perf_counter() - t}) + "\n")
        return tensor

    def timed_forward(self: DeviceWorker, hosted: Any, samples: Any) -> Any:
        t, before, busy = time.perf_counter(), schedstat(), cpu_busy()
        results = forward(self, hosted, samples)
        s, after = time.perf_counter() - t, schedstat()
        out.write(json.dumps({"pass": t, "s": s, "n": len(samples), "cpu": after[0] - before[0],
                              "wait": after[1] - before[1], "busy": cpu_busy() - busy}) + "\n")
        return results

    started: dict[int, float] = {}

    def on_gc(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            started[info["generation"]] = time.perf_counter()
        elif (t := started.pop(info["generation"], None)) is not None:
            out.write(json.dumps({"gc": t, "s": time.perf_counter() - t, "gen": info["generation"],
                                  "collected": info["collected"]}) + "\n")

    DeviceWorker.forward, Preprocessor.__call__ = timed_forward, timed_preprocess
    if not pinning:
        import openvino

        compile_model = openvino.Core.compile_model

        def unpinned(self: Any, model: Any, device: str, config: dict | None = None) -> Any:
            return compile_model(self, model, device, {**(config or {}), "ENABLE_CPU_PINNING": False})

        openvino.Core.compile_model = unpinned
    gc.callbacks.append(on_gc)
    if not freeze:
        gc.freeze = lambda: None


def schedstat() -> tuple[float, float]:
    """This process's threads, summed: seconds on a CPU and seconds runnable but waiting for one."""
    run = wait = 0
    for task in Path("/proc/self/task").iterdir():
        try:
            fields = (task / "schedstat").read_text().split()
        except OSError:  # the thread ended meanwhile
            continue
        run, wait = run + int(fields[0]), wait + int(fields[1])
    return run / 1e9, wait / 1e9


def cpu_busy() -> float:
    """Seconds of CPU time the whole machine spent busy (every process; /proc/stat, 10 ms ticks)."""
    ticks = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")  # minus idle and iowait


def process_cpu(pid: int) -> float:
    """CPU seconds (user + system) of process ``pid`` so far, all its threads."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def overlap(a: float, a_s: float, b: float, b_s: float) -> float:
    """Seconds the intervals [a, a + a_s] and [b, b + b_s] share."""
    return max(0.0, min(a + a_s, b + b_s) - max(a, b))


def analyse(trace: Path, after: float) -> dict[str, Any]:
    """Passes and collections from ``after`` (perf_counter seconds; the load's start) on."""
    events = [json.loads(line) for line in trace.read_text().splitlines()]
    passes = [e for e in events if "pass" in e and e["pass"] >= after and e["n"] > 1]
    gcs = [e for e in events if "gc" in e and e["gc"] >= after]
    decodes = [e for e in events if "decode" in e and e["decode"] >= after]
    median = statistics.median(p["s"] for p in passes)
    slow = sorted(passes, key=lambda p: p["s"], reverse=True)[:5]
    for p in passes:  # decode-thread seconds run during the pass, per second of pass
        p["decoding"] = sum(overlap(p["pass"], p["s"], d["decode"], d["s"]) for d in decodes) / p["s"]
    for p in slow:
        overlaps = [g for g in gcs if overlap(p["pass"], p["s"], g["gc"], g["s"]) > 0]
        p["gc_overlap_ms"] = 1000 * sum(g["s"] for g in overlaps)
        p["gc_generations"] = sorted({g["gen"] for g in overlaps})
    fast = [p for p in passes if p["s"] <= median]
    for p in passes:  # per second of pass: own CPU, own runnable-but-waiting, other processes' CPU
        p["own_cpu"], p["runq_wait"] = p["cpu"] / p["s"], p["wait"] / p["s"]
        p["others_cpu"] = max(0.0, p["busy"] - p["cpu"]) / p["s"]

    def mean(group: list[dict], key: str) -> float:
        return round(statistics.fmean(p[key] for p in group), 2)
    by_gen = {gen: [g["s"] for g in gcs if g["gen"] == gen] for gen in (0, 1, 2)}
    return {
        "passes": len(passes), "median_ms": 1000 * median, "max_over_median": slow[0]["s"] / median,
        "over_2x_median": sum(p["s"] > 2 * median for p in passes),
        "decode_s": sum(d["s"] for d in decodes),  # decode threads' time, ~their CPU
        "pass_cpu_s": sum(p["cpu"] - p["decoding"] * p["s"] for p in passes),  # less the decodes meanwhile
        "decode_ms": {"median": 1000 * statistics.median(d["s"] for d in decodes),
                      "p99": 1000 * percentile([d["s"] for d in decodes], 99)},
        "fast_passes": {k: mean(fast, k) for k in ("decoding", "own_cpu", "runq_wait", "others_cpu")},
        "slowest": [{"ms": round(1000 * p["s"], 1), "n": p["n"], "x_median": round(p["s"] / median, 2),
                     **{k: round(p[k], 2) for k in ("decoding", "own_cpu", "runq_wait", "others_cpu")},
                     "gc_overlap_ms": round(p["gc_overlap_ms"], 1), "gc_generations": p["gc_generations"]}
                    for p in slow],
        "collections": {str(gen): {"count": len(v), "max_ms": round(1000 * max(v, default=0), 1),
                                   "total_ms": round(1000 * sum(v), 1)} for gen, v in by_gen.items()},
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.passtrace", description=__doc__.splitlines()[0])
    p.add_argument("--backend", default="openvino")
    p.add_argument("--seconds", type=float, default=30.0)
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--no-freeze", action="store_true", help="make the service's gc.freeze() a no-op")
    p.add_argument("--no-pinning", action="store_true", help="OpenVINO without ENABLE_CPU_PINNING")
    p.add_argument("--out", type=Path, default=Path("out/passtrace.json"))
    args = p.parse_args(argv)
    trace = Path(tempfile.mkstemp(suffix=".jsonl")[1])
    port = free_port()
    cmd = [sys.executable, "-m", "benchmarks.passtrace", "--serve", str(trace), str(not args.no_freeze),
           str(not args.no_pinning),
           "--model", "vit_tiny_patch16_224", "--checkpoint", str(ROOT / ASSET_CHECKPOINT), "--port", str(port),
           "--device", "cpu", "--max-batch-size", "8", "--log-level", "warning", "--backend", args.backend,
           "--precision", "fp32", "--keep-rates", "0.5,0.7,1.0"]
    proc, url = spawn(cmd), f"http://127.0.0.1:{port}"
    try:
        wait_ready(proc, url)
        images = load_images(ASSET_IMAGES, 64)
        saturate(url, images, args.clients, 3, [0.7])  # warm-up, not analysed
        start, cpu = time.perf_counter(), process_cpu(proc.pid)  # perf_counter: CLOCK_MONOTONIC, all processes
        load = saturate(url, images, args.clients, args.seconds, [0.7])
        cpu = process_cpu(proc.pid) - cpu
    finally:
        stop_server(proc)
    report = {"backend": args.backend, "freeze": not args.no_freeze, "pinning": not args.no_pinning,
              "req_per_s": load["throughput"],
              **analyse(trace, start)}
    answered = sum(map(len, load["latencies"].values()))
    report["per_request_ms"] = shares = {"server_cpu": 1000 * cpu / answered,
                                         "decode": report.pop("decode_s") * 1000 / answered,
                                         "pass_cpu": report.pop("pass_cpu_s") * 1000 / answered}
    shares["rest (HTTP, app)"] = shares["server_cpu"] - shares["decode"] - shares["pass_cpu"]
    print(json.dumps(report, indent=1))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    trace.unlink()
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["--serve"]:
        install(Path(sys.argv[2]), sys.argv[3] == "True", sys.argv[4] == "True")
        from service.__main__ import main as serve

        sys.argv = [sys.argv[0], *sys.argv[5:]]
        sys.exit(serve())
    sys.exit(main())
