"""`evit-loadtest report RUN [RUN ...]`: re-read saved runs' histograms, merged, and report them again.

Each run folder holds ``histograms.json`` (written by every evit-loadtest run): per step, the counts and the
latency histograms per keep rate and per second. Runs are merged as load generators that ran side by side
(several client machines, or processes, against one service): counts and histograms add up step by step,
a step lasts as long as its longest run, and the target rates (or clients) add up. One run alone is
simply re-read, e.g. to rewrite its CSV. The merged report has no server-side view (each run's
results.json has its own).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from service.loadtest import report
from service.loadtest.histogram import LogHistogram
from service.loadtest.stats import RateStats, summarize


def read_run(path: Path) -> dict:
    """A run's histograms.json (``path``: the file or the run's folder); ValueError when it is not one."""
    path = path / "histograms.json" if path.is_dir() else path
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read {path}: {exc}") from None
    if not isinstance(data, dict) or data.get("format") != report.HISTOGRAMS_FORMAT:
        raise ValueError(f"{path} is not an evit-loadtest histograms file ({report.HISTOGRAMS_FORMAT})")
    return data


def _add(total: float | None, value: float | None) -> float | None:
    return value if total is None else total if value is None else total + value


def merge_step(parts: list[dict]) -> dict:
    """One step of several runs: the report ``summarize`` gives, from the merged counts and histograms."""
    modes = {p["mode"] for p in parts}
    if len(modes) != 1:
        raise ValueError(f"cannot merge an open-loop step with a closed-loop one ({sorted(modes)})")
    per_rate: dict[str, RateStats] = {}
    per_second: dict[int, RateStats] = {}
    lag = LogHistogram()
    rate = clients = None
    for part in parts:
        state = part["state"]
        for label, s in state["per_keep_rate"].items():
            per_rate.setdefault(label, RateStats()).merge(RateStats.from_state(s))
        for t, s in state["per_second"].items():
            per_second.setdefault(int(t), RateStats()).merge(RateStats.from_state(s))
        lag.merge(LogHistogram.from_dict(state["send_lag_seconds"]))
        rate, clients = _add(rate, part["target_rate"]), _add(clients, part["concurrency"])
    seconds = max(p["seconds"] for p in parts)
    first = parts[0]
    state = {
        "per_keep_rate": {k: s.to_state() for k, s in per_rate.items()},
        "send_lag_seconds": lag.to_dict(),
        "per_second": {str(t): s.to_state() for t, s in sorted(per_second.items())},
    }
    return {
        "mode": first["mode"], "target_rate": rate, "concurrency": clients, "arrivals": first["arrivals"],
        **summarize(per_rate, lag, per_second, seconds, first["slo"]),
        "server": None, "cross_check": None, "metrics_error": "not in a merged report (see each run's results.json)",
        "merged_runs": len(parts), "state": state,
    }


def merge_runs(runs: list[dict]) -> list[dict]:
    """Step i of every run merged into step i of the report; the runs must have the same number of steps."""
    counts = {len(r["steps"]) for r in runs}
    if len(counts) != 1:
        raise ValueError(f"the runs have different numbers of steps ({sorted(counts)})")
    return [merge_step([r["steps"][i] for r in runs]) for i in range(counts.pop())]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="evit-loadtest report", description=__doc__.split("\n\n")[0].split(": ", 1)[1])
    p.add_argument("runs", nargs="+", type=Path, help="run folders (or their histograms.json files)")
    p.add_argument("--output", type=Path, default=Path("runs/loadtest-report"), help="folder for the report")
    p.add_argument("--quiet", action="store_true")
    return p


def main(argv: list[str]) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        runs = [read_run(p) for p in args.runs]
        steps = merge_runs(runs)
    except (ValueError, KeyError, TypeError) as exc:
        parser.error(str(exc))
    histograms = report.split_state(steps, runs[0]["steps"][0]["slo"])
    results = {"tool": "evit-loadtest report", "latency_unit": "milliseconds",
               "runs": [str(p) for p in args.runs], **steps[-1], "steps": steps}
    config = {"merged_runs": [str(p) for p in args.runs], "configs": [r["config"] for r in runs]}
    paths = report.write_all(results, config, histograms, args.output)
    if not args.quiet:
        print(report.format_table(results))
        print("wrote " + ", ".join(str(p) for p in paths), file=sys.stderr)
    return 0
