"""`evit-eval`: top-1/top-5, GMACs, tokens and measured throughput at each keep rate, in one table.

    evit-eval DIR --model vit_tiny_patch16_224 --checkpoint W.safetensors \\
        --keep-rates 1.0,0.9,0.8,0.7,0.6,0.5 [--no-fuse | --fuse-ablation] [-b 64 -j 4 --device cuda --amp] --output OUT

DIR (positional or ``--data-dir``) holds an ImageFolder layout (one sub-folder per class, classes indexed
in sorted order) or a ``labels.tsv`` (tab-separated, header row, columns ``filename`` and ``class_index``).
Images stream through timm's dataset and loader (``-j`` worker processes decode them, with timm's data
config for the model), so memory stays flat however many images there are. Throughput times the forward
passes only, every configuration on each batch in turn (median batch time), so load from elsewhere hits
all alike. Writes ``results.json`` (``rows: [{keep_rate, fuse, top1, top5, gmacs, images_per_second, ...}]``),
``results.md`` and ``pareto.png``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import torch
from torch import nn

import evit
from evit.precision import precision_name
from evit.tools import cli
from evit.tools.data import IMAGE_SUFFIXES, batches, create_image_loader, load_labels

__all__ = ["IMAGE_SUFFIXES", "evaluate", "load_labels", "main", "markdown_table"]

Precision = Callable[[], contextlib.AbstractContextManager]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def evaluate(
    models: dict[bool, nn.Module],
    data: Iterable[tuple[torch.Tensor, torch.Tensor]],
    keep_rates: Sequence[float],
    precision: Precision = contextlib.nullcontext,
    on_batch: Callable[[int], object] | None = None,
) -> list[dict]:
    """One row per (fuse, keep rate): accuracy, cost and forward-pass throughput, over batches (x, y).

    Batches are the outer loop and configurations the inner one, so a burst of load from elsewhere on the
    machine slows every configuration alike; throughput is the first batch's size over the median batch
    time (a last, smaller batch is left out of the median unless it is the only one). Only counts are kept
    across batches.
    """
    configs = [(fuse, rate) for fuse in models for rate in keep_rates]
    k = min(5, next(iter(models.values())).num_classes)
    stats = {c: {"top1": 0, "top5": 0, "tokens": 0, "times": []} for c in configs}
    for model in models.values():
        model.eval()
    n, batch_size = 0, None
    for x, y in data:  # B,3,H,W; B
        if batch_size is None:
            batch_size = len(x)
            with precision():  # warm-up, not timed
                for fuse, rate in configs:
                    models[fuse](x, keep_rate=rate)
        n += len(x)
        for fuse, rate in configs:
            _sync(x.device)
            t0 = time.perf_counter()
            with precision():
                out = models[fuse].forward_with_info(x, keep_rate=rate)
            _sync(x.device)
            seconds = time.perf_counter() - t0
            best = out.logits.topk(k, dim=1).indices  # B, k
            entry = stats[(fuse, rate)]
            entry["top1"] += (best[:, 0] == y).sum().item()
            entry["top5"] += (best == y[:, None]).any(dim=1).sum().item()
            entry["tokens"] += out.tokens.sum().item()
            if len(x) == batch_size or not entry["times"]:
                entry["times"].append(seconds / len(x))
        if on_batch:
            on_batch(len(x))
    if not n:
        raise ValueError("no images to evaluate")
    return [_row(models[fuse], rate, fuse, stats[(fuse, rate)], n) for fuse, rate in configs]


def _row(model: nn.Module, rate: float, fuse: bool, entry: dict, n: int) -> dict:
    return {
        "keep_rate": rate,
        "fuse": fuse,
        "top1": entry["top1"] / n,
        "top5": entry["top5"] / n,
        "gmacs": model.cost(rate).gmacs,
        "tokens": entry["tokens"] / n,
        "images_per_second": 1.0 / statistics.median(entry["times"]),
        "images": n,
    }


def markdown_table(rows: list[dict]) -> str:
    """The table people read: one line per (fuse, keep rate); speed-up against keep 1.0 of the same run."""
    base = {r["fuse"]: r for r in rows if r["keep_rate"] == 1.0}
    lines = [
        "| keep rate | fusion | top-1 | top-5 | GMACs | tokens/img | img/s | speed-up | GMAC ratio |",
        "|---:|:---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        ref = base.get(r["fuse"])
        speed = f"{r['images_per_second'] / ref['images_per_second']:.2f}x" if ref else "-"
        ratio = f"{ref['gmacs'] / r['gmacs']:.2f}x" if ref else "-"
        lines.append(
            f"| {r['keep_rate']:.2f} | {'fuse' if r['fuse'] else 'drop'} | {100 * r['top1']:.1f}% | "
            f"{100 * r['top5']:.1f}% | {r['gmacs']:.3f} | {r['tokens']:.0f} | {r['images_per_second']:.1f} | "
            f"{speed} | {ratio} |"
        )
    return "\n".join(lines) + "\n"


def pareto_plot(rows: list[dict], path: Path, title: str) -> None:
    """Top-1 against measured throughput and against GMACs, a point per keep rate, a line per fusion mode."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for fuse in sorted({r["fuse"] for r in rows}, reverse=True):
        sub = sorted((r for r in rows if r["fuse"] == fuse), key=lambda r: r["keep_rate"])
        for ax, key in zip(axes, ("images_per_second", "gmacs"), strict=True):
            xs, ys = [r[key] for r in sub], [100 * r["top1"] for r in sub]
            ax.plot(xs, ys, "o-" if fuse else "s--", label="fusion" if fuse else "drop (no fusion)")
            for r, x, y in zip(sub, xs, ys, strict=True):
                ax.annotate(f"{r['keep_rate']:g}", (x, y), fontsize=7, textcoords="offset points", xytext=(4, -10))
    axes[0].set_xlabel("measured throughput (images/s, forward only)")
    axes[1].set_xlabel("GMACs per image")
    axes[0].set_ylabel("top-1 (%)")
    for ax in axes:
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="evit-eval", description=__doc__.split("\n\n")[0].split(": ", 1)[1],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    cli.add_model_args(p, "local .pth/.pt/.safetensors weights (EMA weights preferred, as timm)")
    cli.add_data_args(p, batch_size=64)
    p.add_argument("--keep-rates", type=cli.keep_rates, default=[1.0, 0.9, 0.8, 0.7, 0.6, 0.5])
    fuse = p.add_mutually_exclusive_group()
    fuse.add_argument("--no-fuse", action="store_true", help="drop inattentive tokens instead of fusing them")
    fuse.add_argument("--fuse-ablation", action="store_true", help="rows with and without fusion")
    p.add_argument("--prune-blocks", type=cli.blocks, help="0-based block indices (default: the schedule's)")
    cli.add_option_args(p)
    p.add_argument("--limit", type=int, help="use only the first N images")
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    cli.add_output_arg(p, Path("runs/eval"), "folder for results.json, results.md and pareto.png")
    p.add_argument("--quiet", action="store_true")
    return p


def _setup(args: argparse.Namespace) -> tuple[list[tuple[Path, int]], dict[bool, nn.Module], torch.device]:
    """The labelled image list and the models on their device; ValueError etc. for bad input."""
    dev = cli.device(args.device)
    folder = cli.data_dir(args)
    items = load_labels(folder)[: args.limit]
    fuses = [True, False] if args.fuse_ablation else [not args.no_fuse]
    models = {
        fuse: evit.create_model(
            args.model,
            pretrained=args.pretrained,
            checkpoint_path=args.checkpoint,
            prune_blocks=args.prune_blocks,
            fuse=fuse,
            **cli.options(args),
            **args.model_kwargs,
        ).to(dev)
        for fuse in fuses
    }
    classes = next(iter(models.values())).num_classes
    if not all(0 <= c < classes for _, c in items):
        raise ValueError(f"class indices must be in [0, {classes})")
    return items, models, dev


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        items, models, dev = _setup(args)
        dtype = cli.precision(args, dev)
    except (ValueError, OSError, evit.WeightsError) as exc:
        print(f"evit-eval: {exc}", file=sys.stderr)
        return 2
    first = next(iter(models.values()))

    from tqdm import tqdm

    loader = create_image_loader(items, first, args.batch_size, args.workers, dev)
    t0 = time.perf_counter()
    with tqdm(total=len(items), unit="img", desc="decode+eval", disable=True if args.quiet else None) as bar:
        rows = evaluate(models, batches(loader, dev), args.keep_rates,
                        lambda: cli.autocast(dev, dtype), bar.update)
    folder = cli.data_dir(args)
    results = {
        "tool": "evit-eval",
        "model": args.model,
        "weights": str(args.checkpoint) if args.checkpoint else "hub",
        "images": str(folder),
        "num_images": len(items),
        "prune_blocks": list(first.evit_cfg.prune_blocks),
        "options": cli.options(args),
        "batch_size": args.batch_size,
        "workers": args.workers,
        "device": str(dev),
        "precision": precision_name(dtype),
        "torch_threads": torch.get_num_threads(),
        "seconds": time.perf_counter() - t0,
        "rows": rows,
    }
    out = args.output
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    table = markdown_table(rows)
    (out / "results.md").write_text(table)
    title = f"{args.model} on {len(items)} images, pruning blocks {list(first.evit_cfg.prune_blocks)}"
    pareto_plot(rows, out / "pareto.png", title)
    if not args.quiet:
        print(table, end="")
        print(f"wrote {out / 'results.json'}, {out / 'results.md'}, {out / 'pareto.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
