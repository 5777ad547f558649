"""The measured off-the-shelf figures of docs/accuracy.md, on the real ViT-Ti weights and 500 images."""

import pytest
from test_real_weights import TOLERANCE, pytestmark, top1  # noqa: F401  (skip without assets)

import evit


@pytest.mark.parametrize(("budget_rate", "expected"), [(0.7, 81.2), (0.5, 81.4)])
def test_accurate_options_at_the_paper_rules_gmacs(real_data, budget_rate, expected):
    model, x, y = real_data
    budget = model.cost(budget_rate).gmacs  # the paper rule (the model's default options)
    paper = top1(model, x, y, keep_rate=budget_rate)
    evit.apply_patch(model, **evit.ACCURATE)
    try:
        plan = model.schedule_for_gmacs(budget)
        assert plan.keep_rate >= budget_rate and plan.cost.gmacs <= budget
        accurate = top1(model, x, y, keep_rate=plan.keep_rate)
        assert accurate >= paper  # the claim: at the paper rule's GMACs, the accurate options lose less
        assert accurate == pytest.approx(expected, abs=TOLERANCE)  # docs/accuracy.md's figure
    finally:
        evit.apply_patch(model)
