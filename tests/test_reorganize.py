"""The reorganization math on small hand-checked tensors."""

import math

import pytest
import torch

from evit.reorganize import (
    Group,
    ReorgOptions,
    Side,
    class_attention,
    fuse_weights,
    keep_count,
    merge_adjacent,
    plan_groups,
    prunes,
    reorganize,
    reorganize_group,
    split_group,
)


@pytest.mark.parametrize(
    ("rate", "n", "k"),
    [(1.0, 196, 196), (0.7, 196, 138), (0.5, 196, 98), (0.7, 139, 98), (0.7, 10, 7), (0.01, 16, 1), (0.5, 1, 1)],
)
def test_keep_count_is_ceil(rate, n, k):
    assert keep_count(rate, n) == k


def test_class_attention_matches_full_attention_row():
    torch.manual_seed(0)
    q, k = torch.randn(2, 3, 7, 4), torch.randn(2, 3, 7, 4)
    full = ((q * 0.5) @ k.transpose(-2, -1)).softmax(-1)  # B, H, N, N
    assert torch.allclose(class_attention(q, k, 0.5), full[:, :, 0].mean(1), atol=1e-6)
    assert torch.allclose(class_attention(q, k, 0.5).sum(-1), torch.ones(2))


def test_fusion_by_hand():
    # one sample, one prefix token, 4 tokens with scalar features; keep the top 2 by attention
    x = torch.tensor([[[100.0], [1.0], [2.0], [3.0], [4.0]]])  # B=1, N=5, C=1
    attn = torch.tensor([[0.1, 0.4, 0.2, 0.3]])  # B, n
    (out,), (ids,) = reorganize_group(x, attn, [(0, 1, 2)], num_prefix_tokens=1, fuse=True,
                                      patch_ids=torch.arange(4)[None])
    # kept in attention order: token 2 (0.4), token 4 (0.3); fused = 0.1 * 1 + 0.2 * 3 (unnormalised)
    assert out[0, :, 0].tolist() == pytest.approx([100.0, 2.0, 4.0, 0.1 * 1 + 0.2 * 3])
    assert ids.tolist() == [[1, 3, -1]]
    (dropped,), _ = reorganize_group(x, attn, [(0, 1, 2)], num_prefix_tokens=1, fuse=False)
    assert dropped[0, :, 0].tolist() == [100.0, 2.0, 4.0]


def test_prefix_tokens_untouched_and_mixed_keep_counts():
    torch.manual_seed(0)
    x = torch.randn(3, 2 + 6, 5)  # B=3, two prefix tokens (class + distillation), 6 tokens
    attn = torch.rand(3, 6)
    outs, _ = reorganize_group(x, attn, [(0, 1, 2), (1, 2, 4)], num_prefix_tokens=2, fuse=True)
    assert [tuple(o.shape) for o in outs] == [(1, 2 + 2 + 1, 5), (2, 2 + 4 + 1, 5)]
    assert torch.equal(outs[0][:, :2], x[:1, :2])
    assert torch.equal(outs[1][:, :2], x[1:, :2])
    # each sample equals running it alone with its own k
    for row, (out, idx) in enumerate([(outs[0], 0), (outs[1], 0), (outs[1], 1)]):
        k = out.shape[1] - 3
        (solo,), _ = reorganize_group(x[row : row + 1], attn[row : row + 1], [(0, 1, k)], 2, True)
        assert torch.allclose(out[idx], solo[0], atol=1e-6)


def test_keep_all_returns_input_unchanged():
    x = torch.randn(2, 5, 3)
    (out,), _ = reorganize_group(x, torch.rand(2, 4), [(0, 2, 4)], 1, True)
    assert out is x


def test_groups_split_and_merge():
    g = Group(0, 5, 1 + 16, ((0.5, 2), (0.52, 1), (1.0, 2)))
    subs = split_group(g, num_prefix_tokens=1, fusion="one")
    # 0.5 and 0.52 both keep ceil(.. * 16) = 8 and 9 -> different; 1.0 keeps all 16, no fused token
    assert [(s.start, s.size, s.tokens, k) for s, k in subs] == [(0, 2, 10, 8), (2, 1, 11, 9), (3, 2, 17, 16)]
    assert prunes(g, 1) and not prunes(Group(0, 2, 17, ((1.0, 2),)), 1)
    merged = merge_adjacent([Group(0, 2, 10, ((0.5, 2),)), Group(2, 1, 10, ((0.55, 1),)), Group(3, 1, 11, ((0.6, 1),))])
    assert [(m.start, m.size, m.tokens) for m in merged] == [(0, 3, 10), (3, 1, 11)]
    assert math.isclose(sum(c for _, c in merged[0].rates), 3)


def test_reorganize_decides_once_and_returns_the_apply_step():
    """ToMe-style: the ranking is decided from the attention alone; the returned step applies it to any
    tokens of the group's shape (here: to x and to 2x, which fusion "one" maps linearly)."""
    torch.manual_seed(0)
    x, attn = torch.randn(3, 1 + 6, 4), torch.rand(3, 6)
    apply = reorganize(attn, [(0, 1, 2), (1, 2, 4)], ReorgOptions("one", num_prefix_tokens=1))
    outs, sides = apply(x, Side(ids=torch.arange(6).expand(3, -1)))
    doubled, _ = apply(2 * x, None)
    assert [o.shape for o in outs] == [(1, 1 + 2 + 1, 4), (2, 1 + 4 + 1, 4)]
    for a, b in zip(outs, doubled, strict=True):
        torch.testing.assert_close(2 * a, b)
    assert sides[0].ids[0, :2].tolist() == attn[0].topk(2).indices.tolist() and sides[0].ids[0, 2] == -1
    with pytest.raises(ValueError, match="fusion must be one of"):
        ReorgOptions("both")


def test_rates_with_equal_keep_counts_share_a_subgroup():
    """0.55 and 0.56 both keep ceil(.. * 16) = 9 of 16 tokens: one subgroup of 5 samples, rows 0..4."""
    g = Group(0, 5, 1 + 16, ((0.55, 2), (0.56, 3)))
    assert split_group(g, 1, "one") == [(Group(0, 5, 1 + 9 + 1, ((0.55, 2), (0.56, 3))), 9)]
    shifted = Group(4, 3, 1 + 16, ((0.3, 1), (0.55, 1), (0.56, 1)))  # a group later in the batch
    assert [(s.start, s.size, k) for s, k in split_group(shifted, 1, "drop")] == [(4, 1, 5), (5, 2, 9)]
    assert plan_groups([(0.5, 2), (1.0, 3)], 17) == [Group(0, 5, 17, ((0.5, 2), (1.0, 3)))]


def test_prunes_counts_the_patches_and_follows_the_stage():
    # 19 patches at 0.95 keep ceil(18.05) = 19: nothing dropped; 20 at 0.95 keep 19
    assert not prunes(Group(0, 1, 1 + 19, ((0.95, 1),)), 1)
    assert prunes(Group(0, 1, 1 + 20, ((0.95, 1),)), 1)
    g = Group(0, 2, 1 + 16, ((0.5, 2),))
    assert prunes(g, 1) and not prunes(g, 1, stage={0.5: 1.0})  # a schedule that keeps all at this block


def test_fusion_weights_default_to_the_raw_attention_and_keep_the_dtype():
    attn, kept = torch.tensor([[0.1, 0.4, 0.2, 0.3]]), torch.tensor([[1, 3]])
    assert fuse_weights(attn, kept)[0].tolist() == pytest.approx([0.1, 0.0, 0.2, 0.0])  # the official sum
    assert fuse_weights(attn, kept, normalize=True)[0].tolist() == pytest.approx([1 / 3, 0.0, 2 / 3, 0.0])
    x = torch.randn(2, 1 + 4, 8).bfloat16()
    (out,), _ = reorganize_group(x, torch.rand(2, 4), [(0, 2, 2)], 1, fuse=True)
    assert out.dtype == torch.bfloat16 and out.shape == (2, 1 + 2 + 1, 8)


def test_nearest_fusion_carries_sizes_and_scores():
    """Fusion "nearest" from a state without sizes (every token one patch): each kept token's size and
    accumulated score become its own plus those of the tokens merged into it. Six samples of 4 tokens
    (more samples than tokens)."""
    torch.manual_seed(0)
    x, attn = torch.randn(6, 1 + 4, 3), torch.rand(6, 4)
    scores = torch.rand(6, 4)
    (out,), (side,) = reorganize(attn, [(0, 6, 2)], ReorgOptions("nearest"), scores)(x, Side(scores=scores))
    assert out.shape == (6, 1 + 2, 3) and side.sizes.shape == side.scores.shape == (6, 2)
    assert side.sizes.sum(1).tolist() == [4.0] * 6  # every patch is in one of the 2 kept tokens
    torch.testing.assert_close(side.scores.sum(1), scores.sum(1))  # and so is its score
    kept = scores.argsort(dim=1, descending=True)[:, :2]  # ranked by the accumulated score, not attn
    assert (side.scores >= scores.gather(1, kept) - 1e-6).all()
