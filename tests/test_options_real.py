"""The measured off-the-shelf figures of docs/accuracy.md, on the real ViT-Ti weights and 500 images."""

import pytest
from test_real_weights import pytestmark, top1  # noqa: F401  (skip without assets)

import evit


@pytest.mark.parametrize(("budget_rate", "expected"), [(0.7, 81.2), (0.5, 81.4)])
def test_accurate_options_at_the_paper_rules_gmacs(real_data, budget_rate, expected):
    model, x, y = real_data
    budget = model.cost(budget_rate).gmacs  # the paper rule (the model's default options)
    evit.apply_patch(model, **evit.ACCURATE)
    try:
        plan = model.schedule_for_gmacs(budget)
        assert plan.keep_rate >= budget_rate and plan.cost.gmacs <= budget
        assert top1(model, x, y, keep_rate=plan.keep_rate) == expected
    finally:
        evit.apply_patch(model)
