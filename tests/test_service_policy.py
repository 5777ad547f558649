"""Batch-formation policy: the cost model's split against brute force and the two naive policies."""

from __future__ import annotations

import itertools

from hypothesis import given, settings
from hypothesis import strategies as st

from service.policy import PassCost, plan_passes


def gmacs(rate: float) -> float:
    return 0.1 + 4.5 * rate  # per image, grows with the keep rate like a ViT's cost


def completion_sum(rates: list[float], passes: list[list[int]], cost: PassCost) -> float:
    t, total = 0.0, 0.0
    for p in passes:
        t += cost.seconds(sum(gmacs(rates[i]) for i in p))
        total += t * len(p)
    return total


def brute_force(rates: list[float], cost: PassCost) -> float:
    distinct = sorted(set(rates))
    best = float("inf")
    for cuts in itertools.product([False, True], repeat=len(distinct) - 1):
        runs, current = [], [distinct[0]]
        for r, cut in zip(distinct[1:], cuts, strict=True):
            if cut:
                runs.append(current)
                current = []
            current.append(r)
        runs.append(current)
        passes = [[i for i, r in enumerate(rates) if r in run] for run in runs]
        best = min(best, completion_sum(rates, passes, cost))
    return best


def test_overhead_dominated_sends_one_mixed_pass() -> None:  # a GPU: launches dominate small batches
    rates = [0.5] * 4 + [1.0] * 4
    assert plan_passes(rates, gmacs, PassCost(overhead_s=0.01, seconds_per_gmac=1e-5)) == [list(range(8))]


def test_work_dominated_splits_far_apart_rates() -> None:  # a CPU: per-image work dominates
    rates = [1.0, 0.5, 1.0, 0.5, 0.5, 0.52]
    passes = plan_passes(rates, gmacs, PassCost(overhead_s=0.05, seconds_per_gmac=0.01))
    assert passes == [[1, 3, 4, 5], [0, 2]]  # cheap pass first; 0.5 and 0.52 share a pass


def test_naive_policies_and_uncalibrated() -> None:
    rates = [0.7, 0.5, 0.7]
    cost = PassCost(0.001, 0.01)
    assert plan_passes(rates, gmacs, cost, "mixed") == [[0, 1, 2]]
    assert plan_passes(rates, gmacs, cost, "grouped") == [[1], [0, 2]]
    assert plan_passes(rates, gmacs, None, "auto") == [[0, 1, 2]]  # before warm-up: one pass
    assert plan_passes([0.6] * 3, gmacs, cost, "grouped") == [[0, 1, 2]]


@settings(max_examples=60, deadline=None)
@given(
    rates=st.lists(st.sampled_from([0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]), min_size=1, max_size=12),
    overhead=st.floats(1e-5, 0.05),
    per_gmac=st.floats(1e-5, 0.02),
)
def test_auto_is_optimal_and_never_worse_than_naive(rates, overhead, per_gmac) -> None:
    cost = PassCost(overhead, per_gmac)
    passes = plan_passes(rates, gmacs, cost, "auto")
    assert sorted(i for p in passes for i in p) == list(range(len(rates)))  # every request exactly once
    auto = completion_sum(rates, passes, cost)
    assert auto <= brute_force(rates, cost) * (1 + 1e-9)
    for naive in ("mixed", "grouped"):
        assert auto <= completion_sum(rates, plan_passes(rates, gmacs, cost, naive), cost) * (1 + 1e-9)


def test_calibration_recovers_a_linear_cost() -> None:
    true = PassCost(overhead_s=0.004, seconds_per_gmac=0.002)
    g = gmacs(1.0)
    fitted = PassCost.calibrate(true.seconds(g), true.seconds(8 * g), 8, g)
    assert abs(fitted.overhead_s - 0.004) < 1e-9 and abs(fitted.seconds_per_gmac - 0.002) < 1e-12
