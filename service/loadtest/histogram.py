"""A small HDR-style latency histogram with logarithmic buckets.

Bucket ``i`` holds the values in ``(gamma**(i-1), gamma**i]`` with ``gamma = (1+e)/(1-e)``; the value
reported for a bucket is ``2*gamma**i/(gamma+1)``, which is within a relative error ``e`` of every
value the bucket holds. Memory grows with the logarithm of the value range, not with the number of
samples: with ``e = 0.5%`` one microsecond to one hour needs about 2,200 buckets at most, whether a run
records a hundred latencies or a hundred million. ``to_dict`` / ``from_dict`` save the counts as JSON, so
histograms of separate runs (or load generators) can be merged and re-read later.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable
from typing import Any


class LogHistogram:
    """Counts of non-negative values (seconds) in log-spaced buckets with bounded relative error."""

    def __init__(self, rel_error: float = 0.005, lowest: float = 1e-6) -> None:
        if not 0.0 < rel_error < 1.0:
            raise ValueError(f"rel_error must be in (0, 1), got {rel_error}")
        if lowest <= 0.0:
            raise ValueError(f"lowest must be > 0, got {lowest}")
        self.rel_error = rel_error
        self.lowest = lowest
        self._gamma = (1.0 + rel_error) / (1.0 - rel_error)
        self._log_gamma = math.log(self._gamma)
        self._buckets: Counter[int] = Counter()
        self._low = 0  # values <= lowest, reported as themselves via min
        self.count = 0
        self.total = 0.0
        self.min = math.inf
        self.max = -math.inf

    def record(self, value: float, count: int = 1) -> None:
        """Add ``count`` occurrences of ``value``; negative, NaN or infinite values are refused."""
        if not math.isfinite(value) or value < 0.0:
            raise ValueError(f"a latency must be a finite value >= 0, got {value}")
        if count < 1:
            raise ValueError(f"count must be >= 1, got {count}")
        if value <= self.lowest:
            self._low += count
        else:
            self._buckets[math.ceil(math.log(value) / self._log_gamma)] += count
        self.count += count
        self.total += value * count
        self.min = min(self.min, value)
        self.max = max(self.max, value)

    def record_all(self, values: Iterable[float]) -> None:
        for v in values:
            self.record(v)

    def merge(self, other: LogHistogram) -> None:
        """Add another histogram's counts (same bucket layout) into this one."""
        if (other.rel_error, other.lowest) != (self.rel_error, self.lowest):
            raise ValueError("cannot merge histograms with different bucket layouts")
        self._buckets.update(other._buckets)
        self._low += other._low
        self.count += other.count
        self.total += other.total
        self.min = min(self.min, other.min)
        self.max = max(self.max, other.max)

    def to_dict(self) -> dict[str, Any]:
        """The whole histogram as JSON-ready data (bucket index -> count, values in the recorded unit)."""
        return {
            "rel_error": self.rel_error,
            "lowest": self.lowest,
            "count": self.count,
            "total": self.total,
            "min": self.min if self.count else None,
            "max": self.max if self.count else None,
            "at_or_below_lowest": self._low,
            "buckets": {str(i): n for i, n in sorted(self._buckets.items())},
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LogHistogram:
        """The histogram ``to_dict`` saved; ValueError when the counts do not add up."""
        h = cls(float(data["rel_error"]), float(data["lowest"]))
        h._buckets.update({int(i): int(n) for i, n in data["buckets"].items()})
        h._low = int(data["at_or_below_lowest"])
        h.count, h.total = int(data["count"]), float(data["total"])
        if h.count != h._low + sum(h._buckets.values()) or any(n < 0 for n in h._buckets.values()):
            raise ValueError("histogram counts do not add up")
        if h.count:
            h.min, h.max = float(data["min"]), float(data["max"])
        return h

    def _bucket_value(self, index: int) -> float:
        return 2.0 * self._gamma**index / (self._gamma + 1.0)

    def quantile(self, q: float) -> float | None:
        """Nearest-rank quantile (``q`` in [0, 1]) within ``rel_error``; None when empty."""
        if not 0.0 <= q <= 1.0:
            raise ValueError(f"q must be in [0, 1], got {q}")
        if self.count == 0:
            return None
        rank = max(1, math.ceil(q * self.count))
        if rank == self.count:
            return self.max
        seen = self._low
        if rank <= seen:
            return self.min
        for index in sorted(self._buckets):
            seen += self._buckets[index]
            if seen >= rank:
                return min(max(self._bucket_value(index), self.min), self.max)
        return self.max  # unreachable: counts add up to self.count

    def percentile(self, p: float) -> float | None:
        """``quantile(p / 100)``."""
        return self.quantile(p / 100.0)

    @property
    def mean(self) -> float | None:
        return self.total / self.count if self.count else None

    @property
    def num_buckets(self) -> int:
        return len(self._buckets) + (1 if self._low else 0)

    def summary(self, percentiles: Iterable[float] = (50, 90, 95, 99)) -> dict[str, float | None]:
        """``{"p50": ..., ..., "max": ..., "mean": ...}`` in the recorded unit (None when empty)."""
        out: dict[str, float | None] = {f"p{p:g}": self.percentile(p) for p in percentiles}
        out["max"] = self.max if self.count else None
        out["mean"] = self.mean
        return out
