"""The cost model against torch's FlopCounterMode counting the same forward, and the paper's figures."""

import pytest
import torch
from _tiny import ARCHS, images, tiny_pair
from timm.layers import Attention
from torch.utils.flop_counter import FlopCounterMode

import evit
from evit.cost import CostSpec, spec_cost


def counted_gmacs(model, x, keep_rate) -> float:
    """MACs per image counted by torch (explicit attention: on CPU the fused SDPA kernel is not counted)."""
    for blk in model.blocks:
        blk.attn.fused_attn = False
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        model(x, keep_rate=keep_rate)
    return counter.get_total_flops() / 2 / x.shape[0] / 1e9


@pytest.mark.parametrize("kind", sorted(ARCHS))
@pytest.mark.parametrize("keep_rate", [1.0, 0.9, 0.7, 0.5, 0.3])
@pytest.mark.parametrize("fusion", ["one", "nearest", "drop"])
def test_cost_matches_flop_counter(kind, keep_rate, fusion):
    _, model = tiny_pair(kind, fuse=fusion != "drop", fuse_into="nearest" if fusion == "nearest" else "one")
    assert model.evit_cfg.fusion == fusion
    assert model.cost(keep_rate).gmacs == pytest.approx(counted_gmacs(model, images(2), keep_rate), rel=1e-9)


def test_mixed_batch_costs_the_sum_of_its_samples():
    _, model = tiny_pair("vit")
    rates = [0.5, 0.7, 1.0, 0.5]
    expected = sum(model.cost(r).gmacs for r in rates) / len(rates)
    # packing pays for no padding; the only extra is the class-attention row of the keep-1.0 sample at the
    # first stage, where it shares a group with samples that prune (17 tokens x width 32 MACs)
    extra = 17 * 32 / len(rates) / 1e9
    assert counted_gmacs(model, images(4), torch.tensor(rates)) == pytest.approx(expected + extra, rel=1e-9)


def test_deit_small_matches_the_paper():
    model = evit.create_model("deit_small_patch16_224")
    gmacs = {r: round(model.cost(r).gmacs, 1) for r in (1.0, 0.7, 0.5)}
    assert gmacs == {1.0: 4.6, 0.7: 3.0, 0.5: 2.3}  # EViT paper, Table 1 (DeiT-S)
    assert model.cost(0.7).tokens == (197,) * 4 + (140,) * 3 + (100,) * 3 + (72,) * 2
    assert model.cost().keep_rate == 1.0 and model.cost().total_tokens == 12 * 197


class GatedAttention(Attention):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, gated=True, **kwargs)


def test_gated_attention_counts_its_gate():
    """timm's ``Attention(gated=True)`` runs one more linear per token (the gate): the cost counts it."""
    _, model = tiny_pair("vit", attn_layer=GatedAttention)
    assert model.blocks[0].attn.gate is not None
    for keep_rate in (1.0, 0.5):
        assert model.cost(keep_rate).gmacs == pytest.approx(counted_gmacs(model, images(2), keep_rate), rel=1e-9)
    _, plain = tiny_pair("vit")
    assert model.cost(1.0).gmacs > plain.cost(1.0).gmacs


@pytest.mark.parametrize("keep_rate", [1.0, 0.5])
def test_cumulative_ranking_cost_matches_flop_counter(keep_rate):
    """Class rows at every block up to the last pruning one; at keep 1.0 nothing prunes and no row is run."""
    _, model = tiny_pair("vit")
    evit.apply_patch(model, ranking="cumulative")
    assert model.cost(keep_rate).gmacs == pytest.approx(counted_gmacs(model, images(2), keep_rate), rel=1e-9)
    _, paper = tiny_pair("vit")
    assert (model.cost(keep_rate).gmacs == paper.cost(1.0).gmacs) == (keep_rate == 1.0)


def test_spec_cost_defaults_to_the_papers_ranking():
    """``spec_cost`` without ``cumulative`` is the paper's ranking (the budget ``evit.schedule`` spends)."""
    _, model = tiny_pair("vit")
    spec = CostSpec.from_model(model)
    for r in (1.0, 0.7, 0.5):
        assert spec_cost(spec, r, model.block_rates(r), "one") == model.cost(r)
    assert spec_cost(spec, 0.5, model.block_rates(0.5), "one", cumulative=True).gmacs > model.cost(0.5).gmacs
