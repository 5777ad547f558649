"""Throughput of EViT against the plain timm model, measured in one run (``python -m evit.tools.bench``).

``--backend torch|onnxruntime|openvino`` and ``--precision auto|fp32|bf16|fp16`` choose how the models run:
eager PyTorch in that dtype, or graphs exported by ``evit.export`` (the full model: plain timm exported the
same way; EViT: one graph per keep rate) compiled by that backend. Every configuration, and eager fp32 timm
as the common baseline, is timed in interleaved rounds (round after round) and the median round is kept, so
drift on a noisy machine hits all of them alike. Each keep rate's speedup is given over the same backend's
full model and over eager fp32 timm. Weights do not change speed, so the model is randomly initialised
unless ``--checkpoint`` is given.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import timm
import torch

import evit
from evit.backends import BACKENDS
from evit.precision import cast_model, precision_name, resolve_precision
from evit.tools import cli


def _time(fn: Callable[[], object], sync: Callable[[], None], clock: Callable[[], float]) -> float:
    sync()
    start = clock()
    fn()
    sync()
    return clock() - start


def _compiled(args: argparse.Namespace, model: torch.nn.Module, plain: torch.nn.Module, precision: str,
              tmp: Path) -> dict[str, Callable[[np.ndarray], np.ndarray]]:
    """The backend's graphs: "full" (plain timm exported) and one per keep rate."""
    from evit.backends import load_graph
    from evit.export import export_onnx

    def load(path: Path) -> Callable[[np.ndarray], np.ndarray]:
        return load_graph(path, args.backend, precision, args.device, args.threads or None)

    graphs = {"full": load(export_onnx(plain, tmp / "full.onnx"))}
    for r in args.keep_rates:
        graphs[f"{r}"] = load(export_onnx(model, tmp / f"evit-{r}.onnx", keep_rate=r))
    return graphs


def _configs(args: argparse.Namespace, model: torch.nn.Module, plain: torch.nn.Module, x: torch.Tensor,
             dtype: torch.dtype, tmp: Path) -> dict[str, Callable[[], object]]:
    """Name -> one timed call: eager fp32 timm ("timm"), the backend's full model and each keep rate."""
    configs: dict[str, Callable[[], object]] = {"timm": lambda: plain(x)}
    if args.backend == "torch":
        fast, fast_plain = cast_model(copy.deepcopy(model), dtype), cast_model(copy.deepcopy(plain), dtype)
        xd = x.to(dtype)
        configs["full"] = lambda: fast_plain(xd)
        for r in args.keep_rates:
            configs[f"{r}"] = lambda r=r: fast(xd, keep_rate=r)
        mixed = torch.tensor([args.mixed_rates[i % len(args.mixed_rates)] for i in range(args.batch_size)])
        configs["mixed"] = lambda: fast(xd, keep_rate=mixed)
        return configs
    xn = x.cpu().numpy()
    for name, graph in _compiled(args, model, plain, precision_name(dtype), tmp).items():
        configs[name] = lambda graph=graph: graph(xn)
    return configs


def run(args: argparse.Namespace) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    # "cpu": this process's CPU time, robust when other work shares the cores (CPU device only)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    device = torch.device(args.device)
    dtype = resolve_precision(args.precision, device)
    torch.manual_seed(0)
    options = {**cli.options(args), **args.model_kwargs}
    model = evit.create_model(args.model, checkpoint_path=args.checkpoint, **options).eval().to(device)
    plain = timm.create_model(args.model, **args.model_kwargs).eval().to(device)
    plain.load_state_dict(model.state_dict())
    size = evit.data_config(model)["input_size"]
    x = torch.randn(args.batch_size, *size, device=device)
    mixed_rates = [args.mixed_rates[i % len(args.mixed_rates)] for i in range(args.batch_size)]
    missing = sorted(set(mixed_rates) - set(args.keep_rates))  # checked before minutes of timing, not after
    if missing and args.backend == "torch":
        raise SystemExit(f"--mixed-rates {missing[0]} must also be in --keep-rates")
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    with tempfile.TemporaryDirectory(prefix="evit-bench-") as tmp, torch.inference_mode():
        configs = _configs(args, model, plain, x, dtype, Path(tmp))
        times: dict[str, list[float]] = {k: [] for k in configs}
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
        speedup = t["full"] / t[f"{r}"]
        gmac_ratio = base_gmacs / cost.gmacs
        rows.append({
            "keep_rate": r,
            "tokens": cost.total_tokens,
            "gmacs": round(cost.gmacs, 3),
            "images_per_second": round(args.batch_size / t[f"{r}"], 2),
            "speedup": round(speedup, 3),
            "speedup_over_eager_fp32_timm": round(t["timm"] / t[f"{r}"], 3),
            "gmac_ratio": round(gmac_ratio, 3),
            "speedup_over_gmac_ratio": round(speedup / gmac_ratio, 3),
        })
    result = {
        "model": args.model,
        "options": cli.options(args),
        "backend": args.backend,
        "precision": precision_name(dtype),
        "device": str(device),
        "dtype": str(dtype).removeprefix("torch."),
        "batch_size": args.batch_size,
        "threads": torch.get_num_threads(),
        "rounds": args.rounds,
        "clock": args.clock,
        "timm_images_per_second": round(args.batch_size / t["timm"], 2),
        "full_images_per_second": round(args.batch_size / t["full"], 2),
        "full_speedup_over_eager_fp32_timm": round(t["timm"] / t["full"], 3),
        "rows": rows,
    }
    if "mixed" in t:  # a mixed batch against its samples' solo costs: per-image time at each rate
        per_image = {r: t[f"{r}"] / args.batch_size for r in set(mixed_rates)}
        summed_solo = sum(per_image[r] for r in mixed_rates)
        result["mixed"] = {"rates": sorted(set(mixed_rates)), "seconds": round(t["mixed"], 4),
                           "summed_solo_seconds": round(summed_solo, 4), "ratio": round(t["mixed"] / summed_solo, 3)}
    return result


def format_table(result: dict) -> str:
    lines = [
        f"{result['model']} on {result['device']}, backend {result['backend']} {result['precision']}, batch "
        f"{result['batch_size']}, {result['threads']} threads, {result['clock']} clock, median of {result['rounds']} "
        f"interleaved rounds; eager fp32 timm {result['timm_images_per_second']} img/s; {result['backend']} "
        f"{result['precision']} full model {result['full_images_per_second']} img/s "
        f"({result['full_speedup_over_eager_fp32_timm']:.2f}x eager fp32 timm)",
        f"{'keep':>6} {'tokens':>7} {'GMACs':>7} {'img/s':>8} {'vs full':>8} {'vs fp32 timm':>13} "
        f"{'GMAC ratio':>11} {'speedup/ratio':>14}",
    ]
    for r in result["rows"]:
        lines.append(
            f"{r['keep_rate']:>6} {r['tokens']:>7} {r['gmacs']:>7.2f} {r['images_per_second']:>8.1f} "
            f"{r['speedup']:>8.3f} {r['speedup_over_eager_fp32_timm']:>13.3f} {r['gmac_ratio']:>11.3f} "
            f"{r['speedup_over_gmac_ratio']:>14.3f}"
        )
    if "mixed" in result:
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
    p.add_argument("--backend", choices=BACKENDS, default="torch",
                   help="eager PyTorch, or exported graphs compiled by ONNX Runtime / OpenVINO")
    cli.add_precision_arg(p, "the torch backend's models are cast to it, a compiled backend compiles the graph in it")
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
