"""Schedules: how a requested keep rate becomes a keep rate per block, and the keep rate for a GMAC budget."""

import copy

import pytest
from _tiny import TINY

import evit
from evit.cost import CostSpec, spec_cost
from evit.schedule import Schedule, default_prune_blocks, preset

_VIT_TINY = evit.create_model("vit_tiny_patch16_224")  # real ViT-Ti sizes, random weights, built once


def vit_tiny(**options):
    """A ViT-Ti with ``options`` (a fresh shallow copy: the same parameters, its own configuration)."""
    return evit.apply_patch(copy.copy(_VIT_TINY), **options)


def test_paper_rule_keeps_the_rate_at_its_blocks():
    model = vit_tiny()
    assert model.stage_rates(0.7) == (0.7, 0.7, 0.7)
    assert model.block_rates(0.7) == (1.0,) * 3 + (0.7, 1.0, 1.0) * 3
    assert model.cost(0.7).tokens == (197,) * 4 + (140,) * 3 + (100,) * 3 + (72,) * 2


def test_weights_split_the_drop_by_hand():
    # stage s keeps 1 - (1 - keep_rate) * w_s: keep 0.5 with weights (0.5, 1, 0) -> 0.75, 0.5, 1.0
    model = evit.create_model("vit_tiny_patch16_224", **TINY, schedule=Schedule(weights=(0.5, 1.0, 0.0)))
    assert model.stage_rates(0.5) == (0.75, 0.5, 1.0)
    # 16 patches: keep ceil(12) = 12 (+1 fused) -> keep ceil(6.5) = 7 (+1) -> unchanged; one class token
    assert model.cost(0.5).tokens == (17, 17, 14, 9)


def test_every_block_spends_the_paper_budget():
    paper, every = vit_tiny(), vit_tiny(schedule="every")
    assert every.evit_cfg.prune_blocks == tuple(range(1, 12)) == preset("every", 12)[0]
    assert default_prune_blocks(12) == preset("paper", 12)[0] == (3, 6, 9)
    spec = CostSpec.from_model(every)
    for rate in (0.95, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3):
        budget = paper.cost(rate).gmacs
        cost = every.cost(rate)
        stage = every.stage_rates(rate)
        assert cost.gmacs <= budget and len(set(stage)) == 1, rate  # one uniform stage rate, within budget
        # and the most it can keep: any higher stage rate costs more than the budget
        higher = [1.0 - (1.0 - r) * (1 - 1e-9) for r in every.block_rates(rate)]
        assert spec_cost(spec, rate, higher, "one").gmacs > budget, rate
    assert every.cost(0.7).tokens == (197, 197, 180, 165, 151, 138, 127, 117, 108, 99, 91, 84)
    assert every.stage_rates(1.0) == (1.0,) * 11 and every.cost(1.0).gmacs == paper.cost(1.0).gmacs


def test_cumulative_ranking_pays_for_its_class_rows_within_the_budget():
    paper, every = vit_tiny(), vit_tiny(schedule="every", ranking="cumulative")
    # the class row at blocks 0 and 1 too (192 * 197 MACs each) leaves less for tokens than without
    assert every.cost(0.7).gmacs <= paper.cost(0.7).gmacs
    assert every.stage_rates(0.7)[0] <= vit_tiny(schedule="every").stage_rates(0.7)[0]


@pytest.mark.parametrize("options", [{}, {"schedule": "every", "fuse_weight": "mean"}, evit.ACCURATE])
def test_schedule_for_gmacs(options):
    model = vit_tiny(**options)
    budget = vit_tiny().cost(0.7).gmacs
    plan = model.schedule_for_gmacs(budget)
    assert plan.cost.gmacs <= budget < model.cost(plan.keep_rate + 1e-4).gmacs
    assert plan.keep_rate >= 0.7 and plan.stage_rates == model.stage_rates(plan.keep_rate)
    assert plan.cost == model.cost(plan.keep_rate)
    assert model.schedule_for_gmacs(10.0).keep_rate == 1.0
    with pytest.raises(ValueError, match="below the cheapest"):
        model.schedule_for_gmacs(0.05)
    with pytest.raises(ValueError, match="positive"):
        model.schedule_for_gmacs(0.0)


@pytest.mark.parametrize("options", [{"schedule": "every"}, evit.ACCURATE])
def test_cost_is_monotone_in_the_keep_rate(options):
    # with fusion "nearest" the similarity costs (n - k) * k * C MACs, not monotone in k by itself; the
    # tokens it removes save far more, so a lower keep rate never costs more
    every = vit_tiny(**options)
    costs = [every.cost(r / 100).gmacs for r in range(1, 101)]
    assert costs == sorted(costs)


def test_fusion_names_are_checked():
    with pytest.raises(ValueError, match="fusion must be one of"):
        spec_cost(CostSpec.from_model(_VIT_TINY), 0.7, (1.0,) * 12, True)


def test_every_from_third_block():
    model = vit_tiny(**evit.ACCURATE)
    assert model.evit_cfg.prune_blocks == tuple(range(2, 12)) == preset("every-from-3", 12)[0]
    assert preset("every-from-3", 2)[0] == (1,)
    assert model.cost(0.7).gmacs <= vit_tiny().cost(0.7).gmacs
    assert model.cost(0.7).tokens[:3] == (197, 197, 197) and len(set(model.stage_rates(0.7))) == 1


def test_deit_small_every_block_within_the_papers_budget():
    paper = evit.create_model("deit_small_patch16_224")
    every = evit.apply_patch(evit.create_model("deit_small_patch16_224"), **evit.ACCURATE)
    assert every.evit_cfg.fusion == "nearest" and every.evit_cfg.schedule.match_gmacs
    for rate in (0.7, 0.5):
        assert 0.99 * paper.cost(rate).gmacs <= every.cost(rate).gmacs <= paper.cost(rate).gmacs
