"""Read the service's Prometheus `/metrics` and turn two scrapes into server-side figures."""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Mapping

from service.loadtest.workload import bucket_rate

REQUESTS = "evit_requests_total"  # {model, keep_rate, code}
TOKENS = "evit_tokens_processed_total"  # {model, keep_rate}
BATCH_SIZE = "evit_batch_size"  # histogram {model}
QUEUE_WAIT = "evit_queue_wait_seconds"  # histogram {model}

SampleKey = tuple[str, tuple[tuple[str, str], ...]]
Snapshot = dict[SampleKey, float]


def parse_metrics(text: str) -> Snapshot:
    """Every sample of a Prometheus text exposition, keyed by (sample name, sorted labels)."""
    from prometheus_client.parser import text_string_to_metric_families

    out: Snapshot = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = float(s.value)
    return out


def diff(before: Snapshot, after: Snapshot) -> Snapshot:
    """``after - before`` for every sample in ``after`` (a sample new in ``after`` counts from 0)."""
    return {key: value - before.get(key, 0.0) for key, value in after.items()}


def _select(delta: Snapshot, name: str, model: str | None) -> list[tuple[dict[str, str], float]]:
    rows = []
    for (sample, labels), value in delta.items():
        lab = dict(labels)
        if sample == name and (model is None or lab.get("model") == model):
            rows.append((lab, value))
    return rows


def bucket_quantile(buckets: Mapping[float, float], q: float) -> float | None:
    """Quantile from cumulative ``{le: count}`` buckets, interpolated as PromQL's histogram_quantile."""
    edges = sorted(buckets.items())
    if not edges or edges[-1][1] <= 0:
        return None
    rank = q * edges[-1][1]
    prev_le, prev_count = 0.0, 0.0
    for le, count in edges:
        if count >= rank:
            if math.isinf(le):
                return prev_le  # above the highest finite bucket: its bound is all we know
            width = count - prev_count
            return prev_le + (le - prev_le) * ((rank - prev_count) / width if width > 0 else 1.0)
        prev_le, prev_count = le, count
    return None


def _histogram(delta: Snapshot, name: str, model: str | None) -> dict[str, dict[str, float | None]]:
    """Per model: observation count, mean and p50/p99 (bucket-interpolated) of a histogram delta."""
    per_model: dict[str, dict] = defaultdict(lambda: {"sum": 0.0, "count": 0.0, "buckets": Counter()})
    for suffix in ("_sum", "_count", "_bucket"):
        for lab, value in _select(delta, name + suffix, model):
            entry = per_model[lab.get("model", "")]
            if suffix == "_bucket":
                entry["buckets"][float(lab["le"])] += value
            else:
                entry[suffix[1:]] += value
    return {
        m: {
            "count": e["count"],
            "mean": e["sum"] / e["count"] if e["count"] else None,
            "p50": bucket_quantile(e["buckets"], 0.5),
            "p99": bucket_quantile(e["buckets"], 0.99),
        }
        for m, e in per_model.items()
    }


def summarize(delta: Snapshot, seconds: float, model: str | None = None) -> dict:
    """Server-side figures between two scrapes ``seconds`` apart, restricted to ``model`` if given."""
    per_rate: dict[str, dict] = defaultdict(lambda: {"requests": Counter(), "tokens": 0.0})
    for lab, value in _select(delta, REQUESTS, model):
        if value:
            per_rate[lab.get("keep_rate", "")]["requests"][lab.get("code", "")] += round(value)
    for lab, value in _select(delta, TOKENS, model):
        if value:
            per_rate[lab.get("keep_rate", "")]["tokens"] += value
    report_rates = {}
    for label, entry in sorted(per_rate.items()):
        ok = sum(n for code, n in entry["requests"].items() if code.startswith("2"))
        report_rates[label] = {
            "requests": dict(sorted(entry["requests"].items())),
            "tokens": entry["tokens"],
            "tokens_per_second": entry["tokens"] / seconds if seconds > 0 else None,
            "tokens_per_request": entry["tokens"] / ok if ok else None,
        }
    batch = _histogram(delta, BATCH_SIZE, model)
    wait = _histogram(delta, QUEUE_WAIT, model)
    per_model = {
        m: {
            "batches": batch.get(m, {}).get("count", 0.0),
            "mean_batch_size": batch.get(m, {}).get("mean"),
            "queue_wait_mean": wait.get(m, {}).get("mean"),
            "queue_wait_p50": wait.get(m, {}).get("p50"),
            "queue_wait_p99": wait.get(m, {}).get("p99"),
        }
        for m in sorted(set(batch) | set(wait))
    }
    total_tokens = sum(e["tokens"] for e in report_rates.values())
    return {
        "seconds": seconds,
        "tokens_per_second": total_tokens / seconds if seconds > 0 else None,
        "per_keep_rate": report_rates,
        "per_model": per_model,
        "counter_reset": any(v < 0 for (name, _), v in delta.items() if name in (REQUESTS, TOKENS)),
    }


def cross_check(
    client_codes: Mapping[str, Mapping[str, int]],
    client_tokens: Mapping[str, float],
    server: dict,
) -> dict:
    """Compare the client's counts (per keep-rate label, per status code) with the server's.

    A client label maps to the server's label with the same value once bucketed to 0.05 (``"0.7"`` and
    ``"0.72"`` to ``"0.70"`` or ``"0.7"``, however the server formats it). Words such as ``auto`` cannot
    be mapped (the server labels the rate it chose), so then only the totals per status code are compared.
    Client-side failures (timeouts, refused connections) have no status code and are left out.
    """
    server_rates = server["per_keep_rate"]
    mapped: dict[str, Counter] = defaultdict(Counter)
    tokens: dict[str, float] = defaultdict(float)
    unmapped = []
    by_value = {v: s for s in server_rates if (v := bucket_rate(s)) is not None}
    for label, codes in client_codes.items():
        value = bucket_rate(label)
        if value is None:
            unmapped.append(label)
            target = label
        else:
            target = by_value.get(value, repr(value))
        mapped[target].update({c: n for c, n in codes.items() if c.isdigit() and n})
        tokens[target] += client_tokens.get(label, 0.0)
    client_total = sum((c for c in mapped.values()), Counter())
    server_total = sum((Counter(e["requests"]) for e in server_rates.values()), Counter())
    result: dict = {
        "client_total": dict(sorted(client_total.items())),
        "server_total": dict(sorted(server_total.items())),
        "totals_match": client_total == server_total,
        "unmapped_labels": unmapped,
    }
    if not unmapped:
        rows = {}
        for label in sorted(set(mapped) | set(server_rates)):
            srv = server_rates.get(label, {"requests": {}, "tokens": 0.0})
            row = {
                "client": dict(sorted(mapped.get(label, Counter()).items())),
                "server": srv["requests"],
            }
            row["match"] = row["client"] == row["server"]
            if tokens.get(label):
                row["client_tokens"] = tokens[label]
                row["server_tokens"] = srv["tokens"]
                row["tokens_match"] = math.isclose(tokens[label], srv["tokens"], rel_tol=1e-9)
            rows[label] = row
        result["per_keep_rate"] = rows
    checks = [result["totals_match"]]
    checks += [r["match"] and r.get("tokens_match", True) for r in result.get("per_keep_rate", {}).values()]
    result["match"] = all(checks)
    return result
