"""The thin layer over timm: run a timm ViT's own blocks with EViT reorganization at a few of them.

``apply_patch(model)`` swaps the class of a timm ``VisionTransformer`` (or a subclass: distilled, register
tokens, ...) for a subclass whose ``forward`` takes a keep rate, as ToMe does. Parameters, state-dict keys,
``forward_head`` and the pretrained config are timm's. Blocks must follow timm's ``Block`` layout
(norm1, attn, ls1, drop_path1, norm2, mlp, ls2, drop_path2) with a fused-qkv ``Attention``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from evit.cost import Cost, model_cost
from evit.reorganize import (
    Group,
    class_attention,
    merge_adjacent,
    plan_groups,
    prunes,
    reorganize_group,
    split_group,
)

KeepRate = float | Sequence[float] | torch.Tensor | None

_BLOCK_PARTS = ("norm1", "attn", "ls1", "drop_path1", "norm2", "mlp", "ls2", "drop_path2")
_ATTN_PARTS = ("qkv", "q_norm", "k_norm", "proj", "num_heads", "head_dim", "scale")


@dataclass(frozen=True)
class EViTConfig:
    prune_blocks: tuple[int, ...]  # 0-based indices into model.blocks (DeiT-S: 3, 6, 9)
    fuse: bool = True  # fuse inattentive tokens into one (False: drop them, the paper's ablation)
    keep_rate: float = 1.0  # default keep rate when a call gives none


@dataclass
class EViTOutput:
    logits: torch.Tensor  # B, num_classes
    tokens: torch.Tensor  # B: tokens the blocks processed per sample, summed over blocks
    kept: list[torch.Tensor] | None = None  # per stage, B, num_patches: patch still its own token


def default_prune_blocks(depth: int) -> tuple[int, ...]:
    """The paper's schedule (blocks 4, 7, 10 of 12, 1-based) scaled to ``depth``: at 1/4, 2/4, 3/4."""
    return tuple(sorted({min(depth - 1, max(1, round(depth * s / 4))) for s in (1, 2, 3)}))


def resolve_keep_rates(keep_rate: KeepRate, batch_size: int, default: float) -> list[float]:
    """One float keep rate per sample, validated: each in (0, 1]."""
    if keep_rate is None:
        keep_rate = default
    if isinstance(keep_rate, int | float):
        rates = [float(keep_rate)] * batch_size
    else:
        t = torch.as_tensor(keep_rate, dtype=torch.float64).detach().cpu()
        if t.ndim != 1 or t.numel() != batch_size:
            raise ValueError(
                f"keep_rate must be a float or a 1-D sequence with one rate per sample "
                f"({batch_size}), got shape {tuple(t.shape)}"
            )
        rates = t.tolist()
    bad = [r for r in rates if not (0.0 < r <= 1.0)]  # NaN fails too
    if bad:
        raise ValueError(f"keep_rate must be in (0, 1], got {bad[0]}")
    return rates


def _group_views(x: torch.Tensor, groups: Sequence[Group]) -> list[torch.Tensor]:
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
    attn: nn.Module, x: torch.Tensor, groups: Sequence[Group], need_cls: Sequence[bool]
) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
    """timm ``Attention.forward`` on packed tokens, attention once per group; the class row where asked.

    x: T, C. Returns T, C and per group its B, N class-attention rows (None where not asked).
    """
    H, D = attn.num_heads, attn.head_dim
    gate = attn.gate(x).sigmoid() if getattr(attn, "gate", None) is not None else None
    qkv = attn.qkv(x)  # T, 3 * H * D
    outs, cls_rows = [], []
    for g, view, cls in zip(groups, _group_views(qkv, groups), need_cls, strict=True):
        q, k, v = view.reshape(g.size, g.tokens, 3, H, D).permute(2, 0, 3, 1, 4).unbind(0)  # B, H, N, D
        q, k = attn.q_norm(q), attn.k_norm(k)
        cls_rows.append(class_attention(q, k, attn.scale) if cls else None)
        if attn.fused_attn:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=attn.attn_drop.p if attn.training else 0.0)
        else:
            a = ((q * attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
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
    return _cat([drop_path(v) for v in _group_views(y, groups)])


class _Tracker:
    """Per-stage bookkeeping for visualization: original patch index of every non-prefix token."""

    def __init__(self, batch_size: int, num_patches: int, device: torch.device) -> None:
        self.num_patches = num_patches
        self.ids = [torch.arange(num_patches, device=device).expand(batch_size, -1)]  # per group: B, n
        self.kept: list[torch.Tensor] = []

    def record(self, ids: list[torch.Tensor]) -> None:
        masks = []
        for gid in ids:  # b, n (-1: a fused token)
            slot = torch.where(gid < 0, self.num_patches, gid)
            mask = torch.zeros(gid.shape[0], self.num_patches + 1, dtype=torch.bool, device=gid.device)
            masks.append(mask.scatter_(1, slot, True)[:, : self.num_patches])
        self.kept.append(torch.cat(masks))


def _reorganize(
    x: torch.Tensor,
    groups: list[Group],
    cls_rows: list[torch.Tensor | None],
    num_prefix_tokens: int,
    fuse: bool,
    tracker: _Tracker | None,
) -> tuple[torch.Tensor, list[Group]]:
    """One pruning stage over every group; returns the new packed tokens and groups."""
    if all(cls is None for cls in cls_rows):  # nobody prunes here (keep rate 1)
        if tracker:
            tracker.record(tracker.ids)
        return x, groups
    P = num_prefix_tokens
    new_x, new_groups, new_ids = [], [], []
    views = _group_views(x, groups)
    ids = tracker.ids if tracker else [None] * len(groups)
    for g, view, cls, gid in zip(groups, views, cls_rows, ids, strict=True):
        if cls is None:  # every sample of this group keeps all its tokens
            new_x.append(view)
            new_ids.append(gid)
            new_groups.append(g)
            continue
        subs = split_group(g, P, fuse)
        runs = [(s.start - g.start, s.size, k) for s, k in subs]
        xs, id_parts = reorganize_group(view, cls[:, P:], runs, P, fuse, gid)
        new_x += xs
        new_ids += id_parts
        new_groups += [s for s, _ in subs]
    if tracker:
        tracker.ids = _merge_ids(new_groups, new_ids)
        tracker.record(tracker.ids)
    return _cat(new_x), merge_adjacent(new_groups)


def _merge_ids(groups: list[Group], ids: list[torch.Tensor]) -> list[torch.Tensor]:
    merged: list[torch.Tensor] = []
    prev: Group | None = None
    for g, gid in zip(groups, ids, strict=True):
        if prev is not None and prev.tokens == g.tokens:
            merged[-1] = torch.cat([merged[-1], gid])
        else:
            merged.append(gid)
        prev = g
    return merged


def _block(
    blk: nn.Module,
    x: torch.Tensor,
    groups: list[Group],
    prune: bool,
    num_prefix_tokens: int,
    fuse: bool,
    tracker: _Tracker | None,
) -> tuple[torch.Tensor, list[Group]]:
    """timm ``Block.forward`` (pre-norm, LayerScale, stochastic depth) with reorganization after attention."""
    need_cls = [prune and prunes(g, num_prefix_tokens) for g in groups]
    y, cls_rows = _attention(blk.attn, blk.norm1(x), groups, need_cls)
    x = x + _drop_path(blk.drop_path1, blk.ls1(y), groups)
    if prune:
        x, groups = _reorganize(x, groups, cls_rows, num_prefix_tokens, fuse, tracker)
    x = x + _drop_path(blk.drop_path2, blk.ls2(blk.mlp(blk.norm2(x))), groups)
    return x, groups


class EViTMixin:
    """Methods added to a timm ViT by ``apply_patch``; ``forward`` takes a per-call or per-sample keep rate."""

    evit_cfg: EViTConfig

    @property
    def num_patches(self) -> int:
        return self.patch_embed.num_patches

    def forward(self, x: torch.Tensor, keep_rate: KeepRate = None) -> torch.Tensor:
        return self.forward_with_info(x, keep_rate).logits

    def forward_with_info(
        self, x: torch.Tensor, keep_rate: KeepRate = None, return_kept: bool = False
    ) -> EViTOutput:
        """Logits, tokens processed per sample and, if asked, which patches each stage kept.

        x: B, 3, H, W. keep_rate: a float, or one rate per sample (samples with different rates share the
        batch; each gets the logits it would get alone).
        """
        B = x.shape[0]
        rates = resolve_keep_rates(keep_rate, B, self.evit_cfg.keep_rate)
        rate_t = torch.tensor(rates, dtype=torch.float64)
        uniq, counts = torch.unique(rate_t, sorted=True, return_counts=True)
        perm = None if len(uniq) == 1 else torch.argsort(rate_t, stable=True).to(x.device)

        x = self.norm_pre(self.patch_drop(self._pos_embed(self.patch_embed(x))))  # B, N, C
        if perm is not None:
            x = x.index_select(0, perm)
        groups = plan_groups(list(zip(uniq.tolist(), counts.tolist(), strict=True)), x.shape[1])
        tracker = _Tracker(B, x.shape[1] - self.num_prefix_tokens, x.device) if return_kept else None
        tokens = dict.fromkeys(uniq.tolist(), 0)
        x = x.reshape(-1, x.shape[-1])  # T, C: packed
        for i, blk in enumerate(self.blocks):
            for g in groups:
                for rate, _ in g.rates:
                    tokens[rate] += g.tokens
            prune = i in self.evit_cfg.prune_blocks
            x, groups = _block(blk, x, groups, prune, self.num_prefix_tokens, self.evit_cfg.fuse, tracker)
        x = self.norm(x)
        logits = torch.cat([self.forward_head(v) for v in _group_views(x, groups)])  # B, classes (sorted)
        per_sample = torch.tensor([tokens[r] for r in uniq.tolist()]).repeat_interleave(counts)
        kept = tracker.kept if tracker else None
        if perm is not None:
            inv = torch.argsort(perm)
            logits = logits.index_select(0, inv)
            per_sample = per_sample.index_select(0, inv.cpu())
            kept = [k.index_select(0, inv) for k in kept] if kept else kept
        return EViTOutput(logits=logits, tokens=per_sample, kept=kept)

    def cost(self, keep_rate: float | None = None) -> Cost:
        """Tokens per block and GMACs per image at ``keep_rate`` (default: the model's)."""
        return model_cost(self, self.evit_cfg.keep_rate if keep_rate is None else keep_rate)


_PATCHED: dict[type, type] = {}


def _check_compatible(model: nn.Module) -> None:
    if getattr(model, "cls_token", None) is None:
        raise ValueError(
            f"EViT ranks tokens by the class token's attention, but {type(model).__name__} has no class token "
            "(class_token=False / global_pool without a class token); use a ViT with a class token"
        )
    for i, blk in enumerate(getattr(model, "blocks", [])):
        missing = [p for p in _BLOCK_PARTS if not hasattr(blk, p)]
        missing += [f"attn.{p}" for p in _ATTN_PARTS if not hasattr(getattr(blk, "attn", None), p)]
        if missing or not isinstance(blk.attn.qkv, nn.Linear):
            raise ValueError(
                f"block {i} ({type(blk).__name__}/{type(getattr(blk, 'attn', None)).__name__}) does not follow "
                f"timm's Block/Attention layout (missing {missing or ['fused qkv Linear']}); EViT cannot patch it"
            )


def apply_patch(
    model: nn.Module, prune_blocks: Sequence[int] | None = None, fuse: bool = True, keep_rate: float = 1.0
) -> nn.Module:
    """Make a timm ViT an EViT model in place: same parameters, ``forward(x, keep_rate)``."""
    _check_compatible(model)
    depth = len(model.blocks)
    blocks = default_prune_blocks(depth) if prune_blocks is None else tuple(sorted(set(prune_blocks)))
    if any(not 0 <= b < depth for b in blocks):
        raise ValueError(f"prune_blocks {blocks} must be 0-based block indices in [0, {depth})")
    resolve_keep_rates(keep_rate, 1, 1.0)
    base = type(model)
    if issubclass(base, EViTMixin):
        base = base.__mro__[2]
    if base not in _PATCHED:
        _PATCHED[base] = type(f"EViT{base.__name__}", (EViTMixin, base), {})
    model.__class__ = _PATCHED[base]
    model.evit_cfg = EViTConfig(prune_blocks=blocks, fuse=fuse, keep_rate=float(keep_rate))
    return model
