"""Cost model: tokens per block and GMACs per image for an EViT model at a keep rate.

GMACs follow the paper's "GFLOPs" convention (multiply-accumulates of the matmuls and the patch-embedding
convolution; norms, softmax and activations are not counted): DeiT-S is 4.6 at keep 1.0. Every matmul the
forward runs is counted, including the class-attention row and the fusion sum (fusion "one") or the
similarity of the tokens not kept to the kept ones (fusion "nearest") at pruning blocks, so
``2 * gmacs`` equals what ``torch.utils.flop_counter.FlopCounterMode`` counts for the same forward.
With a schedule (``evit.schedule``) each block has its own keep rate; with cumulative ranking the class
row is also computed at every block up to the last one that prunes. Proportional attention's additive
mask, the normalised fusion weights and "nearest"'s size-weighted means are elementwise or scatters and cost
no MACs in this convention.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from torch import nn

from evit.config import check_fusion, extra_token, keep_count


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


@dataclass(frozen=True)
class CostSpec:
    """The sizes a forward's cost depends on, read from a model once (hashable: schedules cache on it)."""

    num_patches: int
    num_prefix_tokens: int
    embed_dim: int
    blocks: tuple[tuple[int, int, int], ...]  # per block: attention MACs per token, attention width, MLP MACs
    fixed_macs: int  # patch embedding and heads

    @classmethod
    def from_model(cls, model: nn.Module) -> CostSpec:
        blocks = []
        for blk in model.blocks:
            attn = blk.attn
            per_token = _linear_macs(attn.qkv) + _linear_macs(attn.proj) + _linear_macs(getattr(attn, "gate", None))
            blocks.append((per_token, attn.num_heads * attn.head_dim, _linear_macs(blk.mlp)))
        heads = sum(_linear_macs(getattr(model, h, None)) for h in ("head", "head_dist"))
        return cls(
            model.patch_embed.num_patches, model.num_prefix_tokens, model.embed_dim, tuple(blocks),
            _patch_embed_macs(model) + heads,
        )


def rate_tokens(
    num_patches: int, num_prefix_tokens: int, rates: Sequence[float], fusion: str
) -> list[tuple[int, int, bool]]:
    """Per block, given its keep rate (1.0: no pruning): (tokens into attention, tokens into the MLP,
    whether it pruned), prefix tokens included."""
    check_fusion(fusion)
    P, n = num_prefix_tokens, num_patches
    out = []
    for rate in rates:
        n_in, k = n, n
        if rate < 1.0:
            k = keep_count(rate, n)
            if k < n:
                n = k + extra_token(fusion, k, n)
        out.append((P + n_in, P + n, k < n_in))
    return out


def spec_cost(
    spec: CostSpec, keep_rate: float, rates: Sequence[float], fusion: str, cumulative: bool = False
) -> Cost:
    """Tokens per block and GMACs per image for one keep rate per block (``rates``).

    ``fusion``: ``evit.reorganize.FUSIONS``; ``cumulative``: the class-attention row is computed at every
    block up to the last that prunes.
    """
    P = spec.num_prefix_tokens
    schedule = rate_tokens(spec.num_patches, P, rates, fusion)
    last = max((i for i, (_, _, pruned) in enumerate(schedule) if pruned), default=-1)
    macs = spec.fixed_macs
    for i, ((per_token, width, mlp), (n_attn, n_mlp, pruned)) in enumerate(zip(spec.blocks, schedule, strict=True)):
        macs += n_attn * per_token + 2 * n_attn * n_attn * width  # projections; q @ k^T and attn @ v
        if pruned or (cumulative and i <= last):
            macs += n_attn * width  # the class-attention row
        if pruned and fusion == "one":
            macs += (n_attn - P) * spec.embed_dim  # the attention-weighted fusion sum
        if pruned and fusion == "nearest":
            kept = n_mlp - P
            macs += (n_attn - P - kept) * kept * spec.embed_dim  # cosine similarity: tokens not kept x kept
        macs += n_mlp * mlp
    return Cost(keep_rate=keep_rate, tokens=tuple(t for t, _, _ in schedule), gmacs=macs / 1e9)


def model_cost(model: nn.Module, keep_rate: float) -> Cost:
    """Tokens per block and GMACs per image of ``model`` (an EViT-patched timm ViT) at ``keep_rate``."""
    cfg, spec = model.evit_cfg, CostSpec.from_model(model)
    return spec_cost(spec, keep_rate, model.block_rates(keep_rate, spec), cfg.fusion, cfg.ranking == "cumulative")
