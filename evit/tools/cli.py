"""Command-line pieces shared by evit-eval, evit-finetune, evit-viz and ``python -m evit.tools.{bench,compare}``."""

from __future__ import annotations

import argparse
import inspect
import json
from pathlib import Path

from evit.config import FUSE_INTO, FUSE_WEIGHTS, RANKINGS, check_keep_rate
from evit.patch import apply_patch
from evit.schedule import ACCURATE, PRESETS

# create_model's training-free options and their defaults (the paper's rule), as apply_patch declares them
_PATCH_PARAMS = inspect.signature(apply_patch).parameters
DEFAULT_OPTIONS = {name: _PATCH_PARAMS[name].default
                   for name in ("schedule", "fuse_weight", "fuse_into", "size_attn", "ranking")}


def keep_rates(text: str) -> list[float]:
    """``"1.0,0.7,0.5"`` -> keep rates, each in (0, 1]."""
    try:
        rates = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of numbers: {text!r}") from None
    try:
        if not rates:
            raise ValueError("no keep rate")
        return [check_keep_rate(r) for r in rates]
    except ValueError:
        raise argparse.ArgumentTypeError(f"keep rates must be in (0, 1]: {text!r}") from None


def blocks(text: str) -> list[int]:
    """``"3,6,9"`` -> 0-based block indices."""
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of block indices: {text!r}") from None


def add_model_args(parser: argparse.ArgumentParser, checkpoint_help: str, weights_required: bool = True) -> None:
    """--model, its weights (--checkpoint or --pretrained) and --model-kwargs (timm keyword arguments)."""
    parser.add_argument("--model", required=True, help="timm architecture, e.g. vit_tiny_patch16_224")
    weights = parser.add_mutually_exclusive_group(required=weights_required)
    weights.add_argument("--checkpoint", type=Path, help=checkpoint_help)
    weights.add_argument("--pretrained", action="store_true", help="timm's hub weights (needs network)")
    parser.add_argument("--model-kwargs", type=json.loads, default={},
                        help="JSON timm kwargs, e.g. '{\"img_size\": 32}' or '{\"drop_path_rate\": 0.1}'")


def add_option_args(parser: argparse.ArgumentParser) -> None:
    """The training-free options as flags (docs/accuracy.md); ``options(args)`` turns them into keywords."""
    opts = parser.add_argument_group("training-free options (docs/accuracy.md; defaults: the paper's rule)")
    opts.add_argument("--accurate", action="store_true",
                      help=f"evit.ACCURATE's options {ACCURATE}; the flags below override them")
    opts.add_argument("--schedule", choices=sorted(PRESETS), help="where tokens are pruned (default: paper)")
    opts.add_argument("--fuse-weight", choices=FUSE_WEIGHTS, help="the one fused token: sum or mean")
    opts.add_argument("--fuse-into", choices=FUSE_INTO, help="one extra token (default) or the nearest kept one")
    opts.add_argument("--size-attn", action=argparse.BooleanOptionalAction, default=None,
                      help="proportional attention (--no-size-attn: off, also under --accurate)")
    opts.add_argument("--ranking", choices=RANKINGS, help="class attention of the block (default) or cumulative")


def options(args: argparse.Namespace) -> dict:
    """``create_model`` keywords from ``add_option_args``'s flags: defaults, then --accurate, then each flag."""
    chosen = {**DEFAULT_OPTIONS, **(ACCURATE if args.accurate else {})}
    chosen.update({k: getattr(args, k) for k in DEFAULT_OPTIONS if getattr(args, k) is not None})
    return chosen
