"""EViT token reorganization: pure tensor functions, nothing else knows the trick.

At a pruning block the class token's attention to the other tokens (softmax over all keys, averaged over
heads) ranks the non-prefix tokens; the top ``ceil(keep_rate * n)`` stay and the rest are fused into one
extra token, their sum weighted by that same (unnormalised) attention, as in the official EViT code.

Training-free options (the paper's rule is the default of each): the fused token as the attention-weighted
*mean* instead of the sum; *nearest* fusion, each inattentive token merged into the kept token most similar to
it (cosine similarity; a kept token becomes the size-weighted mean of itself and what it took in, as ToMe
merges) instead of all into one extra token; *proportional attention* (a token stands for ``size`` patches
and gets ``log(size)`` added to its attention logit, as ToMe does); ranking by class attention *accumulated*
over the blocks so far instead of the pruning block's alone. Per-token state that follows the tokens through
a reorganization (original patch ids, sizes, accumulated scores) travels in a ``Side``.

Samples with different keep rates end up with different token counts. They are kept *packed*: samples
are ordered by keep rate, and samples with the same token count form a contiguous group, so a packed
``T, C`` tensor holds every real token once (no padding) and each group is a free ``Bg, Ng, C`` view of it.
Token-wise layers run on the packed tensor; attention runs once per group (per distinct length).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from evit.config import FUSIONS, check_choice, check_fusion, extra_token, keep_count
from evit.merge import merge_nearest

__all__ = [
    "FUSIONS",
    "Group",
    "ReorgOptions",
    "Reorganize",
    "Side",
    "check_choice",
    "check_fusion",
    "class_attention",
    "fuse_weights",
    "keep_count",
    "merge_adjacent",
    "plan_groups",
    "prunes",
    "reorganize",
    "reorganize_group",
    "size_bias",
    "split_group",
]

StageRates = dict[float, float] | None  # requested keep rate -> this block's keep rate (None: the same)

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


def split_group(
    group: Group, num_prefix_tokens: int, fusion: str, stage: StageRates = None
) -> list[tuple[Group, int]]:
    """The subgroups one group splits into at a pruning stage, each with its keep count ``k``.

    ``stage`` maps a sample's requested keep rate to this block's rate (a schedule); by default they are
    equal. Keep counts are monotone in the keep rate, so samples with equal counts are contiguous (with a
    non-monotone schedule equal counts may form separate subgroups, which is still correct).
    """
    n = group.tokens - num_prefix_tokens
    subs: list[tuple[Group, int]] = []
    start = group.start
    for rate, count in group.rates:
        k = keep_count(rate if stage is None else stage[rate], n)
        if subs and subs[-1][1] == k:
            last = subs[-1][0]
            subs[-1] = (Group(last.start, last.size + count, last.tokens, (*last.rates, (rate, count))), k)
        else:
            tokens = num_prefix_tokens + k + extra_token(fusion, k, n)
            subs.append((Group(start, count, tokens, ((rate, count),)), k))
        start += count
    return subs


def prunes(group: Group, num_prefix_tokens: int, stage: StageRates = None) -> bool:
    """Whether any sample of the group drops tokens at a pruning stage (keep rate 1 changes nothing)."""
    n = group.tokens - num_prefix_tokens
    return any(keep_count(rate if stage is None else stage[rate], n) < n for rate, _ in group.rates)


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


def class_attention(
    q: torch.Tensor, k: torch.Tensor, scale: float, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """The class token's attention to every token, averaged over heads, from ``q_cls`` and ``K`` only.

    q: B, H, N, D (only row 0 is used); k: B, H, N, D; bias: None or B, 1, 1, N added to the logits (the
    same additive mask the full attention gets). Returns B, N (softmax over all N keys), in float32.
    Never builds the N x N matrix: one B, H, 1, N row.
    """
    q_cls = q[:, :, :1].float() * scale  # B, H, 1, D
    logits = q_cls @ k.float().transpose(-2, -1)  # B, H, 1, N
    if bias is not None:
        logits = logits + bias.float()
    return logits.softmax(dim=-1).mean(dim=1).squeeze(1)  # B, N


def size_bias(sizes: torch.Tensor | None, num_prefix_tokens: int) -> torch.Tensor | None:
    """Proportional attention's additive key mask: ``log(size)`` per key, 0 for prefix tokens.

    sizes: None (every token is one patch: no mask) or B, n patches each non-prefix token stands for.
    Returns B, 1, 1, P + n (float32).
    """
    if sizes is None:
        return None
    return F.pad(sizes.float().log(), (num_prefix_tokens, 0))[:, None, None, :]


def fuse_weights(cls_attn: torch.Tensor, top_idx: torch.Tensor, normalize: bool = False) -> torch.Tensor:
    """Fusion weights: the class attention of every token that is *not* kept, zero for kept ones.

    cls_attn: B, n; top_idx: B, k (indices of kept tokens). Returns B, n: the raw attention (the official
    code's sum) or, with ``normalize``, divided by its sum (the fused token is their weighted mean).
    """
    w = cls_attn.scatter(1, top_idx, 0.0)
    if normalize:
        w = w / w.sum(dim=1, keepdim=True).clamp_min(torch.finfo(w.dtype).tiny)
    return w


@dataclass
class Side:
    """Per-token state that follows the non-prefix tokens of a group through reorganizations (each B, n)."""

    ids: torch.Tensor | None = None  # original patch index, -1 for a fused token (visualization)
    sizes: torch.Tensor | None = None  # patches each token stands for (proportional attention); None: all 1
    scores: torch.Tensor | None = None  # accumulated class attention (cumulative ranking)

    def rows(self, rows: slice) -> Side:
        return Side(*(None if t is None else t[rows] for t in (self.ids, self.sizes, self.scores)))

    def select(self, idx: torch.Tensor, fusion: str, merged: tuple[torch.Tensor, torch.Tensor] | None = None) -> Side:
        """The state of the kept tokens (``idx``: b, k). Fusion "one" appends the fused token's: id -1, the
        summed sizes and scores of the tokens it replaces; "nearest" (``merged``: ``rest`` b, r indices of the
        tokens not kept and ``dst`` b, r the kept slot each went into) adds theirs to their hosts'."""

        if fusion == "nearest" and merged is None:
            raise ValueError("fusion 'nearest' needs merged=(rest, dst): where the tokens not kept went")

        def ids(t: torch.Tensor | None) -> torch.Tensor | None:  # a fused token has id -1
            if t is None:
                return None
            kept = t.gather(1, idx)  # b, k
            return F.pad(kept, (0, 1), value=-1) if fusion == "one" else kept

        def summed(t: torch.Tensor | None) -> torch.Tensor | None:  # sizes, scores: a token adds up its parts
            if t is None:
                return None
            kept = t.gather(1, idx)  # b, k
            if fusion == "nearest":
                rest, dst = merged
                return kept.scatter_add(1, dst, t.gather(1, rest))
            if fusion == "one":  # the fused token: the sum of what is not kept
                return torch.cat([kept, t.scatter(1, idx, 0).sum(dim=1, keepdim=True)], dim=1)
            return kept

        return Side(ids(self.ids), summed(self.sizes), summed(self.scores))


@dataclass(frozen=True)
class ReorgOptions:
    """How a pruning block reorganizes tokens (``EViTConfig``'s ``fusion`` and ``fuse_weight``)."""

    fusion: str = "one"  # FUSIONS: what becomes of the tokens not kept
    normalize: bool = False  # fusion "one": the attention-weighted mean instead of the weighted sum
    num_prefix_tokens: int = 1  # class (and distillation / register) tokens: never ranked, always kept

    def __post_init__(self) -> None:
        check_fusion(self.fusion)


Reorganize = Callable[[torch.Tensor, "Side | None"], tuple[list[torch.Tensor], list["Side"]]]


def reorganize(
    cls_attn: torch.Tensor,
    subgroups: Sequence[tuple[int, int, int]],
    options: ReorgOptions,
    score: torch.Tensor | None = None,
) -> Reorganize:
    """Decide which tokens each sample keeps; returns the step that applies it: ``apply(x, side)``.

    cls_attn: B, N - P class attention to the non-prefix tokens (fusion "one"'s weights); score: B, N - P
    ranking (default: ``cls_attn``); subgroups: ``(start, size, k)`` runs of samples with ``k`` tokens to
    keep (ascending ``k``). ``apply(x, side)``: x, B, N, C tokens of one group (prefix tokens first); side,
    the tokens' per-token state (fusion "nearest" weighs tokens by ``side.sizes``). It returns, per
    subgroup, the new tokens ``size, P + k (+1), C`` and their state.
    """
    fusion, n = options.fusion, cls_attn.shape[1]
    k_max = max(k for _, _, k in subgroups)
    rank = cls_attn if score is None else score
    top_idx = None  # nothing to prune in this group
    if not (k_max >= n and len(subgroups) == 1):
        if fusion == "nearest" and torch.onnx.is_in_onnx_export():  # ONNX TopK orders ties by index, as stable
            top_idx = rank.topk(n, dim=1, largest=True, sorted=True).indices  # B, n
        elif fusion == "nearest":  # every token in rank order: the kept ones first, then the rest
            top_idx = rank.argsort(dim=1, descending=True, stable=True)  # B, n
        else:
            top_idx = rank.topk(k_max, dim=1, largest=True, sorted=True).indices  # B, k_max

    def apply(x: torch.Tensor, side: Side | None = None) -> tuple[list[torch.Tensor], list[Side]]:
        side = side or Side()
        if fusion == "nearest" and side.sizes is None:  # merged tokens must remember their size
            side = Side(side.ids, x.new_ones(x.shape[0], n, dtype=torch.float32), side.scores)
        if top_idx is None:
            return [x], [side]
        out_x: list[torch.Tensor] = []
        out_side: list[Side] = []
        for start, size, k in subgroups:
            rows = slice(start, start + size)
            xs, sub = (x[rows], side.rows(rows)) if k >= n else _keep(x[rows], side.rows(rows), cls_attn[rows],
                                                                       top_idx[rows], k, options)
            out_x.append(xs)
            out_side.append(sub)
        return out_x, out_side

    return apply


def _keep(x: torch.Tensor, side: Side, cls_attn: torch.Tensor, order: torch.Tensor, k: int,
          options: ReorgOptions) -> tuple[torch.Tensor, Side]:
    """One subgroup's new tokens (x: b, N, C; order: b, >= k token indices, best first) and their state."""
    P, fusion = options.num_prefix_tokens, options.fusion
    tokens = x[:, P:]  # b, n, C
    idx, merged = order[:, :k], None  # b, k
    if fusion == "nearest":
        rest = order[:, k:]  # b, n - k
        kept, dst = merge_nearest(tokens, side.sizes, idx, rest)
        merged = (rest, dst)
    else:
        kept = tokens.gather(1, idx.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))  # b, k, C
    parts = [x[:, :P], kept]
    if fusion == "one":
        w = fuse_weights(cls_attn, idx, options.normalize)  # b, n (float32: the sum stays exact)
        parts.append(torch.bmm(w.unsqueeze(1), tokens.float()).to(tokens.dtype))  # b, 1, C
    return torch.cat(parts, dim=1), side.select(idx, fusion, merged)


def reorganize_group(
    x: torch.Tensor,
    cls_attn: torch.Tensor,
    subgroups: Sequence[tuple[int, int, int]],
    num_prefix_tokens: int,
    fuse: bool,
    patch_ids: torch.Tensor | None = None,
) -> tuple[list[torch.Tensor], list[torch.Tensor | None]]:
    """The paper's rule: ``reorganize`` with the class attention as ranking and unnormalised fusion weights.

    patch_ids: B, N - P original patch index of each token (-1 for fused ones). Returns, per subgroup,
    its new tokens and its patch ids.
    """
    options = ReorgOptions("one" if fuse else "drop", num_prefix_tokens=num_prefix_tokens)
    xs, sides = reorganize(cls_attn, subgroups, options)(x, Side(ids=patch_ids))
    return xs, [s.ids for s in sides]
