"""`evit-eval`: top-1/top-5, GMACs, tokens and measured throughput at each keep rate, in one table.

    evit-eval --model vit_tiny_patch16_224 --checkpoint W.safetensors --images DIR \\
        --keep-rates 1.0,0.9,0.8,0.7,0.6,0.5 [--no-fuse | --fuse-ablation] --out DIR

DIR holds an ImageFolder layout (one sub-folder per class, classes indexed in sorted order) or a
``labels.tsv`` (tab-separated, header row, columns ``filename`` and ``class_index``). Images are decoded
and preprocessed once with timm's data config for the model; throughput times the forward passes only,
every configuration on each batch in turn (median batch time), so load from elsewhere hits all alike.
Writes ``results.json`` (``rows: [{keep_rate, fuse, top1, top5, gmacs, images_per_second, ...}]``),
``results.md`` and ``pareto.png``.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from torch import nn

import evit
from evit.tools import cli

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


def load_labels(folder: Path) -> list[tuple[Path, int]]:
    """(image path, class index) pairs from ``labels.tsv`` if present, else an ImageFolder layout."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"image folder {folder} does not exist")
    tsv = folder / "labels.tsv"
    if tsv.exists():
        with tsv.open(newline="") as f:
            reader = csv.DictReader(f, delimiter="\t")
            if not {"filename", "class_index"} <= set(reader.fieldnames or ()):
                raise ValueError(f"{tsv} needs a header row with columns 'filename' and 'class_index'")
            items = []
            for line, row in enumerate(reader, start=2):
                path = folder / row["filename"]
                if not path.is_file():
                    raise ValueError(f"{tsv}:{line}: no file {row['filename']!r}")
                try:
                    items.append((path, int(row["class_index"])))
                except ValueError:
                    raise ValueError(f"{tsv}:{line}: class_index {row['class_index']!r} is not an integer") from None
    else:
        classes = sorted(d for d in folder.iterdir() if d.is_dir())
        items = [
            (p, index)
            for index, d in enumerate(classes)
            for p in sorted(d.rglob("*"))
            if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
        ]
    if not items:
        raise ValueError(f"no labelled images in {folder} (need labels.tsv or one sub-folder per class)")
    return items


def load_images(paths: Sequence[Path], model: nn.Module, workers: int = 2) -> torch.Tensor:
    """Decode and preprocess every image with timm's eval transform for ``model``: N, 3, H, W."""
    from PIL import Image
    from timm.data import create_transform

    transform = create_transform(**evit.data_config(model), is_training=False)

    def one(path: Path) -> torch.Tensor:
        with Image.open(path) as im:
            return transform(im.convert("RGB"))

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        return torch.stack(list(pool.map(one, paths)))


@torch.inference_mode()
def evaluate(
    models: dict[bool, nn.Module],
    images: torch.Tensor,
    labels: torch.Tensor,
    keep_rates: Sequence[float],
    batch_size: int = 64,
    on_batch: Callable[[int], object] | None = None,
) -> list[dict]:
    """One row per (fuse, keep rate): accuracy, cost and forward-pass throughput.

    Batches are the outer loop and configurations the inner one, so a burst of load from elsewhere on the
    machine slows every configuration alike; throughput is the batch size over the median batch time
    (a last, smaller batch is left out of the median unless it is the only one).
    """
    configs = [(fuse, rate) for fuse in models for rate in keep_rates]
    k = min(5, next(iter(models.values())).num_classes)
    stats = {c: {"top1": 0, "top5": 0, "tokens": 0, "times": []} for c in configs}
    for model in models.values():
        model.eval()
    for fuse, rate in configs:  # warm-up, not timed
        models[fuse](images[:batch_size], keep_rate=rate)
    for start in range(0, len(images), batch_size):
        x, y = images[start : start + batch_size], labels[start : start + batch_size]  # B,3,H,W; B
        for fuse, rate in configs:
            t0 = time.perf_counter()
            out = models[fuse].forward_with_info(x, keep_rate=rate)
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
    n = len(images)
    rows = []
    for fuse, rate in configs:
        entry = stats[(fuse, rate)]
        rows.append(
            {
                "keep_rate": rate,
                "fuse": fuse,
                "top1": entry["top1"] / n,
                "top5": entry["top5"] / n,
                "gmacs": models[fuse].cost(rate).gmacs,
                "tokens": entry["tokens"] / n,
                "images_per_second": 1.0 / statistics.median(entry["times"]),
                "images": n,
            }
        )
    return rows


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
    p = argparse.ArgumentParser(prog="evit-eval", description=__doc__.split("\n\n")[0].split(": ", 1)[1])
    cli.add_model_args(p, "local .pth/.pt/.safetensors weights")
    p.add_argument("--images", type=Path, required=True, help="ImageFolder layout or a folder with labels.tsv")
    p.add_argument("--keep-rates", type=cli.keep_rates, default=[1.0, 0.9, 0.8, 0.7, 0.6, 0.5])
    fuse = p.add_mutually_exclusive_group()
    fuse.add_argument("--no-fuse", action="store_true", help="drop inattentive tokens instead of fusing them")
    fuse.add_argument("--fuse-ablation", action="store_true", help="rows with and without fusion")
    p.add_argument("--prune-blocks", type=cli.blocks, help="0-based block indices (default: the schedule's)")
    cli.add_option_args(p)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--limit", type=int, help="use only the first N images")
    p.add_argument("--workers", type=int, default=2, help="threads decoding images")
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    p.add_argument("--out", type=Path, default=Path("runs/eval"))
    p.add_argument("--quiet", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    fuses = [True, False] if args.fuse_ablation else [not args.no_fuse]
    try:
        items = load_labels(args.images)[: args.limit]
        models = {
            fuse: evit.create_model(
                args.model,
                pretrained=args.pretrained,
                checkpoint_path=args.checkpoint,
                prune_blocks=args.prune_blocks,
                fuse=fuse,
                **cli.options(args),
                **args.model_kwargs,
            )
            for fuse in fuses
        }
    except (ValueError, OSError, evit.WeightsError) as exc:
        print(f"evit-eval: {exc}", file=sys.stderr)
        return 2
    first = models[fuses[0]]
    labels = torch.tensor([c for _, c in items])
    if int(labels.max()) >= first.num_classes or int(labels.min()) < 0:
        print(f"evit-eval: class indices must be in [0, {first.num_classes})", file=sys.stderr)
        return 2

    from tqdm import tqdm

    quiet = True if args.quiet else None
    t0 = time.perf_counter()
    images = load_images([p for p, _ in items], first, args.workers)
    decode_s = time.perf_counter() - t0
    with tqdm(total=len(items) * len(fuses) * len(args.keep_rates), unit="img", disable=quiet) as bar:
        rows = evaluate(models, images, labels, args.keep_rates, args.batch_size, bar.update)
    results = {
        "tool": "evit-eval",
        "model": args.model,
        "weights": str(args.checkpoint) if args.checkpoint else "hub",
        "images": str(args.images),
        "num_images": len(items),
        "prune_blocks": list(first.evit_cfg.prune_blocks),
        "options": cli.options(args),
        "batch_size": args.batch_size,
        "torch_threads": torch.get_num_threads(),
        "decode_seconds": decode_s,
        "rows": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    table = markdown_table(rows)
    (args.out / "results.md").write_text(table)
    title = f"{args.model} on {len(items)} images, pruning blocks {list(first.evit_cfg.prune_blocks)}"
    pareto_plot(rows, args.out / "pareto.png", title)
    if not args.quiet:
        print(table, end="")
        print(f"wrote {args.out / 'results.json'}, {args.out / 'results.md'}, {args.out / 'pareto.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
