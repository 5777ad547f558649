"""``create_model``: build or load a timm ViT and make it an EViT model."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import timm
from torch import nn

from evit.loading import build_pretrained, load_checkpoint
from evit.patch import apply_patch
from evit.schedule import Schedule


def create_model(
    name: str,
    pretrained: bool = False,
    checkpoint_path: str | Path | None = None,
    prune_blocks: Sequence[int] | None = None,
    fuse: bool = True,
    keep_rate: float = 1.0,
    schedule: str | Schedule = "paper",
    fuse_weight: str = "attention",
    size_attn: bool = False,
    ranking: str = "block",
    fuse_into: str = "one",
    **timm_kwargs: Any,
) -> nn.Module:
    """A timm ViT (``name`` is a timm architecture) with EViT token reorganization.

    Weights: ``checkpoint_path`` (a local .pth/.pt/.safetensors, strict keys) if given, else timm's hub
    weights if ``pretrained``, else random initialisation. ``prune_blocks`` are 0-based block indices
    (default: the paper's 1/4, 2/4, 3/4 of the depth - DeiT-S: 3, 6, 9); ``fuse=False`` drops inattentive
    tokens instead of fusing them; ``keep_rate`` is the default for calls that give none.
    Training-free options (defaults: the paper's rule; measured in docs/accuracy.md): ``schedule`` ("paper",
    "every", "every-from-3" or a ``Schedule``), ``fuse_weight`` ("attention" or "mean"), ``fuse_into``
    ("one" or "nearest"), ``size_attn``, ``ranking`` ("block" or "cumulative"). ``evit.ACCURATE`` holds the
    measured best off-the-shelf combination.
    """
    if checkpoint_path is not None:
        model = timm.create_model(name, pretrained=False, **timm_kwargs)
        load_checkpoint(model, checkpoint_path)
    elif pretrained:
        model = build_pretrained(name, **timm_kwargs)
    else:
        model = timm.create_model(name, pretrained=False, **timm_kwargs)
    options = dict(schedule=schedule, fuse_weight=fuse_weight, fuse_into=fuse_into, size_attn=size_attn)
    return apply_patch(model, prune_blocks=prune_blocks, fuse=fuse, keep_rate=keep_rate, ranking=ranking, **options)


def data_config(model: nn.Module) -> dict[str, Any]:
    """timm's preprocessing config for ``model`` (resize, crop, mean/std), at the model's real input size.

    timm reports the pretrained config's size (224) even for a model built with another ``img_size``.
    """
    cfg = timm.data.resolve_model_data_config(model)
    cfg["input_size"] = (model.patch_embed.proj.in_channels, *model.patch_embed.img_size)
    return cfg
