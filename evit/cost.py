"""Cost model: tokens per block and GMACs per image for an EViT model at a keep rate.

GMACs follow the paper's "GFLOPs" convention (multiply-accumulates of the matmuls and the patch-embedding
convolution; norms, softmax and activations are not counted): DeiT-S is 4.6 at keep 1.0. Every matmul the
forward runs is counted, including the class-attention row and the fusion sum at pruning blocks, so
``2 * gmacs`` equals what ``torch.utils.flop_counter.FlopCounterMode`` counts for the same forward.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from evit.reorganize import keep_count


@dataclass(frozen=True)
class Cost:
    keep_rate: float
    tokens: tuple[int, ...]  # tokens entering each block (its attention), prefix tokens included
    gmacs: float  # per image

    @property
    def total_tokens(self) -> int:
        """Tokens the blocks process per image, summed over blocks (what ``EViTOutput.tokens`` reports)."""
        return sum(self.tokens)


def _linear_macs(module: nn.Module | None) -> int:
    """MACs per token of every ``nn.Linear`` inside ``module`` (weights only, as the paper counts)."""
    if module is None:
        return 0
    return sum(m.in_features * m.out_features for m in module.modules() if isinstance(m, nn.Linear))


def _patch_embed_macs(model: nn.Module) -> int:
    proj = model.patch_embed.proj
    if isinstance(proj, nn.Conv2d):
        k_h, k_w = proj.kernel_size
        return model.patch_embed.num_patches * proj.out_channels * proj.in_channels // proj.groups * k_h * k_w
    return model.patch_embed.num_patches * _linear_macs(proj)


def block_tokens(
    depth: int,
    num_patches: int,
    num_prefix_tokens: int,
    prune_blocks: tuple[int, ...],
    keep_rate: float,
    fuse: bool,
) -> list[tuple[int, int, bool]]:
    """Per block: (tokens into attention, tokens into the MLP, whether it pruned), prefix tokens included."""
    P, n = num_prefix_tokens, num_patches
    out = []
    for i in range(depth):
        n_in, k = n, n
        if i in prune_blocks:
            k = keep_count(keep_rate, n)
            if k < n:
                n = k + (1 if fuse else 0)
        out.append((P + n_in, P + n, k < n_in))
    return out


def model_cost(model: nn.Module, keep_rate: float) -> Cost:
    """Tokens per block and GMACs per image of ``model`` (an EViT-patched timm ViT) at ``keep_rate``."""
    cfg = model.evit_cfg
    P = model.num_prefix_tokens
    depth = len(model.blocks)
    schedule = block_tokens(depth, model.patch_embed.num_patches, P, cfg.prune_blocks, keep_rate, cfg.fuse)
    macs = _patch_embed_macs(model)
    for blk, (n_attn, n_mlp, pruned) in zip(model.blocks, schedule, strict=True):
        attn = blk.attn
        width = attn.num_heads * attn.head_dim
        per_token = _linear_macs(attn.qkv) + _linear_macs(attn.proj) + _linear_macs(getattr(attn, "gate", None))
        macs += n_attn * per_token + 2 * n_attn * n_attn * width  # projections; q @ k^T and attn @ v
        if pruned:
            macs += n_attn * width  # the class-attention row
            if cfg.fuse:
                macs += (n_attn - P) * model.embed_dim  # the attention-weighted fusion sum
        macs += n_mlp * _linear_macs(blk.mlp)
    macs += sum(_linear_macs(getattr(model, h, None)) for h in ("head", "head_dist"))
    return Cost(keep_rate=keep_rate, tokens=tuple(t for t, _, _ in schedule), gmacs=macs / 1e9)
