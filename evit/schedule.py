"""Schedules: at which blocks tokens are pruned and how one requested keep rate is spent over them.

A request gives one keep rate; the schedule turns it into a keep rate per block. Stage ``s`` keeps
``1 - d * w_s`` of its tokens (``w``: the schedule's weights, equal by default):

- the paper's rule (``match_gmacs=False``): ``d = 1 - keep_rate``, so every pruning block keeps
  ``keep_rate``;
- ``match_gmacs=True``: ``keep_rate`` names a cost, the GMACs of the paper's rule at that rate (the
  defaults: blocks at 1/4, 2/4, 3/4 of the depth, fusion), and ``d`` is the smallest that spends no more,
  so the schedule's blocks share the same budget whatever the other options. A service keeps its
  keep-rate semantics (cost levels) and gets the schedule's accuracy.

Presets are data (``PRESETS``); ``plan_for_gmacs`` finds the keep rate to request for a GMAC budget.
Everything is a pure function of the model's ``CostSpec``, cached.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache

from evit.config import Schedule
from evit.cost import Cost, CostSpec, spec_cost

MIN_RATE = 1e-6  # a stage's rate never reaches 0 (keep_count keeps at least one token anyway)
RATE_GRID = 10_000  # plan_for_gmacs answers keep rates on a 1e-4 grid


@dataclass(frozen=True)
class Plan:
    """What to request for a GMAC budget: the keep rate, what each pruning block then keeps, the cost."""

    keep_rate: float
    stage_rates: tuple[float, ...]  # per pruning block
    cost: Cost


def default_prune_blocks(depth: int) -> tuple[int, ...]:
    """The paper's schedule (blocks 4, 7, 10 of 12, 1-based) scaled to ``depth``: at 1/4, 2/4, 3/4."""
    return tuple(sorted({min(depth - 1, max(1, round(depth * s / 4))) for s in (1, 2, 3)}))


# name -> (depth -> (0-based pruning blocks, schedule)). Measured on real ViT-Ti weights: docs/accuracy.md.
PRESETS: dict[str, Callable[[int], tuple[tuple[int, ...], Schedule]]] = {
    "paper": lambda depth: (default_prune_blocks(depth), Schedule()),
    # prune a little after every block's attention but the first, the paper's budget at each keep rate
    "every": lambda depth: (tuple(range(1, depth)), Schedule(match_gmacs=True)),
    # the same from the third block: with fusion "nearest" the closest to the full model's outputs
    "every-from-3": lambda depth: (tuple(range(min(2, depth - 1), depth)), Schedule(match_gmacs=True)),
}


# The most accurate off-the-shelf options measured (docs/accuracy.md): create_model(..., **evit.ACCURATE).
# Tokens a block does not keep are merged into their most similar kept token, with proportional attention,
# a little at every block from the third: on real ViT-Ti weights the closest to the full model's outputs at
# every budget measured (KL 3x lower than dropping at keep 0.7's GMACs).
ACCURATE: dict[str, str | bool] = {"schedule": "every-from-3", "fuse_into": "nearest", "size_attn": True}


def preset(name: str, depth: int) -> tuple[tuple[int, ...], Schedule]:
    """The pruning blocks and schedule of a named preset for a model ``depth`` blocks deep."""
    if name not in PRESETS:
        raise ValueError(f"unknown schedule {name!r}; known: {sorted(PRESETS)}")
    return PRESETS[name](depth)


def _rates(depth: int, prune_blocks: tuple[int, ...], weights: tuple[float, ...], d: float) -> tuple[float, ...]:
    rates = [1.0] * depth
    for b, w in zip(prune_blocks, weights, strict=True):
        rates[b] = min(1.0, max(MIN_RATE, 1.0 - d * w))
    return tuple(rates)


@lru_cache(maxsize=8192)
def block_rates(
    spec: CostSpec,
    prune_blocks: tuple[int, ...],
    schedule: Schedule,
    fusion: str,
    cumulative: bool,
    keep_rate: float,
) -> tuple[float, ...]:
    """The keep rate of every block (1.0 where it does not prune) for a requested ``keep_rate``."""
    depth = len(spec.blocks)
    weights = schedule.weights or (1.0,) * len(prune_blocks)
    if not schedule.match_gmacs:
        return _rates(depth, prune_blocks, weights, 1.0 - keep_rate)
    paper = _rates(depth, default_prune_blocks(depth), (1.0,) * 3, 1.0 - keep_rate)
    budget = spec_cost(spec, keep_rate, paper, "one").gmacs

    def fits(d: float) -> bool:
        return spec_cost(spec, keep_rate, _rates(depth, prune_blocks, weights, d), fusion, cumulative).gmacs <= budget

    positive = [w for w in weights if w > 0]
    lo, hi = 0.0, (1.0 / min(positive) if positive else 0.0)  # at hi every weighted stage keeps MIN_RATE
    if fits(lo) or not fits(hi):  # nothing to prune, or the schedule cannot get as cheap: do its cheapest
        return _rates(depth, prune_blocks, weights, lo if fits(lo) else hi)
    for _ in range(60):  # the cost is a non-increasing step function of d: smallest d that fits
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if fits(mid) else (mid, hi)
    return _rates(depth, prune_blocks, weights, hi)


def plan_for_gmacs(gmacs: float, cost_at: Callable[[float], Cost], stage_rates: Callable[[float], tuple]) -> Plan:
    """The largest keep rate (on a 1e-4 grid) whose cost is at most ``gmacs`` per image.

    ``cost_at`` is non-decreasing in the keep rate for every schedule here, so a bisection finds it.
    """
    if not gmacs > 0:
        raise ValueError(f"GMAC budget must be a positive number, got {gmacs}")
    lo, hi = 1, RATE_GRID
    if cost_at(1.0).gmacs <= gmacs:
        lo = hi
    elif cost_at(lo / RATE_GRID).gmacs > gmacs:
        cheapest = cost_at(lo / RATE_GRID).gmacs
        raise ValueError(f"GMAC budget {gmacs:.4g} is below the cheapest this model's schedule runs ({cheapest:.4g})")
    while lo < hi:  # invariant: cost(lo) fits
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if cost_at(mid / RATE_GRID).gmacs <= gmacs else (lo, mid - 1)
    rate = lo / RATE_GRID
    return Plan(keep_rate=rate, stage_rates=stage_rates(rate), cost=cost_at(rate))
