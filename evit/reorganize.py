"""EViT token reorganization: pure tensor functions, nothing else knows the trick.

At a pruning block the class token's attention to the other tokens (softmax over all keys, averaged over
heads) ranks the non-prefix tokens; the top ``ceil(keep_rate * n)`` stay and the rest are fused into one
extra token, their sum weighted by that same (unnormalised) attention, as in the official EViT code.

Samples with different keep rates end up with different token counts. They are kept *packed*: samples
are ordered by keep rate, and samples with the same token count form a contiguous group, so a packed
``T, C`` tensor holds every real token once (no padding) and each group is a free ``Bg, Ng, C`` view of it.
Token-wise layers run on the packed tensor; attention runs once per group (per distinct length).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = [
    "Group",
    "class_attention",
    "fuse_weights",
    "keep_count",
    "merge_adjacent",
    "plan_groups",
    "prunes",
    "reorganize_group",
    "split_group",
    "stage_counts",
]


def keep_count(keep_rate: float, n: int) -> int:
    """Tokens kept out of ``n``: ``ceil(keep_rate * n)``, at least 1.

    Rounded to 9 decimals first so that float noise (``0.7 * 10 = 7.000000000000001``) cannot keep an
    extra token; for the paper's 196-patch models this equals the official ``math.ceil``.
    """
    return max(1, min(n, math.ceil(round(keep_rate * n, 9))))


def stage_counts(num_patches: int, num_stages: int, keep_rate: float, fuse: bool) -> list[int]:
    """Non-prefix token count entering each stage: ``[n_0, n_1, ..., n_S]`` for ``S`` pruning stages.

    ``n_{s+1} = k + 1`` when ``k = keep_count(keep_rate, n_s) < n_s`` and tokens are fused, else ``k``.
    """
    counts = [num_patches]
    for _ in range(num_stages):
        n = counts[-1]
        k = keep_count(keep_rate, n)
        counts.append(k + 1 if (fuse and k < n) else k)
    return counts


@dataclass(frozen=True)
class Group:
    """A contiguous run of samples (in keep-rate order) that share a token count."""

    start: int  # first sample, in keep-rate order
    size: int  # samples in the group
    tokens: int  # tokens per sample, prefix tokens included
    rates: tuple[tuple[float, int], ...]  # (keep rate, samples at that rate), ascending rates


def plan_groups(rate_counts: Sequence[tuple[float, int]], num_tokens: int) -> list[Group]:
    """The single group every sample starts in, before any pruning."""
    return [Group(0, sum(c for _, c in rate_counts), num_tokens, tuple(rate_counts))]


def split_group(group: Group, num_prefix_tokens: int, fuse: bool) -> list[tuple[Group, int]]:
    """The subgroups one group splits into at a pruning stage, each with its keep count ``k``.

    Keep counts are monotone in the keep rate, so samples with equal counts are contiguous.
    """
    n = group.tokens - num_prefix_tokens
    subs: list[tuple[Group, int]] = []
    start = group.start
    for rate, count in group.rates:
        k = keep_count(rate, n)
        if subs and subs[-1][1] == k:
            last = subs[-1][0]
            subs[-1] = (Group(last.start, last.size + count, last.tokens, (*last.rates, (rate, count))), k)
        else:
            tokens = num_prefix_tokens + k + (1 if fuse and k < n else 0)
            subs.append((Group(start, count, tokens, ((rate, count),)), k))
        start += count
    return subs


def prunes(group: Group, num_prefix_tokens: int) -> bool:
    """Whether any sample of the group drops tokens at a pruning stage (keep rate 1 changes nothing)."""
    n = group.tokens - num_prefix_tokens
    return any(keep_count(rate, n) < n for rate, _ in group.rates)


def merge_adjacent(groups: Sequence[Group]) -> list[Group]:
    """Merge neighbouring groups that have the same token count (one attention call instead of two)."""
    merged: list[Group] = []
    for g in groups:
        if merged and merged[-1].tokens == g.tokens:
            last = merged[-1]
            merged[-1] = Group(last.start, last.size + g.size, last.tokens, last.rates + g.rates)
        else:
            merged.append(g)
    return merged


def class_attention(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """The class token's attention to every token, averaged over heads, from ``q_cls`` and ``K`` only.

    q: B, H, N, D (only row 0 is used); k: B, H, N, D. Returns B, N (softmax over all N keys), in float32.
    Never builds the N x N matrix: one B, H, 1, N row.
    """
    q_cls = q[:, :, :1].float() * scale  # B, H, 1, D
    logits = q_cls @ k.float().transpose(-2, -1)  # B, H, 1, N
    return logits.softmax(dim=-1).mean(dim=1).squeeze(1)  # B, N


def fuse_weights(cls_attn: torch.Tensor, top_idx: torch.Tensor) -> torch.Tensor:
    """Fusion weights: the class attention of every token that is *not* kept, zero for kept ones.

    cls_attn: B, n; top_idx: B, k (indices of kept tokens). Returns B, n.
    """
    return cls_attn.scatter(1, top_idx, 0.0)


def reorganize_group(
    x: torch.Tensor,
    cls_attn: torch.Tensor,
    subgroups: Sequence[tuple[int, int, int]],
    num_prefix_tokens: int,
    fuse: bool,
    patch_ids: torch.Tensor | None = None,
) -> tuple[list[torch.Tensor], list[torch.Tensor | None]]:
    """Keep the most attended tokens of each sample and fuse the rest into one token.

    x: B, N, C tokens of one group (prefix tokens first); cls_attn: B, N - P class attention to the
    non-prefix tokens; subgroups: ``(start, size, k)`` runs of samples with ``k`` tokens to keep
    (ascending ``k``). patch_ids: B, N - P original patch index of each token (-1 for fused ones), tracked
    for visualization. Returns, per subgroup, its new tokens ``size, P + k (+1), C`` and its patch ids.
    """
    P = num_prefix_tokens
    n = x.shape[1] - P
    k_max = max(k for _, _, k in subgroups)
    if k_max >= n and len(subgroups) == 1:  # nothing to prune in this group
        return [x], [patch_ids]
    tokens = x[:, P:]  # B, n, C
    top_idx = cls_attn.topk(k_max, dim=1, largest=True, sorted=True).indices  # B, k_max
    out_x: list[torch.Tensor] = []
    out_ids: list[torch.Tensor | None] = []
    for start, size, k in subgroups:
        rows = slice(start, start + size)
        if k >= n:  # keep rate 1 (or rounding): unchanged
            out_x.append(x[rows])
            out_ids.append(None if patch_ids is None else patch_ids[rows])
            continue
        idx = top_idx[rows, :k]  # b, k
        kept = tokens[rows].gather(1, idx.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))  # b, k, C
        parts = [x[rows, :P], kept]
        ids = None if patch_ids is None else patch_ids[rows].gather(1, idx)
        if fuse:
            w = fuse_weights(cls_attn[rows], idx).to(tokens.dtype)  # b, n
            parts.append(torch.bmm(w.unsqueeze(1), tokens[rows]))  # b, 1, C
            if ids is not None:
                ids = F.pad(ids, (0, 1), value=-1)
        out_x.append(torch.cat(parts, dim=1))
        out_ids.append(ids)
    return out_x, out_ids
