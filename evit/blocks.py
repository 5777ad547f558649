"""timm's ``Block``/``Attention`` run on packed tokens, with reorganization after attention at pruning blocks.

Samples are packed by group (``evit.reorganize``): token-wise layers run on the packed ``T, C`` tensor,
attention once per group. Each group carries its tokens' state (``Side``: patch ids for visualization,
sizes for proportional attention, accumulated scores for cumulative ranking).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from evit.reorganize import (
    Group,
    ReorgOptions,
    Side,
    class_attention,
    merge_adjacent,
    prunes,
    reorganize,
    size_bias,
    split_group,
)

if TYPE_CHECKING:
    from evit.config import EViTConfig


@dataclass
class Packed:
    """A batch's tokens packed by group, in keep-rate order."""

    x: torch.Tensor  # T, C
    groups: list[Group]
    sides: list[Side]  # per group: state of its non-prefix tokens


def group_views(x: torch.Tensor, groups: Sequence[Group]) -> list[torch.Tensor]:
    """Free ``Bg, Ng, C`` views of the packed ``T, C`` tensor, one per group."""
    views, offset = [], 0
    for g in groups:
        n = g.size * g.tokens
        views.append(x[offset : offset + n].view(g.size, g.tokens, -1))
        offset += n
    return views


def _cat(parts: Sequence[torch.Tensor]) -> torch.Tensor:
    """Pack per-group tensors (any leading shape, same last dim) back into ``T, C``."""
    flat = [p.reshape(-1, p.shape[-1]) for p in parts]
    return flat[0] if len(flat) == 1 else torch.cat(flat)


def _attention(
    attn: nn.Module,
    x: torch.Tensor,
    groups: Sequence[Group],
    need_cls: Sequence[bool],
    biases: Sequence[torch.Tensor | None],
) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
    """timm ``Attention.forward`` on packed tokens, attention once per group; the class row where asked.

    x: T, C; biases: per group None or a B, 1, 1, N additive key mask (proportional attention), used by
    the full attention and the class row alike. Returns T, C and per group its B, N class-attention rows.
    """
    H, D = attn.num_heads, attn.head_dim
    gate = attn.gate(x).sigmoid() if getattr(attn, "gate", None) is not None else None
    qkv = attn.qkv(x)  # T, 3 * H * D
    outs, cls_rows = [], []
    for g, view, cls, bias in zip(groups, group_views(qkv, groups), need_cls, biases, strict=True):
        q, k, v = view.reshape(g.size, g.tokens, 3, H, D).permute(2, 0, 3, 1, 4).unbind(0)  # B, H, N, D
        q, k = attn.q_norm(q), attn.k_norm(k)
        cls_rows.append(class_attention(q, k, attn.scale, bias) if cls else None)
        mask = None if bias is None else bias.to(q.dtype)
        if attn.fused_attn:
            drop = attn.attn_drop.p if attn.training else 0.0
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=drop)
        else:
            a = (q * attn.scale) @ k.transpose(-2, -1)  # B, H, N, N
            a = (a if mask is None else a + mask).softmax(dim=-1)
            y = attn.attn_drop(a) @ v
        outs.append(y.transpose(1, 2).reshape(g.size * g.tokens, H * D))
    y = attn.norm(_cat(outs)) if hasattr(attn, "norm") else _cat(outs)
    if gate is not None:
        y = y * gate
    return attn.proj_drop(attn.proj(y)), cls_rows


def _drop_path(drop_path: nn.Module, y: torch.Tensor, groups: Sequence[Group]) -> torch.Tensor:
    """Stochastic depth is per sample: apply it on group views, not on packed tokens."""
    if not (drop_path.training and getattr(drop_path, "drop_prob", 0.0) > 0.0):
        return y
    return _cat([drop_path(v) for v in group_views(y, groups)])


class Tracker:
    """Per-stage record for visualization: which original patches are still their own token."""

    def __init__(self, num_patches: int) -> None:
        self.num_patches = num_patches
        self.kept: list[torch.Tensor] = []  # per stage: B, num_patches (keep-rate order)

    def record(self, sides: Sequence[Side]) -> None:
        masks = []
        for side in sides:  # ids: b, n (-1: a fused token)
            gid = side.ids
            slot = torch.where(gid < 0, self.num_patches, gid)
            mask = torch.zeros(gid.shape[0], self.num_patches + 1, dtype=torch.bool, device=gid.device)
            masks.append(mask.scatter_(1, slot, True)[:, : self.num_patches])
        self.kept.append(torch.cat(masks))


def _merge_sides(groups: Sequence[Group], sides: Sequence[Side]) -> list[Side]:
    """The state of neighbouring groups that ``merge_adjacent`` joins (same token count), concatenated."""
    pairs = zip(groups, sides, strict=True)
    runs = [list(run) for _, run in itertools.groupby(pairs, key=lambda pair: pair[0].tokens)]
    return [run[0][1] if len(run) == 1 else _concat_sides(run) for run in runs]


def _concat_sides(run: Sequence[tuple[Group, Side]]) -> Side:
    """One group's state from several; a part without sizes has size 1, without scores scores 0."""
    fields = []
    for name, fill in (("ids", -1), ("sizes", 1.0), ("scores", 0.0)):
        parts = [getattr(side, name) for _, side in run]
        ref = next((p for p in parts if p is not None), None)
        if ref is None:
            fields.append(None)
            continue
        fields.append(torch.cat([p if p is not None else ref.new_full((g.size, ref.shape[1]), fill)
                                 for (g, _), p in zip(run, parts, strict=True)]))
    return Side(*fields)


def _reorganize(
    x: torch.Tensor,
    packed: Packed,
    cls_rows: list[torch.Tensor | None],
    stage: dict[float, float],
    num_prefix_tokens: int,
    cfg: EViTConfig,
) -> Packed:
    """One pruning stage over every group; returns the new packed tokens, groups and token state."""
    P = num_prefix_tokens
    options = ReorgOptions(cfg.fusion, cfg.fuse_weight == "mean", P)
    new_x, new_groups, new_sides = [], [], []
    for g, view, cls, side in zip(packed.groups, group_views(x, packed.groups), cls_rows, packed.sides, strict=True):
        if cls is None:  # every sample of this group keeps all its tokens
            new_x.append(view)
            new_sides.append(side)
            new_groups.append(g)
            continue
        if side.sizes is None and cfg.size_attn and cfg.fusion == "one":  # ("nearest": reorganize does it)
            side = Side(side.ids, torch.ones(g.size, g.tokens - P, device=x.device), side.scores)
        subs = split_group(g, P, cfg.fusion, stage)
        runs = [(s.start - g.start, s.size, k) for s, k in subs]
        score = side.scores if cfg.ranking == "cumulative" else None
        xs, parts = reorganize(cls[:, P:], runs, options, score)(view, side)
        new_x += xs
        new_sides += parts
        new_groups += [s for s, _ in subs]
    return Packed(_cat(new_x), merge_adjacent(new_groups), _merge_sides(new_groups, new_sides))


def run_block(
    blk: nn.Module,
    packed: Packed,
    prune: bool,
    stage: dict[float, float],
    need_cls: Sequence[bool],
    num_prefix_tokens: int,
    cfg: EViTConfig,
    tracker: Tracker | None,
) -> Packed:
    """timm ``Block.forward`` (pre-norm, LayerScale, stochastic depth) with reorganization after attention.

    stage: requested keep rate -> this block's keep rate; need_cls: per group, whether to compute the class
    row (where it prunes; with cumulative ranking also before).
    """
    P, groups = num_prefix_tokens, packed.groups
    biases = [size_bias(s.sizes, P) if cfg.size_attn else None for s in packed.sides]
    y, cls_rows = _attention(blk.attn, blk.norm1(packed.x), groups, need_cls, biases)
    x = packed.x + _drop_path(blk.drop_path1, blk.ls1(y), groups)
    if cfg.ranking == "cumulative":
        for side, cls in zip(packed.sides, cls_rows, strict=True):
            if cls is not None:
                side.scores = cls[:, P:] if side.scores is None else side.scores + cls[:, P:]
    if prune:
        rows = [c if c is not None and prunes(g, P, stage) else None for g, c in zip(groups, cls_rows, strict=True)]
        if any(r is not None for r in rows):  # else nobody prunes here (keep rate 1)
            packed = _reorganize(x, packed, rows, stage, P, cfg)
            x = packed.x
        if tracker:
            tracker.record(packed.sides)
    x = x + _drop_path(blk.drop_path2, blk.ls2(blk.mlp(blk.norm2(x))), packed.groups)
    return Packed(x, packed.groups, packed.sides)
