"""Fusion "nearest": tokens a pruning block does not keep are merged into their most similar kept token.

A pure tensor function, as ToMe's merge is: the similarity of each token not kept to every kept one, then
a size-weighted mean per kept token. ``evit.reorganize`` decides which tokens are kept.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["merge_nearest"]


def merge_nearest(
    tokens: torch.Tensor, sizes: torch.Tensor, keep_idx: torch.Tensor, rest_idx: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge every token that is not kept into the kept token most similar to it (cosine similarity).

    tokens: b, n, C; sizes: b, n patches each token stands for; keep_idx: b, k; rest_idx:
    b, r (the other tokens). Each kept token becomes the size-weighted mean of itself and the tokens merged
    into it, as ToMe merges. Returns the merged kept tokens b, k, C (in ``tokens``' dtype; the sums run in
    float32, where float16 could overflow) and, per token not kept, the kept slot it went into (b, r).
    """
    dtype, tokens = tokens.dtype, tokens.float()
    C = tokens.shape[-1]
    kept = tokens.gather(1, keep_idx.unsqueeze(-1).expand(-1, -1, C))  # b, k, C
    rest = tokens.gather(1, rest_idx.unsqueeze(-1).expand(-1, -1, C))  # b, r, C
    unit = F.normalize(torch.cat([kept, rest], dim=1), dim=-1)
    k = kept.shape[1]
    dst = (unit[:, k:] @ unit[:, :k].transpose(1, 2)).argmax(dim=-1)  # b, r: the most similar kept token
    w_kept = sizes.gather(1, keep_idx).float()  # b, k
    w_rest = sizes.gather(1, rest_idx).float()  # b, r
    slots = dst.unsqueeze(-1).expand(-1, -1, C)  # b, r, C
    total = (kept * w_kept.unsqueeze(-1)).scatter_add(1, slots, rest * w_rest.unsqueeze(-1))  # b, k, C
    return (total / w_kept.scatter_add(1, dst, w_rest).unsqueeze(-1)).to(dtype), dst
