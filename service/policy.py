"""Batch-formation policy: how the requests of one batch, each with its own keep rate, become forward passes.

The evit library packs samples with different keep rates into one forward pass *without padding*, so one
mixed pass computes exactly the sum of the samples' own GMACs: mixing never wastes arithmetic. What a
mixed pass costs is latency: every request in it waits for the whole pass, so a cheap request (keep rate
0.5, chosen to be fast) waits for the expensive ones (keep rate 1.0) batched with it. Splitting the batch
by keep rate and running the cheap pass first answers cheap requests earlier, but pays the fixed
per-pass overhead (Python, kernel launches, synchronisation) once more per extra pass, which every
request still waiting pays too, and smaller passes use the hardware less well.

The cost model makes the trade-off explicit. A pass over samples S takes

    t(S) = overhead + seconds_per_gmac * sum(model.cost(r_i).gmacs for i in S)

with both constants measured at warm-up (a pass of 1 and a pass of B images at keep rate 1.0).
``auto`` chooses the split that minimises the *sum of completion times* of the batch's requests (their
mean latency; throughput enters through the overhead every extra pass adds to all requests after it).
Passes run cheapest first and, as cost grows with the keep rate, the best split is into contiguous runs
of the sorted distinct keep rates; a dynamic programme over those runs finds it exactly in O(G^2) for
G distinct rates.

What it decides in practice: on a GPU the overhead of a ViT pass dwarfs the per-image work of a small
batch, so ``auto`` sends one mixed pass; on a CPU per-image work dominates, so rates far apart are split
(0.5 vs 1.0) while close ones (0.7 vs 0.75) share a pass. ``mixed`` (always one pass) and ``grouped``
(one pass per distinct keep rate) are the two naive policies, kept for comparison (``python -m benchmarks.service``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class PassCost:
    overhead_s: float  # fixed time per forward pass
    seconds_per_gmac: float  # marginal time per GMAC of work in a pass

    @classmethod
    def calibrate(cls, t_single: float, t_batch: float, batch: int, gmacs_per_image: float) -> PassCost:
        """Fit the two constants from a pass of 1 image (``t_single``) and one of ``batch`` images."""
        per_image = max((t_batch - t_single) / max(batch - 1, 1), 1e-9)
        per_gmac = per_image / max(gmacs_per_image, 1e-12)
        return cls(overhead_s=max(t_single - per_image, 0.0), seconds_per_gmac=per_gmac)

    def seconds(self, gmacs: float) -> float:
        return self.overhead_s + self.seconds_per_gmac * gmacs


def plan_passes(
    rates: Sequence[float], gmacs: Callable[[float], float], cost: PassCost | None, policy: str = "auto"
) -> list[list[int]]:
    """Indices of ``rates`` grouped into forward passes, in the order to run them.

    ``gmacs(rate)`` is the model's per-image cost; ``cost`` the calibrated pass cost (``None`` before
    warm-up: one mixed pass).
    """
    by_rate: dict[float, list[int]] = {}
    for i, r in enumerate(rates):
        by_rate.setdefault(r, []).append(i)
    distinct = sorted(by_rate)
    if policy == "mixed" or len(distinct) == 1 or (policy == "auto" and cost is None):
        return [list(range(len(rates)))]
    if policy == "grouped":
        return [by_rate[r] for r in distinct]
    if policy != "auto":
        raise ValueError(f"unknown batch policy {policy!r}")
    assert cost is not None
    runs = _best_runs([len(by_rate[r]) for r in distinct], [gmacs(r) for r in distinct], cost)
    return [[i for r in distinct[a:b] for i in by_rate[r]] for a, b in runs]


def _best_runs(counts: list[int], gmacs: list[float], cost: PassCost) -> list[tuple[int, int]]:
    """Split rate groups ``0..G-1`` (ascending cost) into contiguous runs minimising total completion time.

    ``best[i]``: least total completion time of the requests in groups ``i..G-1`` counted from when the
    pass starting at group ``i`` starts; all of them wait for that pass.
    """
    G = len(counts)
    work = [c * g for c, g in zip(counts, gmacs, strict=True)]
    waiting = [sum(counts[i:]) for i in range(G)]
    best = [0.0] * (G + 1)
    cut = [G] * G
    for i in range(G - 1, -1, -1):
        best[i] = float("inf")
        pass_gmacs = 0.0
        for j in range(i, G):
            pass_gmacs += work[j]
            total = cost.seconds(pass_gmacs) * waiting[i] + best[j + 1]
            if total < best[i]:
                best[i], cut[i] = total, j + 1
    runs, i = [], 0
    while i < G:
        runs.append((i, cut[i]))
        i = cut[i]
    return runs
