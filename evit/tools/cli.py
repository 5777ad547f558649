"""Command-line pieces shared by evit-eval, evit-finetune, evit-viz and ``python -m evit.tools.{bench,compare}``."""

from __future__ import annotations

import argparse
import ast
import contextlib
import inspect
import json
import warnings
from pathlib import Path

import torch

from evit.config import FUSE_INTO, FUSE_WEIGHTS, RANKINGS, check_keep_rate
from evit.patch import apply_patch
from evit.precision import PRECISIONS, resolve_precision
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
    parser.add_argument("--model-kwargs", nargs="*", default={}, action=ParseKwargs, metavar="KEY=VALUE",
                        help="timm kwargs as timm's scripts take them, e.g. img_size=32 drop_path_rate=0.1 "
                        "(a JSON object is accepted too)")


class ParseKwargs(argparse.Action):
    """timm's ``ParseKwargs`` (``key=value ...``, values read as Python literals, else kept as strings); a
    single JSON object (``'{"img_size": 32}'``, the older form) is accepted too."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        values = [values] if isinstance(values, str) else list(values or [])
        kwargs: dict = {}
        for value in values:
            if value.lstrip().startswith("{"):
                try:
                    parsed = json.loads(value)
                except ValueError as exc:
                    parser.error(f"{option_string}: not a JSON object: {value!r} ({exc})")
                if not isinstance(parsed, dict):
                    parser.error(f"{option_string}: not a JSON object: {value!r}")
                kwargs.update(parsed)
                continue
            key, found, text = value.partition("=")
            if not found or not key:
                parser.error(f"{option_string}: {value!r} is not KEY=VALUE")
            try:
                kwargs[key] = ast.literal_eval(text)
            except (ValueError, SyntaxError):
                kwargs[key] = text  # as timm: a plain string needs no quotes
        setattr(namespace, self.dest, kwargs)


def add_data_args(parser: argparse.ArgumentParser, batch_size: int, workers: int = 2) -> None:
    """The data and runtime flags of timm's validate.py: DIR (positional or --data-dir; --images is an alias),
    -b/--batch-size, -j/--workers and ``add_runtime_args``'s."""
    parser.add_argument("data", nargs="?", metavar="DIR", type=Path,
                        help="ImageFolder layout or a folder with labels.tsv (or --data-dir)")
    parser.add_argument("--data-dir", "--images", dest="data_dir", type=Path, metavar="DIR",
                        help="the same as the positional DIR")
    parser.add_argument("-b", "--batch-size", type=int, default=batch_size, help="images per batch")
    parser.add_argument("-j", "--workers", type=int, default=workers,
                        help="data loader worker processes decoding images (0: in the main process)")
    add_runtime_args(parser)


_AMP_DTYPES = {"float16": "fp16", "bfloat16": "bf16"}  # the deprecated --amp-dtype -> --precision


def add_precision_arg(parser: argparse.ArgumentParser, help_text: str) -> None:
    """``--precision auto|fp32|bf16|fp16`` (default fp32), resolved with ``evit.precision.resolve_precision``."""
    parser.add_argument("--precision", choices=PRECISIONS, default="fp32",
                        help=f"{help_text}; auto: fp16 on CUDA, bf16 on a CPU with native bf16, else fp32")


def add_runtime_args(parser: argparse.ArgumentParser) -> None:
    """Where and how the forward passes run: --device and --precision (``device()``, ``precision()``,
    ``autocast()``); timm's --amp / --amp-dtype are hidden, deprecated aliases of --precision."""
    parser.add_argument("--device", default="cpu", help="torch device: cpu, cuda, cuda:1, ...")
    add_precision_arg(parser, "the forward passes run under torch.autocast in bf16 or fp16")
    parser.add_argument("--amp", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--amp-dtype", choices=tuple(_AMP_DTYPES), help=argparse.SUPPRESS)


def precision(args: argparse.Namespace, dev: torch.device) -> torch.dtype:
    """``--precision`` resolved for ``dev`` (ValueError for fp16 on a CPU); the deprecated
    ``--amp [--amp-dtype float16|bfloat16]`` (with --precision left at fp32) maps onto fp16 / bf16."""
    name = args.precision
    if name == "fp32" and getattr(args, "amp", False):
        warnings.warn("--amp/--amp-dtype are deprecated: use --precision fp16|bf16", DeprecationWarning, stacklevel=2)
        name = _AMP_DTYPES[args.amp_dtype or "float16"]
    try:
        return resolve_precision(name, dev)
    except ValueError as exc:
        raise ValueError(f"--precision: {exc}") from None


def add_output_arg(parser: argparse.ArgumentParser, default: Path, help_text: str) -> None:
    """``--output`` as timm's scripts name it; ``--out`` (the older name) is kept as a hidden alias."""
    parser.add_argument("--output", type=Path, default=default, help=help_text)
    parser.add_argument("--out", dest="output", type=Path, default=argparse.SUPPRESS, help=argparse.SUPPRESS)


def data_dir(args: argparse.Namespace) -> Path:
    """The image folder given positionally or with --data-dir (ValueError when neither or both disagree)."""
    given = {p for p in (args.data, args.data_dir) if p is not None}
    if len(given) != 1:
        raise ValueError("give the image folder once: DIR or --data-dir DIR")
    return given.pop()


def device(text: str) -> torch.device:
    """``--device``, checked: a CUDA device on a machine without one is refused with a clear message."""
    try:
        dev = torch.device(text)
    except RuntimeError as exc:
        raise ValueError(f"--device {text!r}: {exc}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {text}: CUDA is not available on this machine")
    return dev


def autocast(dev: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    """The forward passes' precision (``precision()``): torch.autocast in ``dtype``, or nothing for fp32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=dev.type, dtype=dtype)


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
