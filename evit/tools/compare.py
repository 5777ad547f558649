"""Training-free options compared at equal cost: top-1 of each variant at the GMACs of the paper's rule.

    python -m evit.tools.compare DIR --model vit_tiny_patch16_224 --checkpoint W.safetensors \\
        --budgets 0.7,0.5 --curve 0.9,0.8,0.7,0.6,0.5,0.4 [-b 50 -j 4 --device cuda --amp] --output OUT

For each budget keep rate ``r`` the budget is the paper rule's GMACs at ``r``; every variant runs at the
keep rate its own ``schedule_for_gmacs`` answers for that budget, so rows at one budget cost the same (or
less). Top-1 is also given on the even- and odd-numbered halves of the images: a difference between two
variants smaller than the spread between halves is noise; ``--flip`` adds top-1 on the mirrored images
(the same labels, a second look at the same decision). Writes ``compare.json``, ``compare.md`` (the
table in docs/accuracy.md) and ``compare.png`` (top-1 against GMACs for the ``--curve`` variants).
Images stream through timm's loader on every pass (DIR or ``--data-dir``, as evit-eval); only the full
model's logits (images x classes, float32) are kept, for the KL and same-top-1 columns. ``--cache FILE``
instead keeps every preprocessed image in memory and on disk: for small sets only.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import evit
from evit.tools import cli
from evit.tools.cli import keep_rates
from evit.tools.data import Source, cached_images, create_image_loader, load_labels

# name -> create_model options. The paper's rule first; evit.ACCURATE is "every3+nearest+size_attn".
VARIANTS: dict[str, dict] = {
    "paper": {},
    "drop": {"fuse": False},
    "mean": {"fuse_weight": "mean"},
    "size_attn": {"size_attn": True},
    "mean+size_attn": {"fuse_weight": "mean", "size_attn": True},
    "cumulative": {"ranking": "cumulative"},
    "mean+cumulative": {"fuse_weight": "mean", "ranking": "cumulative"},
    "every": {"schedule": "every"},
    "every+drop": {"schedule": "every", "fuse": False},
    "every+mean": {"schedule": "every", "fuse_weight": "mean"},
    "every+mean+size_attn": {"schedule": "every", "fuse_weight": "mean", "size_attn": True},
    "every+mean+cumulative": {"schedule": "every", "fuse_weight": "mean", "ranking": "cumulative"},
    "nearest": {"fuse_into": "nearest"},
    "nearest+size_attn": {"fuse_into": "nearest", "size_attn": True},
    "every+nearest+size_attn": {"schedule": "every", "fuse_into": "nearest", "size_attn": True},
    "every3+drop": {"schedule": "every-from-3", "fuse": False},
    "every3+nearest": {"schedule": "every-from-3", "fuse_into": "nearest"},
    "every3+nearest+size_attn": {"schedule": "every-from-3", "fuse_into": "nearest", "size_attn": True},
}


def reusable(path: Path, args: argparse.Namespace, num_images: int) -> dict[tuple[str, float], dict]:
    """Rows of an earlier run on the same model, weights and images whose variant has the same options."""
    old = json.loads(path.read_text())
    same = (old["model"], old["weights"], old["images"], old["num_images"])
    if same != (args.model, str(args.checkpoint), str(cli.data_dir(args)), num_images):
        return {}
    rows = [r for r in old["rows"] + old["curve"] if VARIANTS.get(r["variant"]) == r["options"]]
    return {(r["variant"], r["budget_keep_rate"]): r for r in rows}


def predict(model: nn.Module, source: Source, keep_rate: float, flip: bool = False) -> torch.Tensor:
    """Logits for every image (mirrored with ``flip``) at ``keep_rate``: N, classes (float32, CPU)."""
    out = []
    with torch.inference_mode():
        for x in source:
            with source.precision():
                out.append(model(x.flip(-1) if flip else x, keep_rate=keep_rate).float().cpu())
    return torch.cat(out)


def scores(logits: torch.Tensor, labels: torch.Tensor, reference: torch.Tensor) -> dict:
    """Top-1/top-5 (also per even/odd half of the images) and closeness to the full model's ``reference``
    logits: KL(full || variant) averaged over images, and the share of images with the same top-1 class."""
    hit = (logits.argmax(dim=1) == labels).double()
    kl = F.kl_div(logits.log_softmax(1), reference.log_softmax(1), log_target=True, reduction="batchmean")
    return {
        "top1": hit.mean().item(),
        "top5": (logits.topk(min(5, logits.shape[1]), dim=1).indices == labels[:, None]).any(1).double().mean().item(),
        "top1_halves": [hit[0::2].mean().item(), hit[1::2].mean().item()],
        "kl_to_full": kl.item(),
        "same_top1_as_full": (logits.argmax(dim=1) == reference.argmax(dim=1)).double().mean().item(),
    }


def run_variant(
    model: nn.Module, options: dict, budgets: dict[float, float], source: Source, labels: torch.Tensor,
    full: dict[str, torch.Tensor],
) -> list[dict]:
    """One row per budget: ``model`` (patched with ``options`` by the caller) at the keep rate that fits the
    budget. ``full``: the full model's logits ("plain", and "mirrored" for top-1 on the mirrored images too). A
    budget below the variant's cheapest schedule has no row."""
    rows = []
    for budget_rate, gmacs in budgets.items():
        try:
            plan = model.schedule_for_gmacs(gmacs)
        except ValueError as exc:
            print(f"evit.tools.compare: {options or 'paper'} at {budget_rate:g}: {exc}", file=sys.stderr)
            continue
        row = {
            "budget_keep_rate": budget_rate,
            "budget_gmacs": gmacs,
            "keep_rate": plan.keep_rate,
            "stage_rates": list(plan.stage_rates),
            "gmacs": plan.cost.gmacs,
            **scores(predict(model, source, plan.keep_rate), labels, full["plain"]),
        }
        if "mirrored" in full:
            mirrored = predict(model, source, plan.keep_rate, flip=True)
            row["top1_flipped"] = scores(mirrored, labels, full["mirrored"])["top1"]
        rows.append(row)
    return rows


def markdown_table(rows: list[dict], full: dict) -> str:
    flip = "top1_flipped" in full
    lines = [
        "| variant | options | budget: paper at | keep rate asked | GMACs | top-1 | vs full | top-1 even / odd half |"
        " KL to full | same top-1 as full |" + (" mirrored: top-1, vs full |" if flip else ""),
        "|:---|:---|---:|---:|---:|---:|---:|---:|---:|---:|" + ("---:|" if flip else ""),
    ]
    for r in rows:
        opts = ", ".join(f"{k}={v}" for k, v in r["options"].items()) or "(defaults)"
        a, b = r["top1_halves"]
        line = (
            f"| {r['variant']} | {opts} | {r['budget_keep_rate']:g} | {r['keep_rate']:g} | {r['gmacs']:.3f} | "
            f"{100 * r['top1']:.1f}% | {100 * (r['top1'] - full['top1']):+.1f} | {100 * a:.1f}% / {100 * b:.1f}% | "
            f"{r['kl_to_full']:.3f} | {100 * r['same_top1_as_full']:.1f}% |"
        )
        if flip:
            m = r["top1_flipped"]
            line += f" {100 * m:.1f}%, {100 * (m - full['top1_flipped']):+.1f} |"
        lines.append(line)
    return "\n".join(lines) + "\n"


def _planned(model: nn.Module, gmacs: float) -> tuple[float, list[float]] | None:
    try:
        plan = model.schedule_for_gmacs(gmacs)
    except ValueError:
        return None
    return plan.keep_rate, list(plan.stage_rates)


def curve_table(rows: list[dict], names: list[str]) -> str:
    """Top-1 of each curve variant (columns) at each budget (rows); "-" where a variant cannot get as cheap."""
    cell = {(r["variant"], r["budget_keep_rate"]): r for r in rows}
    budgets = {r["budget_keep_rate"]: r["budget_gmacs"] for r in rows}
    lines = ["| budget: paper at | GMACs | " + " | ".join(names) + " |", "|---:|---:|" + "---:|" * len(names)]
    for b in sorted(budgets, reverse=True):
        tops = [f"{100 * cell[n, b]['top1']:.1f}%" if (n, b) in cell else "-" for n in names]
        lines.append(f"| {b:g} | {budgets[b]:.3f} | " + " | ".join(tops) + " |")
    return "\n".join(lines) + "\n"


def curve_plot(rows: list[dict], full: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name in dict.fromkeys(r["variant"] for r in rows):
        sub = sorted((r for r in rows if r["variant"] == name), key=lambda r: r["gmacs"])
        ax.plot([r["gmacs"] for r in sub] + [full["gmacs"]], [100 * r["top1"] for r in sub] + [100 * full["top1"]],
                "o-", label=name)
    ax.axhline(100 * full["top1"] - 1, color="grey", lw=0.8, ls=":")
    ax.set_xlabel("GMACs per image")
    ax.set_ylabel("top-1 (%)")
    ax.set_title(title, fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m evit.tools.compare", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    cli.add_model_args(p, "local .pth/.pt/.safetensors weights (EMA weights preferred, as timm)")
    cli.add_data_args(p, batch_size=50)
    p.add_argument("--budgets", type=keep_rates, default=[0.7, 0.5], help="paper keep rates naming the budgets")
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated variant names")
    p.add_argument("--curve", type=keep_rates, help="budgets for the curve plot (of --curve-variants)")
    p.add_argument("--curve-variants", default="paper,every+drop,every3+nearest+size_attn")
    p.add_argument("--flip", action="store_true", help="also top-1 on the mirrored images (a noise check)")
    p.add_argument("--reuse", type=Path, help="an earlier compare.json: rows of the same variants are not rerun")
    p.add_argument("--limit", type=int, help="use only the first N images")
    p.add_argument("--cache", type=Path, help="file for the preprocessed images, all held in memory (small sets)")
    cli.add_output_arg(p, Path("runs/compare"), "folder for compare.json, compare.md and compare.png")
    return p


def _setup(args: argparse.Namespace) -> tuple[list[tuple[Path, int]], nn.Module, Source]:
    dev = cli.device(args.device)
    items = load_labels(cli.data_dir(args))[: args.limit]
    model = evit.create_model(args.model, pretrained=args.pretrained, checkpoint_path=args.checkpoint,
                              **args.model_kwargs).eval().to(dev)
    cached = cached_images(items, model, args.cache, args.workers) if args.cache else None
    loader = None if args.cache else create_image_loader(items, model, args.batch_size, args.workers, dev)
    dtype = cli.precision(args, dev)
    precision = lambda: cli.autocast(dev, dtype)  # noqa: E731
    return items, model, Source(loader, cached, args.batch_size, dev, precision)


def _full(model: nn.Module, source: Source, labels: torch.Tensor, flip: bool) -> tuple[dict, dict]:
    """The full model's logits ("plain", "mirrored" with ``flip``) and its scores."""
    logits = {"plain": predict(model, source, 1.0)}  # the full model (keep 1.0 is timm's)
    if flip:
        logits["mirrored"] = predict(model, source, 1.0, flip=True)
    full = {**scores(logits["plain"], labels, logits["plain"]), "gmacs": model.cost(1.0).gmacs}
    if flip:
        full["top1_flipped"] = scores(logits["mirrored"], labels, logits["mirrored"])["top1"]
    return logits, full


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    names = [n for n in args.variants.split(",") if n]
    curve_names = [n for n in args.curve_variants.split(",") if n] if args.curve else []
    unknown = sorted(set(names + curve_names) - set(VARIANTS))
    if unknown:
        print(f"evit.tools.compare: unknown variants {unknown}; known: {list(VARIANTS)}", file=sys.stderr)
        return 2
    try:
        items, model, source = _setup(args)
    except (ValueError, OSError, evit.WeightsError) as exc:
        print(f"evit.tools.compare: {exc}", file=sys.stderr)
        return 2
    labels = torch.tensor([c for _, c in items])
    paper_cost = {r: model.cost(r).gmacs for r in sorted({*args.budgets, *(args.curve or [])}, reverse=True)}
    logits, full = _full(model, source, labels, args.flip)

    done = reusable(args.reuse, args, len(items)) if args.reuse else {}
    needed = ("kl_to_full", "top1_flipped") if args.flip else ("kl_to_full",)  # rows of older runs may lack them
    done = {key: row for key, row in done.items() if all(k in row for k in needed)}

    def rows_for(variant_names: list[str], budgets: list[float]) -> list[dict]:
        for name in variant_names:
            evit.apply_patch(model, **VARIANTS[name])
            for r in budgets:  # an earlier row counts if this library plans the same keep rates for it
                row = done.get((name, r))
                if row and (row["keep_rate"], row["stage_rates"]) != _planned(model, paper_cost[r]):
                    del done[name, r]
            todo = {r: paper_cost[r] for r in budgets if (name, r) not in done}
            new = run_variant(model, VARIANTS[name], todo, source, labels, logits) if todo else []
            for row in new:
                done[name, row["budget_keep_rate"]] = {"variant": name, "options": VARIANTS[name], **row}
                print(f"{name:>22} @ {row['budget_keep_rate']:g}: top-1 {100 * row['top1']:.1f}% "
                      f"at {row['gmacs']:.3f} GMACs", flush=True)
        return [done[name, r] for name in variant_names for r in budgets if (name, r) in done]

    table_rows = sorted(rows_for(names, args.budgets), key=lambda r: -r["budget_keep_rate"])
    curve_rows = rows_for(curve_names, args.curve) if args.curve else []
    _write(args, len(items), full, table_rows, curve_rows, curve_names)
    return 0


def _write(args: argparse.Namespace, num_images: int, full: dict, table_rows: list[dict], curve_rows: list[dict],
           curve_names: list[str]) -> None:
    out = args.output
    out.mkdir(parents=True, exist_ok=True)
    results = {
        "tool": "evit.tools.compare", "model": args.model, "weights": str(args.checkpoint),
        "images": str(cli.data_dir(args)), "num_images": num_images, "full": full,
        "rows": table_rows, "curve": curve_rows,
    }
    (out / "compare.json").write_text(json.dumps(results, indent=2) + "\n")
    table = markdown_table(table_rows, full)
    if curve_rows:
        table += "\n" + curve_table(curve_rows, curve_names)
    (out / "compare.md").write_text(table)
    if curve_rows:
        title = f"{args.model}, {num_images} images: top-1 at the paper rule's GMACs"
        curve_plot(curve_rows, full, out / "compare.png", title)
    print(f"full model: top-1 {100 * full['top1']:.1f}% at {full['gmacs']:.3f} GMACs\n{table}", end="")


if __name__ == "__main__":
    raise SystemExit(main())
