"""`evit-viz`: which patches each pruning stage keeps, as in the EViT paper's figure.

    evit-viz --model vit_tiny_patch16_224 --checkpoint W.safetensors --image cat.jpg --keep-rate 0.7 --out viz.png

One PNG: the input as the model sees it, the class token's attention at the first pruning block (the
ranking that decides stage 1) as a heatmap, then one panel per pruning stage with the inattentive
patches (fused or dropped) greyed out. A JSON beside it holds the kept patch indices per stage, in the
service's ``return_tokens=true`` schema. ``--response answer.json`` draws the stages from a saved service
answer instead of running the model here.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch import nn

import evit
from evit.reorganize import class_attention
from evit.tools import cli

GREY = (190, 190, 190)  # an inattentive patch
GAP = 6  # pixels between and around panels
TITLE_H = 18  # title strip above each panel
COLUMNS = 6  # panels per row: schedules with many stages (evit.ACCURATE: 10) wrap


@dataclass
class Visualization:
    display: np.ndarray  # H, W, 3 uint8: the model input, un-normalised
    grid: tuple[int, int]  # patch rows, columns
    blocks: list[int]  # 0-based block of each pruning stage
    kept: list[np.ndarray]  # per stage: rows, cols bool, True where the patch is still its own token
    attention: np.ndarray | None  # rows, cols: class attention at the first pruning block (sums to <= 1)
    top5: list[tuple[int, float]]  # (class index, probability)


def model_input(model: nn.Module, image: Image.Image) -> tuple[torch.Tensor, np.ndarray]:
    """timm's eval preprocessing for ``model``: the input (1, 3, H, W) and the same pixels as uint8 H, W, 3."""
    from timm.data import create_transform

    cfg = evit.data_config(model)
    x = create_transform(**cfg, is_training=False)(image.convert("RGB"))  # 3, H, W
    mean, std = torch.tensor(cfg["mean"])[:, None, None], torch.tensor(cfg["std"])[:, None, None]
    display = ((x * std + mean).clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
    return x[None], display


class _ClassAttention:
    """Forward hook on a block's qkv projection: the class token's softmax attention, averaged over heads.

    The library does not expose attention; at the first pruning block no token has been reorganized yet,
    so with one image the tokens are in their original order and the row maps onto the patch grid.
    """

    def __init__(self, attn: nn.Module, num_prefix_tokens: int) -> None:
        self.attn, self.prefix, self.row = attn, num_prefix_tokens, None
        self.handle = attn.qkv.register_forward_hook(self._hook)

    def _hook(self, _module: nn.Module, _inputs: object, out: torch.Tensor) -> None:
        a = self.attn
        qkv = out.reshape(-1, 3, a.num_heads, a.head_dim).transpose(0, 2)  # heads, 3, N, D
        q, k = a.q_norm(qkv[:, 0]), a.k_norm(qkv[:, 1])  # heads, N, D
        self.row = class_attention(q[None], k[None], a.scale)[0, self.prefix :].float().cpu()  # N - prefix


@torch.inference_mode()
def visualize(model: nn.Module, image: Image.Image, keep_rate: float) -> Visualization:
    """Run ``model`` on one image at ``keep_rate`` and collect what the figure shows."""
    model.eval()
    x, display = model_input(model, image)
    x = x.to(next(model.parameters()).device)
    grid = tuple(model.patch_embed.grid_size)
    blocks = list(model.evit_cfg.prune_blocks)
    hook = _ClassAttention(model.blocks[blocks[0]].attn, model.num_prefix_tokens) if blocks else None
    try:
        out = model.forward_with_info(x, keep_rate=keep_rate, return_kept=True)
    finally:
        if hook:
            hook.handle.remove()
    kept = [stage[0].cpu().numpy().reshape(grid) for stage in out.kept or []]
    attention = hook.row.numpy().reshape(grid) if hook and hook.row is not None else None
    probs = out.logits[0].float().softmax(dim=0)
    top = probs.topk(min(5, probs.numel()))
    top5 = list(zip(top.indices.tolist(), top.values.tolist(), strict=True))
    return Visualization(display, grid, blocks, kept, attention, top5)


def from_response(answer: dict, display: np.ndarray) -> Visualization:
    """Stages from a service answer's ``kept`` (``return_tokens=true``): {grid, stages: [{block, patches}]}."""
    kept_info = answer.get("kept")
    if not kept_info:
        raise ValueError("the answer has no 'kept' field: ask the service with return_tokens=true")
    grid = tuple(kept_info["grid"])
    kept = []
    for stage in kept_info["stages"]:
        mask = np.zeros(grid[0] * grid[1], dtype=bool)
        mask[stage["patches"]] = True
        kept.append(mask.reshape(grid))
    top5 = [(p["class_index"], p["probability"]) for p in answer.get("predictions", [])]
    return Visualization(display, grid, [s["block"] for s in kept_info["stages"]], kept, None, top5)


def shade(display: np.ndarray, kept: np.ndarray) -> np.ndarray:
    """``display`` with every patch whose ``kept`` cell is False painted GREY."""
    rows, cols = kept.shape
    ph, pw = display.shape[0] // rows, display.shape[1] // cols
    cover = np.repeat(np.repeat(~kept, ph, axis=0), pw, axis=1)  # H, W
    out = display.copy()
    out[cover] = GREY
    return out


def heat(display: np.ndarray, attention: np.ndarray, alpha: float = 0.6) -> np.ndarray:
    """The attention grid (scaled to its max) in a colour map, blended over a dimmed ``display``."""
    from matplotlib import colormaps

    rows, cols = attention.shape
    scaled = attention / attention.max() if attention.max() > 0 else attention
    colours = colormaps["inferno"](scaled)[..., :3] * 255  # rows, cols, 3
    up = np.repeat(np.repeat(colours, display.shape[0] // rows, axis=0), display.shape[1] // cols, axis=1)
    return (alpha * up + (1 - alpha) * display).round().astype(np.uint8)


def compose(panels: list[tuple[str, np.ndarray]], scale: int) -> Image.Image:
    """Panels in rows of up to ``COLUMNS``, each magnified ``scale`` times (nearest), with its title above it."""
    h, w = panels[0][1].shape[:2]
    sw, sh = w * scale, h * scale
    cols = min(len(panels), COLUMNS)
    rows = -(-len(panels) // cols)
    canvas = Image.new("RGB", (cols * (sw + GAP) + GAP, rows * (TITLE_H + sh + GAP)), "white")
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default(size=11)
    for i, (title, pixels) in enumerate(panels):
        x, y = GAP + (i % cols) * (sw + GAP), (i // cols) * (TITLE_H + sh + GAP)
        canvas.paste(Image.fromarray(pixels).resize((sw, sh), Image.Resampling.NEAREST), (x, y + TITLE_H))
        draw.text((x, y + 2), title, fill="black", font=font)
    return canvas


def render(viz: Visualization, panel_size: int = 224, class_names: dict[int, str] | None = None) -> Image.Image:
    n = viz.grid[0] * viz.grid[1]
    first = ""
    if viz.top5:
        index, prob = viz.top5[0]
        first = f": {(class_names or {}).get(index, f'class {index}')[:18]} {100 * prob:.0f}%"
    panels = [(f"input{first}", viz.display)]
    if viz.attention is not None:
        panels.append((f"class attention, block {viz.blocks[0] + 1}", heat(viz.display, viz.attention)))
    for i, (block, kept) in enumerate(zip(viz.blocks, viz.kept, strict=True)):
        panels.append((f"stage {i + 1} (block {block + 1}): {int(kept.sum())}/{n}", shade(viz.display, kept)))
    return compose(panels, max(1, round(panel_size / viz.display.shape[0])))


def summary(viz: Visualization, keep_rate: float | None) -> dict:
    """What the JSON beside the PNG holds (kept patches in the service's ``kept`` schema)."""
    return {
        "keep_rate": keep_rate,
        "kept": {
            "grid": list(viz.grid),
            "stages": [
                {"block": b, "patches": np.flatnonzero(k).tolist()} for b, k in zip(viz.blocks, viz.kept, strict=True)
            ],
        },
        "greyed_per_stage": [int((~k).sum()) for k in viz.kept],
        "class_attention": None if viz.attention is None else viz.attention.round(6).tolist(),
        "top5": [{"class_index": i, "probability": p} for i, p in viz.top5],
    }


def _imagenet_names(num_classes: int) -> dict[int, str] | None:
    if num_classes != 1000:
        return None
    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    return {i: info.index_to_description(i).split(",")[0] for i in range(1000)}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="evit-viz", description="Draw which patches each EViT pruning stage keeps.")
    cli.add_model_args(p, "local .pth/.pt/.safetensors weights", weights_required=False)
    p.add_argument("--image", type=Path, required=True)
    p.add_argument("--keep-rate", type=float, default=0.7)
    p.add_argument("--prune-blocks", type=cli.blocks, help="0-based block indices")
    cli.add_option_args(p)
    p.add_argument("--no-fuse", action="store_true", help="drop inattentive tokens instead of fusing them")
    p.add_argument("--response", type=Path, help="draw the stages from a saved service answer (return_tokens=true)")
    p.add_argument("--panel-size", type=int, default=224, help="approximate side of each panel in pixels")
    cli.add_runtime_args(p)
    cli.add_output_arg(p, Path("runs/viz/viz.png"), "PNG to write (and a .json beside it)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if not (args.checkpoint or args.pretrained or args.response):
            raise ValueError("give --checkpoint or --pretrained (or --response to draw a service answer)")
        model = evit.create_model(
            args.model,
            pretrained=args.pretrained and not args.response,
            checkpoint_path=None if args.response else args.checkpoint,
            prune_blocks=args.prune_blocks,
            fuse=not args.no_fuse,
            **cli.options(args),
            **args.model_kwargs,
        )
        image = Image.open(args.image)
        if args.response:
            answer = json.loads(args.response.read_text())
            viz, keep_rate = from_response(answer, model_input(model, image)[1]), answer.get("keep_rate")
        else:
            dev = cli.device(args.device)
            with cli.autocast(dev, cli.precision(args, dev)):
                viz, keep_rate = visualize(model.to(dev), image, args.keep_rate), args.keep_rate
    except (ValueError, OSError, KeyError, evit.WeightsError) as exc:
        print(f"evit-viz: {exc}", file=sys.stderr)
        return 2
    out = args.output
    out.parent.mkdir(parents=True, exist_ok=True)
    render(viz, args.panel_size, _imagenet_names(model.num_classes)).save(out)
    out.with_suffix(".json").write_text(json.dumps(summary(viz, keep_rate), indent=1) + "\n")
    kept = ", ".join(f"block {b + 1}: {int(k.sum())}" for b, k in zip(viz.blocks, viz.kept, strict=True))
    print(f"wrote {out} and {out.with_suffix('.json')} (patches kept per stage: {kept or 'none'})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
