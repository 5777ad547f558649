"""The latency model: how long one forward pass of a hosted model takes on its device, against the GMACs
the pass computes, calibrated at warm-up and kept up to date from every measured pass.

A pass over samples S is predicted to take ``overhead + seconds_per_gmac * sum(gmacs(rate_i))``: the
same line as :class:`service.policy.PassCost`, which the batch-formation policy reads from here. The line
is a weighted least-squares fit over

- the warm-up calibration (a pass of 1 image and one of B images at keep rate 1.0): two prior points
  that fade like measured passes but never below a small weight, so they settle only what live passes
  leave open (the slope, when every live pass has about the same size);
- every measured pass since, weighted ``decay ** age`` (0.95: about the last 20 passes count).

The line changes slowly by design: it needs passes of several sizes to tell overhead from work. A sudden
change of pace (another process takes a core of a shared CPU, a GPU clocks down) scales every pass
alike, and a fast factor on the line follows it: ``bias``, an exponentially weighted mean of measured
over fitted time (weight 0.3, so within three or four passes). Predictions are the line times ``bias``;
as the line catches up, ``bias`` returns to 1.

The model also tracks how far measured passes stray from their predictions: ``error`` is an exponentially
weighted mean of the absolute relative error, each pass's clipped at 100 % so that one stalled pass (a
page fault storm, another process) widens the margin for a while, not for hundreds of passes.
Scheduling decisions multiply predicted spans by ``safety = 1 + z * error`` so that a noisy device
gets a wider margin and a steady one a narrow one.

:class:`OfferedLoad` is the other half of a latency forecast: the requests that arrived lately. A keep
rate that meets one request's deadline on today's queue is not enough when more requests keep coming
faster than the device serves them at that rate: the queue, and every later request's wait, would grow
until requests are refused. So ``keep_rate=auto`` also stays within what the device can sustain at the
recent arrival rate (``service.scheduler``).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from service.policy import PassCost

DECAY = 0.95  # weight of a measured pass after each newer one
PRIOR_WEIGHT = 1.0  # weight of each calibration point at first (a measured pass starts at 1) ...
PRIOR_FLOOR = 0.02  # ... and at last
ERROR_WEIGHT = 0.1  # EWMA weight of the newest relative error
BIAS_WEIGHT = 0.3  # EWMA weight of the newest measured / fitted ratio
INITIAL_ERROR = 0.1  # before any live pass: assume predictions within about 10 %
MAX_ERROR = 1.0  # one pass's relative error counts at most this much
MAX_BIAS = 4.0  # one pass moves the bias as if at most 4x (or 1/4) the fitted time


@dataclass
class _Sums:
    """Weighted sums of (g, t) points for a straight-line least-squares fit ``t = a + b g``."""

    w: float = 0.0
    g: float = 0.0
    t: float = 0.0
    gg: float = 0.0
    gt: float = 0.0

    def add(self, g: float, t: float, weight: float) -> None:
        self.w += weight
        self.g += weight * g
        self.t += weight * t
        self.gg += weight * g * g
        self.gt += weight * g * t

    def scale(self, factor: float) -> None:
        self.w, self.g, self.t, self.gg, self.gt = (v * factor for v in (self.w, self.g, self.t, self.gg, self.gt))

    def __add__(self, other: _Sums) -> _Sums:
        return _Sums(self.w + other.w, self.g + other.g, self.t + other.t, self.gg + other.gg, self.gt + other.gt)


class LatencyModel:
    """Pass time against GMACs for one model on its device (see the module docstring)."""

    def __init__(self, prior: Sequence[tuple[float, float]] = (), *, decay: float = DECAY, z: float = 2.0) -> None:
        self.decay = decay
        self.z = z
        self._prior = _Sums()
        for gmacs, seconds in prior:
            self._prior.add(gmacs, seconds, PRIOR_WEIGHT)
        self._live = _Sums()
        self.passes = 0  # measured passes seen
        self.error = INITIAL_ERROR
        self.bias = 1.0  # recent measured / fitted time
        self._line = self._fit()
        self.cost: PassCost | None = self._line  # the line times bias: what predictions use

    @classmethod
    def from_warmup(cls, cost: PassCost | None, gmacs_per_image: float, batch: int, **kwargs: Any) -> LatencyModel:
        """The model seeded with warm-up's calibration: its passes of 1 and ``batch`` images at keep rate 1.0."""
        if cost is None:
            return cls(**kwargs)
        points = [(g, cost.seconds(g)) for g in (gmacs_per_image, batch * gmacs_per_image)]
        return cls(points, **kwargs)

    @property
    def calibrated(self) -> bool:
        return self.cost is not None

    @property
    def safety(self) -> float:
        """Factor on predicted spans for decisions that must hold (``z`` typical errors of margin)."""
        return 1.0 + self.z * self.error

    def seconds(self, gmacs: float) -> float | None:
        """Predicted time of one pass computing ``gmacs`` in all; None before any calibration or pass."""
        return None if self.cost is None else self.cost.seconds(gmacs)

    def observe(self, gmacs: float, seconds: float) -> None:
        """Learn from a measured pass (``gmacs`` computed in ``seconds``)."""
        if not (math.isfinite(seconds) and seconds > 0 and math.isfinite(gmacs) and gmacs > 0):
            return
        predicted = self.seconds(gmacs)
        if predicted is not None and predicted > 0:
            relative = min(abs(seconds / predicted - 1.0), MAX_ERROR)
            self.error = (1 - ERROR_WEIGHT) * self.error + ERROR_WEIGHT * relative
        self._live.scale(self.decay)
        if self._prior.w > 0:
            self._prior.scale(max(self.decay, 2 * PRIOR_FLOOR / self._prior.w))
        self._live.add(gmacs, seconds, 1.0)
        self.passes += 1
        line, self._line = self._line, self._fit()
        assert self._line is not None
        ratio = min(max(seconds / (line or self._line).seconds(gmacs), 1 / MAX_BIAS), MAX_BIAS)
        self.bias = (1 - BIAS_WEIGHT) * self.bias + BIAS_WEIGHT * ratio
        self.cost = PassCost(self._line.overhead_s * self.bias, self._line.seconds_per_gmac * self.bias)

    def _fit(self) -> PassCost | None:
        s = self._prior + self._live
        if s.w <= 0 or s.g <= 0:
            return None
        det = s.w * s.gg - s.g * s.g
        slope = (s.w * s.gt - s.g * s.t) / det if det > 1e-12 * s.w * s.gg else -1.0
        intercept = (s.t - slope * s.g) / s.w
        if slope <= 0 or intercept < 0:  # one size of pass only, or a line through negative time: no overhead
            slope, intercept = max(s.gt / s.gg, 1e-12), 0.0
        return PassCost(overhead_s=intercept, seconds_per_gmac=slope)

    def info(self) -> dict[str, Any]:
        """For ``/models``: the line predictions use (bias included), its error and how much it has learnt."""
        c = self.cost
        return {
            "calibrated": c is not None,
            "overhead_ms": None if c is None else round(c.overhead_s * 1e3, 4),
            "ms_per_gmac": None if c is None else round(c.seconds_per_gmac * 1e3, 4),
            "bias": round(self.bias, 4),
            "relative_error": round(self.error, 4),
            "safety": round(self.safety, 4),
            "passes_observed": self.passes,
        }


class OfferedLoad:
    """The requests that arrived in the last ``window`` seconds: when, their priority class, whether they
    asked for ``keep_rate=auto``, and the GMACs per image they run (or would have run) at. Counts and GMACs
    per (class, auto) are kept as running sums, so asking costs O(classes), not a walk of the window."""

    def __init__(self, window: float = 2.0) -> None:
        self.window = window
        self._events: deque[tuple[float, int, bool, float]] = deque()
        self._count: dict[tuple[int, bool], int] = {}
        self._gmacs: dict[tuple[int, bool], float] = {}

    def add(self, now: float, priority: int, auto: bool, gmacs: float) -> None:
        self._events.append((now, priority, auto, gmacs))
        key = (priority, auto)
        self._count[key] = self._count.get(key, 0) + 1
        self._gmacs[key] = self._gmacs.get(key, 0.0) + gmacs
        self._trim(now)

    def _trim(self, now: float) -> None:
        while self._events and self._events[0][0] < now - self.window:
            _, priority, auto, gmacs = self._events.popleft()
            self._count[priority, auto] -= 1
            self._gmacs[priority, auto] -= gmacs
        if not self._events:  # no drift from the running float sums
            self._count.clear()
            self._gmacs.clear()

    def demand(self, now: float, priority: int) -> tuple[int, float, int]:
        """What requests of ``priority`` must share the device with: arrivals of higher classes and the
        fixed-rate ones of the same class (count, GMACs summed), and the same class's auto requests (count).
        Lower classes are left out: they run after, or are shed."""
        self._trim(now)
        others, others_gmacs = 0, 0.0
        for (p, auto), count in self._count.items():
            if p < priority or (p == priority and not auto):
                others += count
                others_gmacs += self._gmacs[p, auto]
        return others, max(others_gmacs, 0.0), self._count.get((priority, True), 0)

    def rate(self, now: float) -> float:
        """Arrivals per second over the window."""
        self._trim(now)
        return len(self._events) / self.window
