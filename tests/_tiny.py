"""Tiny timm ViTs for tests: random weights, 32x32 images, 16 patches, seconds to build and run."""

from __future__ import annotations

from typing import Any

import timm
import torch
from conftest import TINY_KWARGS as TINY

import evit

# name -> extra timm kwargs: class token, distillation token, registers, LayerScale, qk-norm
ARCHS: dict[str, dict[str, Any]] = {
    "vit": dict(arch="vit_tiny_patch16_224"),
    "deit_distilled": dict(arch="deit_tiny_distilled_patch16_224"),
    "registers": dict(arch="vit_base_patch16_reg4_gap_256", class_token=True, global_pool="token"),
    "layerscale_qknorm": dict(arch="vit_tiny_patch16_224", init_values=0.1, qk_norm=True),
    "no_embed_class": dict(arch="vit_tiny_patch16_224", no_embed_class=True, reg_tokens=2),
}


def tiny_pair(kind: str = "vit", seed: int = 0, **overrides: Any) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(plain timm model, EViT model with the same weights), both in eval mode."""
    spec = dict(ARCHS[kind])
    arch = spec.pop("arch")
    kwargs = {**TINY, **spec}
    evit_kwargs = {k: overrides.pop(k) for k in ("prune_blocks", "fuse", "fuse_into", "keep_rate") if k in overrides}
    kwargs.update(overrides)
    torch.manual_seed(seed)
    ref = timm.create_model(arch, **kwargs).eval()
    model = evit.create_model(arch, **kwargs, **evit_kwargs).eval()
    model.load_state_dict(ref.state_dict())
    return ref, model


def images(batch: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed))
