"""Accuracy of each backend and precision against eager fp32 (``python -m evit.tools.backends``).

For each option set (the paper's rule, ``evit.ACCURATE``) and keep rate, every ``backend:precision`` runs
the same preprocessed labelled images; a row gives its top-1, the difference from eager fp32 in points
and the share of images whose top-1 class equals eager fp32's. The bounds docs/backends.md holds them to:
within 0.4 points and the same class on >= 99% of images.
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import tempfile
from collections.abc import Callable
from pathlib import Path

import timm
import torch
from PIL import Image
from torch import nn

import evit
from evit.backends import load_graph
from evit.export import export_onnx
from evit.precision import cast_model, precision_name, resolve_precision
from evit.tools.data import load_labels

OPTION_SETS = {"paper": {}, "accurate": dict(evit.ACCURATE)}


def load_images(folder: Path, model: nn.Module, limit: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(images N, 3, H, W preprocessed with timm's config for ``model``, labels N) from ``folder``
    (``labels.tsv`` or an ImageFolder layout, read by ``evit.tools.data.load_labels``)."""
    transform = timm.data.create_transform(**evit.data_config(model))
    items = load_labels(folder)[:limit]
    x = torch.stack([transform(Image.open(path).convert("RGB")) for path, _ in items])
    return x, torch.tensor([label for _, label in items])


def predictor(model: nn.Module, backend: str, precision: str, rate: float, graph: Callable[[], Path]
              ) -> Callable[[torch.Tensor], torch.Tensor]:
    """``x -> top-1 classes`` for ``model`` at ``rate`` run by ``backend`` at ``precision`` (auto resolved);
    ``graph()`` gives the ONNX file of ``model`` at ``rate`` a compiled backend loads."""
    dtype = resolve_precision(precision, "cpu")
    precision = precision_name(dtype)
    if backend == "torch":
        cast = cast_model(copy.deepcopy(model), dtype)
        return lambda x: cast(x.to(dtype), keep_rate=rate).argmax(-1)
    run = load_graph(graph(), backend, precision)
    return lambda x: torch.from_numpy(run(x.numpy())).argmax(-1)


def top1(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, batch: int = 50) -> torch.Tensor:
    with torch.inference_mode():
        return torch.cat([fn(x[i : i + batch]) for i in range(0, len(x), batch)])


def run(model: nn.Module, x: torch.Tensor, y: torch.Tensor, combos: list[str], rates: list[float],
        option_sets: list[str], progress: Callable[[dict], None] | None = None) -> list[dict]:
    """One row per option set, keep rate and ``backend:precision`` (eager fp32 is the reference); ``progress``
    gets each row as it is measured. Each option set and rate is exported once (on first use), and every
    compiled ``backend:precision`` compiles that one graph."""
    rows = []
    for name in option_sets:
        evit.apply_patch(model, **OPTION_SETS[name])
        for rate in rates:
            with tempfile.TemporaryDirectory(prefix="evit-acc-") as tmp:
                graph = functools.cache(functools.partial(export_onnx, model, Path(tmp) / "graph.onnx", keep_rate=rate))
                ref = top1(predictor(model, "torch", "fp32", rate, graph), x)
                for combo in combos:
                    backend, _, precision = combo.partition(":")
                    pred = ref if combo == "torch:fp32" else top1(predictor(model, backend, precision, rate,
                                                                            graph), x)
                    rows.append({
                        "options": name, "keep_rate": rate, "backend": backend, "precision": precision,
                        "top1": round(100 * (pred == y).float().mean().item(), 2),
                        "delta": round(100 * ((pred == y).float().mean() - (ref == y).float().mean()).item(), 2),
                        "agreement": round(100 * (pred == ref).float().mean().item(), 2),
                    })
                    if progress:
                        progress(rows[-1])
    return rows


def format_table(rows: list[dict]) -> str:
    lines = ["| options | keep | backend | precision | top-1 % | vs eager fp32 (points) | same top-1 as eager fp32 % |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['options']} | {r['keep_rate']} | {r['backend']} | {r['precision']} | {r['top1']:.1f} | "
              f"{r['delta']:+.1f} | {r['agreement']:.1f} |" for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="vit_tiny_patch16_224")
    p.add_argument("--checkpoint", type=Path, required=True)
    p.add_argument("--images", type=Path, required=True, help="a folder with labels.tsv (../shared/assets layout)")
    p.add_argument("--limit", type=int, default=None, help="first N images only")
    p.add_argument("--combos", default="torch:fp32,torch:bf16,onnxruntime:fp32,openvino:fp32,openvino:bf16",
                   help="backend:precision pairs")
    p.add_argument("--keep-rates", default="1.0,0.7,0.5")
    p.add_argument("--options", default="paper,accurate", help=f"option sets: {sorted(OPTION_SETS)}")
    p.add_argument("--out", type=Path, default=None, help="JSON rows")
    args = p.parse_args(argv)
    model = evit.create_model(args.model, checkpoint_path=args.checkpoint).eval()
    x, y = load_images(args.images, model, args.limit)
    rows = run(model, x, y, args.combos.split(","), [float(r) for r in args.keep_rates.split(",")],
               args.options.split(","), progress=lambda row: print(json.dumps(row), flush=True))
    print(format_table(rows))
    if args.out:
        args.out.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
