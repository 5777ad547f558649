"""evit-loadtest's outputs: results.json, results.csv, timeseries.csv, histograms.json, latency.png and the table.

Latencies are in milliseconds everywhere a person reads them, with the unit in the name (``p50_ms``), as
Locust and k6 report them; histograms.json keeps the raw histograms (seconds) so runs can be merged.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable, Iterator
from pathlib import Path

from service.loadtest.stats import LATENCY_KEYS

HISTOGRAMS_FORMAT = "evit-loadtest-histograms/1"
CSV_FIELDS = (
    "step",
    "mode",
    "target_rate",
    "concurrency",
    "keep_rate",
    "sent",
    "ok",
    "errors",
    "throughput_rps",
    *LATENCY_KEYS,
    "mean_ms",
    "server_tokens_per_second",
)
SERIES_FIELDS = ("step", "second", "answers", "ok", "errors", "p50_ms", "p99_ms", "max_ms")


def write_json(results: dict, out: Path) -> Path:
    path = out / "results.json"
    path.write_text(json.dumps(results, indent=2, allow_nan=False) + "\n")
    return path


def _errors_text(errors: dict[str, int]) -> str:
    return ";".join(f"{code}:{n}" for code, n in sorted(errors.items()))


def _write_rows(path: Path, fields: tuple[str, ...], rows: Iterable[dict]) -> Path:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    return path


def write_csv(results: dict, out: Path) -> Path:
    """One row per step and keep rate, plus an ``all`` row per step."""
    return _write_rows(out / "results.csv", CSV_FIELDS, _csv_rows(results))


def _csv_rows(results: dict) -> Iterator[dict]:
    for i, step in enumerate(results["steps"]):
        server_rates = (step.get("server") or {}).get("per_keep_rate", {})
        for label, stats in [*step["per_keep_rate"].items(), ("all", step["overall"])]:
            server_tps = (server_rates.get(label) or {}).get("tokens_per_second")
            if label == "all" and step.get("server"):
                server_tps = step["server"]["tokens_per_second"]
            yield {
                "step": i,
                "mode": step["mode"],
                "target_rate": step["target_rate"],
                "concurrency": step["concurrency"],
                "keep_rate": label,
                "sent": stats["sent"],
                "ok": stats["ok"],
                "errors": _errors_text(stats["errors"]),
                "throughput_rps": stats["throughput"],
                **{k: stats[k] for k in (*LATENCY_KEYS, "mean_ms")},
                "server_tokens_per_second": server_tps,
            }


def write_series(results: dict, out: Path) -> Path:
    """The per-second time series of every step: answers that came back in each second, their latencies."""
    rows = ({"step": i, **row, "errors": _errors_text(row["errors"])}
            for i, step in enumerate(results["steps"]) for row in step["time_series"])
    return _write_rows(out / "timeseries.csv", SERIES_FIELDS, rows)


def split_state(steps: list[dict], slo: float | None) -> list[dict]:
    """Take each step's raw ``state`` out of the report and return the steps as histograms.json keeps them."""
    keys = ("mode", "target_rate", "concurrency", "arrivals", "seconds")
    return [{**{k: step[k] for k in keys}, "slo": slo, "state": step.pop("state")} for step in steps]


def write_histograms(config: dict, states: list[dict], out: Path) -> Path:
    """Every step's raw counts and histograms (seconds): what ``evit-loadtest report`` merges and re-reads."""
    path = out / "histograms.json"
    path.write_text(json.dumps({"format": HISTOGRAMS_FORMAT, "config": config, "steps": states}) + "\n")
    return path


def write_all(results: dict, config: dict, histograms: list[dict], out: Path) -> list[Path]:
    """Every report file in ``out`` (created): results.json, results.csv, timeseries.csv, histograms.json
    (with ``config``) and latency.png."""
    out.mkdir(parents=True, exist_ok=True)
    return [write_json(results, out), write_csv(results, out), write_series(results, out),
            write_histograms(config, histograms, out), write_png(results, out)]


def write_png(results: dict, out: Path) -> Path:
    """Latency percentiles per keep rate (last step) and, for a sweep, the throughput-latency curve."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = results["steps"]
    sweep = len(steps) > 1
    fig, axes = plt.subplots(1, 2 if sweep else 1, figsize=(11 if sweep else 6, 4), squeeze=False)
    ax = axes[0][0]
    last = steps[-1]
    for label, stats in [*last["per_keep_rate"].items(), ("all", last["overall"])]:
        if stats["p50_ms"] is None:
            continue  # nothing succeeded at this keep rate: see its errors in the table
        ys = [stats[k] if stats[k] is not None else float("nan") for k in LATENCY_KEYS]
        ax.plot(
            [k.removesuffix("_ms").replace("_", ".") for k in LATENCY_KEYS],
            ys,
            marker="o",
            label=f"keep {label}" if label != "all" else "all",
            linestyle="--" if label == "all" else "-",
        )
    _latency_axis(ax)
    ax.set_title(_step_title(last))
    ax.grid(True, which="both", alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    if sweep:
        ax = axes[0][1]
        xs = [s["throughput"] for s in steps]
        for key, style in (("p50_ms", "o-"), ("p99_ms", "s-")):
            ys = [s["overall"][key] if s["overall"][key] is not None else float("nan") for s in steps]
            ax.plot(xs, ys, style, label=f"{key.removesuffix('_ms')} (all)")
        for s, x in zip(steps, xs, strict=True):
            ax.annotate(
                _step_value(s),
                (x, s["overall"]["p99_ms"] or 0),
                fontsize=7,
                textcoords="offset points",
                xytext=(3, 3),
            )
        ax.set_xlabel("achieved throughput (ok answers/s)")
        _latency_axis(ax)
        ax.set_title("sweep: throughput vs latency (labels: target)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path = out / "latency.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _latency_axis(ax) -> None:
    """Milliseconds, on a log scale when they span more than a decade, with plain tick labels."""
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    ys = [y for line in ax.get_lines() for y in line.get_ydata() if y == y]  # NaN-free
    if ys and min(ys) > 0 and max(ys) / min(ys) > 10:
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(ScalarFormatter())
        ax.yaxis.set_minor_formatter(NullFormatter())
    ax.set_ylabel("latency (ms)")


def _step_value(step: dict) -> str:
    return f"{step['target_rate']:g}/s" if step["mode"] == "open" else f"{step['concurrency']} clients"


def _step_title(step: dict) -> str:
    if step["mode"] == "open":
        return f"open loop, {step['arrivals']} arrivals at {step['target_rate']:g}/s"
    return f"closed loop, {step['concurrency']} clients"


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _s_as_ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1e3:.1f}"


def format_table(results: dict) -> str:
    """A readable summary of every step: client view per keep rate, then the server's view."""
    lines = []
    for step in results["steps"]:
        lines.append(f"== {_step_title(step)}: {step['seconds']:.2f} s, sent {step['sent']}, ok {step['ok']}")
        head = f"{'keep_rate':>9} {'sent':>7} {'ok':>7} {'req/s':>8} " + " ".join(f"{k:>9}" for k in LATENCY_KEYS)
        lines.append(head + "  errors")
        for label, s in [*step["per_keep_rate"].items(), ("all", step["overall"])]:
            lines.append(
                f"{label:>9} {s['sent']:>7} {s['ok']:>7} {s['throughput']:>8.1f} "
                + " ".join(f"{_ms(s[k]):>9}" for k in LATENCY_KEYS)
                + f"  {_errors_text(s['errors']) or '-'}"
            )
        lag = step["client_send_lag"]
        if step["mode"] == "open" and lag["p99_ms"] is not None:
            lines.append(f"client send lag p99 {_ms(lag['p99_ms'])} ms (how late the generator itself sent)")
        lines.extend(_server_lines(step))
    return "\n".join(lines)


def _server_lines(step: dict) -> list[str]:
    server = step.get("server")
    if server is None:
        return [f"server metrics: {step.get('metrics_error') or 'not read'}"]
    lines = [f"server: {server['tokens_per_second'] or 0:.0f} tokens/s in all"]
    for label, e in server["per_keep_rate"].items():
        per_req = e["tokens_per_request"]
        lines.append(
            f"  keep_rate {label:>5}: {e['tokens_per_second']:.0f} tokens/s, "
            f"{'-' if per_req is None else f'{per_req:.0f}'} tokens/request, answers {e['requests']}"
        )
    for model, m in server["per_model"].items():
        mean_bs = "-" if m["mean_batch_size"] is None else f"{m['mean_batch_size']:.2f}"
        lines.append(
            f"  model {model}: {m['batches']:.0f} batches, mean batch size {mean_bs}, queue wait mean "
            f"{_s_as_ms(m['queue_wait_mean'])} ms, p50 {_s_as_ms(m['queue_wait_p50'])} ms, "
            f"p99 {_s_as_ms(m['queue_wait_p99'])} ms"
        )
    check = step["cross_check"]
    verdict = "match" if check["match"] else "MISMATCH"
    lines.append(f"  cross-check: {verdict} (client {check['client_total']} vs server {check['server_total']})")
    return lines
