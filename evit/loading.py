"""Weights: timm's hub, a local checkpoint (.pth/.pt/.safetensors, official EViT ones included), or random."""

from __future__ import annotations

import importlib
import logging
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

log = logging.getLogger(__name__)

_WRAPPER_KEYS = ("model", "state_dict", "model_ema", "module")  # weights nested deeper than timm looks


class WeightsError(RuntimeError):
    """Weights could not be obtained or do not fit the architecture."""


def build_pretrained(name: str, **timm_kwargs: Any) -> nn.Module:
    """``timm.create_model(name, pretrained=True)``, with a clear error when the hub cannot be reached."""
    try:
        return timm.create_model(name, pretrained=True, **timm_kwargs)
    except Exception as e:  # timm raises several kinds (OSError, HF errors, RuntimeError) when offline
        raise WeightsError(
            f"could not load timm's pretrained weights for '{name}' ({type(e).__name__}: {e}). "
            "The hub is unreachable or has no weights for it: pass a local checkpoint instead "
            "(create_model(..., checkpoint_path=PATH); the service's --checkpoint PATH / EVIT_CHECKPOINT)"
        ) from e


def read_state_dict(path: str | Path, use_ema: bool = True, weights_only: bool = True) -> dict[str, torch.Tensor]:
    """Tensors of a checkpoint file, read by timm's own ``load_state_dict``.

    As ``timm.create_model(checkpoint_path=...)``: ``state_dict_ema`` (then ``model_ema``) when ``use_ema`` and
    present, else ``state_dict``, else ``model``; ``module.`` / ``_orig_mod.`` prefixes removed
    (``timm.models.clean_state_dict``); ``weights_only`` is torch.load's (no arbitrary pickles by default).
    Weights nested deeper (``{"model": {"module": ...}}``) are unwrapped too.
    """
    from timm.models import clean_state_dict, load_state_dict

    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"checkpoint not found: {path}")
    try:
        state: Any = load_state_dict(str(path), use_ema=use_ema, weights_only=weights_only)
    except Exception as e:
        raise WeightsError(f"could not read checkpoint {path}: {type(e).__name__}: {e}") from e
    while isinstance(state, dict) and not _is_state_dict(state):
        inner = next((state[k] for k in _WRAPPER_KEYS if isinstance(state.get(k), dict)), None)
        if inner is None:
            raise WeightsError(f"{path} holds no state dict (top-level keys: {sorted(state)[:10]})")
        state = clean_state_dict(inner)
    if not isinstance(state, dict):
        raise WeightsError(f"{path} holds a {type(state).__name__}, not a state dict")
    return state


def _is_state_dict(d: dict) -> bool:
    return bool(d) and all(isinstance(v, torch.Tensor) for v in d.values())


def load_checkpoint(model: nn.Module, path: str | Path, use_ema: bool = True, weights_only: bool = True) -> None:
    """Load a checkpoint into a timm ViT with strict key checking (``read_state_dict`` picks the weights).

    timm's own converter adapts older layouts (timm 0.4.12 DeiT keys as in the official EViT checkpoints,
    JAX/big-vision exports) and resamples the position embedding to the model's grid.
    """
    state = read_state_dict(path, use_ema=use_ema, weights_only=weights_only)
    timm_class = next(c for c in type(model).__mro__ if c.__module__.startswith("timm."))
    module = importlib.import_module(timm_class.__module__)
    filter_fn = getattr(module, "checkpoint_filter_fn", None)
    if filter_fn is not None:
        try:
            state = filter_fn(state, model)
        except Exception as e:
            raise WeightsError(f"checkpoint {path} does not fit {type(model).__name__}: {e}") from e
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape mismatches
        raise WeightsError(f"checkpoint {path} does not fit the architecture: {e}") from e
    if missing or unexpected:
        raise WeightsError(
            f"checkpoint {path} does not match the architecture: missing keys {missing[:8]}"
            f"{'...' if len(missing) > 8 else ''}, unexpected keys {unexpected[:8]}"
            f"{'...' if len(unexpected) > 8 else ''}"
        )
    log.info("loaded %d tensors from %s", len(state), path)
