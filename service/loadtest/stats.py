"""Client-side counts and latency histograms, per keep rate, for one measured phase."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from service.loadtest.histogram import LogHistogram

PERCENTILES = (50, 90, 95, 99)


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

    def to_dict(self, seconds: float, slo: float | None) -> dict:
        summary = self.latency.summary(PERCENTILES)
        out = {
            "sent": self.sent,
            "ok": self.ok,
            "errors": dict(sorted(self.errors.items())),
            "throughput": self.ok / seconds if seconds > 0 else 0.0,
            **summary,
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
    """Collects every answer of a phase; ``slo`` (seconds) counts the answers within it (goodput)."""

    def __init__(self, labels: tuple[str, ...], slo: float | None = None) -> None:
        self.per_rate = {label: RateStats() for label in labels}
        self.send_lag = LogHistogram()  # actual send time - scheduled send time (open loop)
        self.slo = slo

    def on_send(self, label: str) -> None:
        self.per_rate[label].sent += 1

    def on_answer(self, label: str, status: str, latency: float, lag: float, body: object) -> None:
        stats = self.per_rate[label]
        self.send_lag.record(max(lag, 0.0))
        if not status.startswith("2"):
            stats.errors[status] += 1
            return
        stats.ok += 1
        stats.latency.record(max(latency, 0.0))
        if self.slo is not None and latency <= self.slo:
            stats.within_slo += 1
        if isinstance(body, dict):
            tokens, used = body.get("tokens"), body.get("keep_rate")
            if isinstance(tokens, int | float) and not isinstance(tokens, bool):
                stats.tokens += tokens
            if isinstance(used, int | float) and not isinstance(used, bool):
                stats.used_rate_sum += used
                stats.used_rate_count += 1

    @property
    def sent(self) -> int:
        return sum(s.sent for s in self.per_rate.values())

    @property
    def answered(self) -> int:
        return sum(s.ok + sum(s.errors.values()) for s in self.per_rate.values())

    def overall(self) -> RateStats:
        total = RateStats()
        for stats in self.per_rate.values():
            total.merge(stats)
        return total

    def to_dict(self, seconds: float) -> dict:
        overall = self.overall()
        lag = self.send_lag.summary((50, 99))
        return {
            "seconds": seconds,
            "sent": overall.sent,
            "ok": overall.ok,
            "throughput": overall.ok / seconds if seconds > 0 else 0.0,
            "overall": overall.to_dict(seconds, self.slo),
            "per_keep_rate": {k: s.to_dict(seconds, self.slo) for k, s in self.per_rate.items()},
            "client_send_lag": {k: lag[k] for k in ("p50", "p99", "max")},
        }
