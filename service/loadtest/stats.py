"""Client-side counts and latency histograms, per keep rate and per second, for one measured phase.

Latencies are recorded in seconds (the histograms' unit) and reported in milliseconds (``p50_ms``, ...).
``RateStats.to_state`` / ``from_state`` keep everything a report needs, so saved runs merge exactly.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

from service.loadtest.histogram import LogHistogram

PERCENTILES = (50, 90, 95, 99, 99.9)


def _ms_key(name: str) -> str:
    """The report's name for a ``LogHistogram.summary`` key: ``"p99.9" -> "p99_9_ms"``, ``"max" -> "max_ms"``."""
    return f"{name}_ms".replace(".", "_")


LATENCY_KEYS = (*(_ms_key(f"p{p:g}") for p in PERCENTILES), "max_ms")


def summary_ms(h: LogHistogram, percentiles: tuple[float, ...] = PERCENTILES) -> dict[str, float | None]:
    """``LogHistogram.summary`` of latencies in seconds, reported in milliseconds:
    ``{"p50_ms": ..., "p99_9_ms": ..., "max_ms": ..., "mean_ms": ...}`` (None when empty)."""
    return {_ms_key(k): _ms(v) for k, v in h.summary(percentiles).items()}


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1e3


_SCALARS = ("sent", "ok", "within_slo", "tokens", "used_rate_sum", "used_rate_count")


@dataclass
class RateStats:
    """What one keep rate got: latencies (seconds) are those of successful (2xx) answers."""

    sent: int = 0
    ok: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    latency: LogHistogram = field(default_factory=LogHistogram)
    within_slo: int = 0
    tokens: float = 0.0  # summed from the answers' "tokens" field, when they have one
    used_rate_sum: float = 0.0  # summed from the answers' "keep_rate" field, when they have one
    used_rate_count: int = 0

    def merge(self, other: RateStats) -> None:
        self.sent += other.sent
        self.ok += other.ok
        self.errors.update(other.errors)
        self.latency.merge(other.latency)
        self.within_slo += other.within_slo
        self.tokens += other.tokens
        self.used_rate_sum += other.used_rate_sum
        self.used_rate_count += other.used_rate_count

    def codes(self) -> dict[str, int]:
        """Every answer by status (``"200"``, ``"503"``, ``"timeout"``, ...)."""
        out = Counter(self.errors)
        if self.ok:
            out["200"] += self.ok
        return dict(out)

    def to_state(self) -> dict[str, Any]:
        """Everything, histogram included, as JSON-ready data (``from_state`` reads it back)."""
        state = {k: getattr(self, k) for k in _SCALARS}
        return {**state, "errors": dict(sorted(self.errors.items())), "latency_seconds": self.latency.to_dict()}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> RateStats:
        scalars = {k: state[k] for k in _SCALARS}
        return cls(errors=Counter(state["errors"]), latency=LogHistogram.from_dict(state["latency_seconds"]), **scalars)

    def to_dict(self, seconds: float, slo: float | None) -> dict:
        out = {
            "sent": self.sent,
            "ok": self.ok,
            "errors": dict(sorted(self.errors.items())),
            "throughput": self.ok / seconds if seconds > 0 else 0.0,
            **summary_ms(self.latency),
        }
        if slo is not None:
            out["within_slo"] = self.within_slo
            out["goodput"] = self.within_slo / seconds if seconds > 0 else 0.0
        if self.used_rate_count:
            out["mean_keep_rate_used"] = self.used_rate_sum / self.used_rate_count
        if self.tokens:
            out["tokens_per_request"] = self.tokens / max(self.ok, 1)
        return out


class Recorder:
    """Collects every answer of a phase; ``slo`` (seconds) counts the answers within it (goodput).

    Answers are also counted per second of the phase (by when they came back, from ``start``): the time series.
    """

    def __init__(self, labels: tuple[str, ...], slo: float | None = None, start: float = 0.0) -> None:
        self.per_rate = {label: RateStats() for label in labels}
        self.send_lag = LogHistogram()  # actual send time - scheduled send time (open loop)
        self.per_second: defaultdict[int, RateStats] = defaultdict(RateStats)
        self.slo = slo
        self.start = start

    def on_send(self, label: str) -> None:
        self.per_rate[label].sent += 1

    def on_answer(self, label: str, status: str, latency: float, lag: float, body: object, at: float = 0.0) -> None:
        """An answer (``status``: "200", "503", "timeout", ...) that came back at ``at`` (perf_counter)."""
        second = self.per_second[max(int(at - self.start), 0)]  # one RateStats per second, made once
        second.sent += 1  # per second: answers that came back in it
        for stats in (self.per_rate[label], second):
            self._count(stats, status, latency)
        self.send_lag.record(max(lag, 0.0))
        if status.startswith("2") and isinstance(body, dict):
            stats = self.per_rate[label]
            tokens, used = body.get("tokens"), body.get("keep_rate")
            if isinstance(tokens, int | float) and not isinstance(tokens, bool):
                stats.tokens += tokens
            if isinstance(used, int | float) and not isinstance(used, bool):
                stats.used_rate_sum += used
                stats.used_rate_count += 1

    def _count(self, stats: RateStats, status: str, latency: float) -> None:
        if not status.startswith("2"):
            stats.errors[status] += 1
            return
        stats.ok += 1
        stats.latency.record(max(latency, 0.0))
        if self.slo is not None and latency <= self.slo:
            stats.within_slo += 1

    @property
    def sent(self) -> int:
        return sum(s.sent for s in self.per_rate.values())

    @property
    def answered(self) -> int:
        return sum(s.ok + sum(s.errors.values()) for s in self.per_rate.values())

    def overall(self) -> RateStats:
        return merged(self.per_rate.values())

    def to_state(self) -> dict[str, Any]:
        """The phase's counts and histograms (per keep rate, send lag, per second), for histograms.json."""
        return {
            "per_keep_rate": {k: s.to_state() for k, s in self.per_rate.items()},
            "send_lag_seconds": self.send_lag.to_dict(),
            "per_second": {str(t): s.to_state() for t, s in sorted(self.per_second.items())},
        }

    def to_dict(self, seconds: float) -> dict:
        return summarize(self.per_rate, self.send_lag, self.per_second, seconds, self.slo)


def merged(stats: Any) -> RateStats:
    total = RateStats()
    for s in stats:
        total.merge(s)
    return total


def summarize(
    per_rate: dict[str, RateStats], send_lag: LogHistogram, per_second: dict[int, RateStats], seconds: float,
    slo: float | None,
) -> dict:
    """A step's report: totals, per keep rate, client send lag and the per-second time series (ms)."""
    overall = merged(per_rate.values())
    lag = summary_ms(send_lag, (50, 99))
    return {
        "seconds": seconds,
        "sent": overall.sent,
        "ok": overall.ok,
        "throughput": overall.ok / seconds if seconds > 0 else 0.0,
        "overall": overall.to_dict(seconds, slo),
        "per_keep_rate": {k: s.to_dict(seconds, slo) for k, s in per_rate.items()},
        "client_send_lag": {k: lag[k] for k in ("p50_ms", "p99_ms", "max_ms")},
        "time_series": [
            {"second": t, "answers": s.sent, "ok": s.ok, "errors": dict(sorted(s.errors.items())),
             **{k: v for k, v in summary_ms(s.latency, (50, 99)).items() if k != "mean_ms"}}
            for t, s in sorted(per_second.items())
        ],
    }
