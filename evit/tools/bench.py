"""Throughput of EViT against the plain timm model, measured in one run (``python -m evit.tools.bench``).

Every configuration is timed in interleaved rounds (plain timm, each keep rate, the mixed batch, round after
round) and the median round is kept, so drift on a noisy machine hits all of them alike. Weights do not
change speed, so the model is randomly initialised unless ``--checkpoint`` is given.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import timm
import torch

import evit
from evit.tools import cli


def _time(fn: Callable[[], object], sync: Callable[[], None], clock: Callable[[], float]) -> float:
    sync()
    start = clock()
    fn()
    sync()
    return clock() - start


def run(args: argparse.Namespace) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    # "cpu": this process's CPU time, robust when other work shares the cores (CPU device only)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    device = torch.device(args.device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    options = {**cli.options(args), **args.model_kwargs}
    model = evit.create_model(args.model, checkpoint_path=args.checkpoint, **options).eval().to(device, dtype)
    plain = timm.create_model(args.model, **args.model_kwargs).eval().to(device, dtype)
    plain.load_state_dict(model.state_dict())
    size = evit.data_config(model)["input_size"]
    x = torch.randn(args.batch_size, *size, device=device, dtype=dtype)
    mixed_rates = [args.mixed_rates[i % len(args.mixed_rates)] for i in range(args.batch_size)]
    missing = sorted(set(mixed_rates) - set(args.keep_rates))  # checked before minutes of timing, not after
    if missing:
        raise SystemExit(f"--mixed-rates {missing[0]} must also be in --keep-rates")
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    configs: dict[str, Callable[[], object]] = {"timm": lambda: plain(x)}
    for r in args.keep_rates:
        configs[f"{r}"] = lambda r=r: model(x, keep_rate=r)
    configs["mixed"] = lambda: model(x, keep_rate=torch.tensor(mixed_rates))
    times: dict[str, list[float]] = {k: [] for k in configs}
    with torch.inference_mode():
        for _ in range(args.warmup):
            for fn in configs.values():
                fn()
        for _ in range(args.rounds):
            for name, fn in configs.items():
                times[name].append(_time(fn, sync, clock))
    t = {k: statistics.median(v) for k, v in times.items()}
    base_gmacs = model.cost(1.0).gmacs

    rows = []
    for r in args.keep_rates:
        cost = model.cost(r)
        speedup = t["timm"] / t[f"{r}"]
        gmac_ratio = base_gmacs / cost.gmacs
        rows.append({
            "keep_rate": r,
            "tokens": cost.total_tokens,
            "gmacs": round(cost.gmacs, 3),
            "images_per_second": round(args.batch_size / t[f"{r}"], 2),
            "speedup": round(speedup, 3),
            "gmac_ratio": round(gmac_ratio, 3),
            "speedup_over_gmac_ratio": round(speedup / gmac_ratio, 3),
        })
    # a mixed batch against its samples' solo costs: per-image time at each rate (uniform batches)
    per_image = {r: t[f"{r}"] / args.batch_size for r in set(mixed_rates)}
    summed_solo = sum(per_image[r] for r in mixed_rates)
    return {
        "model": args.model,
        "options": cli.options(args),
        "device": str(device),
        "dtype": str(dtype).removeprefix("torch."),
        "batch_size": args.batch_size,
        "threads": torch.get_num_threads(),
        "rounds": args.rounds,
        "clock": args.clock,
        "timm_images_per_second": round(args.batch_size / t["timm"], 2),
        "rows": rows,
        "mixed": {
            "rates": sorted(set(mixed_rates)),
            "seconds": round(t["mixed"], 4),
            "summed_solo_seconds": round(summed_solo, 4),
            "ratio": round(t["mixed"] / summed_solo, 3),
        },
    }


def format_table(result: dict) -> str:
    lines = [
        f"{result['model']} on {result['device']} ({result['dtype']}), batch {result['batch_size']}, "
        f"{result['threads']} threads, {result['clock']} clock, median of {result['rounds']} interleaved rounds; "
        f"plain timm {result['timm_images_per_second']} img/s",
        f"{'keep':>6} {'tokens':>7} {'GMACs':>7} {'img/s':>8} {'speedup':>8} {'GMAC ratio':>11} {'speedup/ratio':>14}",
    ]
    for r in result["rows"]:
        lines.append(
            f"{r['keep_rate']:>6} {r['tokens']:>7} {r['gmacs']:>7.2f} {r['images_per_second']:>8.1f} "
            f"{r['speedup']:>8.3f} {r['gmac_ratio']:>11.3f} {r['speedup_over_gmac_ratio']:>14.3f}"
        )
    m = result["mixed"]
    lines.append(
        f"mixed batch {m['rates']}: {m['seconds'] * 1e3:.1f} ms vs summed solo cost "
        f"{m['summed_solo_seconds'] * 1e3:.1f} ms (ratio {m['ratio']:.3f})"
    )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="deit_small_patch16_224", help="timm architecture")
    p.add_argument("--checkpoint", default=None, help="optional weights (speed does not depend on them)")
    p.add_argument("--model-kwargs", type=json.loads, default={}, help="JSON timm kwargs, e.g. '{\"img_size\": 32}'")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--keep-rates", type=cli.keep_rates, default=[1.0, 0.9, 0.7, 0.5])
    p.add_argument("--mixed-rates", type=cli.keep_rates, default=[0.5, 0.7, 1.0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                   help="wall time, or this process's CPU time (steadier on a shared CPU)")
    p.add_argument("--warmup", type=int, default=2)
    cli.add_option_args(p)
    p.add_argument("--out", type=Path, default=Path("bench-results.json"), help="JSON output file")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    result = run(args)
    print(format_table(result))
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
