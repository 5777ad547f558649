"""evit-loadtest pieces that need no server: histogram, keep-rate mix, arrivals, metrics arithmetic."""

import itertools
import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from service.loadtest import promscrape
from service.loadtest.cli import build_parser, check_target
from service.loadtest.histogram import LogHistogram
from service.loadtest.stats import RateStats, Recorder
from service.loadtest.workload import (
    KeepRateMix,
    arrival_offsets,
    bucket_rate,
    generate_images,
    load_images,
)


def nearest_rank(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[max(1, math.ceil(q * len(ordered))) - 1]


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.floats(min_value=0.0, max_value=1e4, allow_nan=False), min_size=1, max_size=300),
    st.sampled_from([0.0, 0.01, 0.5, 0.9, 0.95, 0.99, 0.999, 1.0]),
)
def test_histogram_quantile_within_relative_error(values, q):
    h = LogHistogram(rel_error=0.01)
    h.record_all(values)
    exact = nearest_rank(values, q)
    got = h.quantile(q)
    assert got == pytest.approx(exact, rel=0.01, abs=h.lowest)
    assert h.count == len(values) and h.max == max(values) and h.min == min(values)


def test_histogram_known_distribution_and_bounded_memory():
    rng = random.Random(3)
    values = [rng.lognormvariate(-3, 1) for _ in range(50_000)]  # latencies around 50 ms
    h = LogHistogram()
    h.record_all(values)
    for q in (0.5, 0.9, 0.99):
        assert h.quantile(q) == pytest.approx(nearest_rank(values, q), rel=0.005)
    assert h.quantile(1.0) == max(values)
    assert h.mean == pytest.approx(sum(values) / len(values))
    assert h.num_buckets < 2000  # log-bucketed: not one slot per value


def test_histogram_merge_empty_and_bad_values():
    a, b = LogHistogram(), LogHistogram()
    assert a.quantile(0.5) is None and a.summary()["max"] is None and a.mean is None
    a.record_all([0.010] * 90)
    b.record_all([1.0] * 10)
    a.merge(b)
    assert a.count == 100
    assert a.quantile(0.5) == pytest.approx(0.010, rel=0.005)
    assert a.quantile(0.95) == pytest.approx(1.0, rel=0.005)
    a.record(0.0)
    assert a.quantile(0.0) == 0.0
    for bad in (-1.0, math.nan, math.inf):
        with pytest.raises(ValueError):
            a.record(bad)
    with pytest.raises(ValueError):
        a.merge(LogHistogram(rel_error=0.02))


def test_keep_rate_mix_parse_and_weights():
    mix = KeepRateMix.parse("0.5:1,0.7:2,1:1")
    assert mix.labels == ("0.5", "0.7", "1.0")
    assert mix.fractions() == {"0.5": 0.25, "0.7": 0.5, "1.0": 0.25}
    draws = [d for d, _ in zip(mix.chooser(random.Random(0)), range(8000), strict=False)]
    assert draws.count("0.7") / len(draws) == pytest.approx(0.5, abs=0.03)
    assert KeepRateMix.parse("auto,default").labels == ("auto", "default")


@pytest.mark.parametrize("spec", ["0", "1.5", "nan", "x:1", "0.5:0", "0.5:-1", "0.5:y", "0.5,,1.0", "0.5,0.5"])
def test_keep_rate_mix_rejects(spec):
    with pytest.raises(ValueError):
        KeepRateMix.parse(spec)


def test_arrivals_constant_and_poisson():
    constant = [t for t, _ in zip(arrival_offsets(40, "constant", random.Random(0)), range(5), strict=False)]
    assert constant == pytest.approx([0, 0.025, 0.05, 0.075, 0.1])
    gen = arrival_offsets(100, "poisson", random.Random(1))
    offsets = [next(gen) for _ in range(20_001)]
    gaps = [b - a for a, b in itertools.pairwise(offsets)]
    assert sum(gaps) / len(gaps) == pytest.approx(0.01, rel=0.03)
    assert sorted(gaps)[len(gaps) // 2] == pytest.approx(0.01 * math.log(2), rel=0.05)  # exponential median
    with pytest.raises(ValueError):
        next(arrival_offsets(0, "poisson", random.Random(0)))


def test_images_generated_and_from_folder(tmp_path):
    imgs = generate_images(3, size=32)
    assert len(imgs) == 3 and all(i.data[:2] == b"\xff\xd8" for i in imgs)  # JPEG
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a.JPG").write_bytes(imgs[0].data)
    (tmp_path / "notes.txt").write_text("not an image")
    loaded = load_images(tmp_path)
    assert [(i.name, i.content_type) for i in loaded] == [("a.JPG", "image/jpeg")]
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no image files"):
        load_images(tmp_path / "empty")
    with pytest.raises(ValueError, match="does not exist"):
        load_images(tmp_path / "missing")


def test_bucket_rates_like_the_service():
    assert [bucket_rate(x) for x in ("0.7", "1.0", "0.73", "0.33", "0.5", "0.01")] == [0.7, 1.0, 0.75, 0.35, 0.5, 0.05]
    assert bucket_rate("auto") is None


METRICS_BEFORE = """\
# TYPE evit_requests_total counter
evit_requests_total{model="m",keep_rate="0.5",code="200"} 5
# TYPE evit_tokens_processed_total counter
evit_tokens_processed_total{model="m",keep_rate="0.5"} 500
# TYPE evit_batch_size histogram
evit_batch_size_bucket{model="m",le="1.0"} 2
evit_batch_size_bucket{model="m",le="4.0"} 3
evit_batch_size_bucket{model="m",le="+Inf"} 3
evit_batch_size_sum{model="m"} 6
evit_batch_size_count{model="m"} 3
"""
METRICS_AFTER = """\
# TYPE evit_requests_total counter
evit_requests_total{model="m",keep_rate="0.5",code="200"} 15
evit_requests_total{model="m",keep_rate="1.0",code="200"} 4
evit_requests_total{model="m",keep_rate="1.0",code="503"} 2
evit_requests_total{model="other",keep_rate="1.0",code="200"} 7
# TYPE evit_tokens_processed_total counter
evit_tokens_processed_total{model="m",keep_rate="0.5"} 1500
evit_tokens_processed_total{model="m",keep_rate="1.0"} 800
# TYPE evit_batch_size histogram
evit_batch_size_bucket{model="m",le="1.0"} 2
evit_batch_size_bucket{model="m",le="4.0"} 7
evit_batch_size_bucket{model="m",le="+Inf"} 7
evit_batch_size_sum{model="m"} 18
evit_batch_size_count{model="m"} 7
# TYPE evit_queue_wait_seconds histogram
evit_queue_wait_seconds_bucket{model="m",le="0.01"} 10
evit_queue_wait_seconds_bucket{model="m",le="0.1"} 14
evit_queue_wait_seconds_bucket{model="m",le="+Inf"} 14
evit_queue_wait_seconds_sum{model="m"} 0.28
evit_queue_wait_seconds_count{model="m"} 14
"""


def test_server_summary_from_two_scrapes():
    delta = promscrape.diff(promscrape.parse_metrics(METRICS_BEFORE), promscrape.parse_metrics(METRICS_AFTER))
    server = promscrape.summarize(delta, seconds=2.0, model="m")
    assert server["per_keep_rate"]["0.5"] == {
        "requests": {"200": 10},
        "tokens": 1000.0,
        "tokens_per_second": 500.0,
        "tokens_per_request": 100.0,
    }
    assert server["per_keep_rate"]["1.0"]["requests"] == {"200": 4, "503": 2}
    assert server["per_keep_rate"]["1.0"]["tokens_per_request"] == 200.0
    assert server["tokens_per_second"] == 900.0
    m = server["per_model"]["m"]
    assert m["batches"] == 4 and m["mean_batch_size"] == 3.0  # (18-6)/(7-3)
    assert m["queue_wait_mean"] == pytest.approx(0.02)
    assert m["queue_wait_p50"] == pytest.approx(0.007)  # rank 7 of 10 in (0, 0.01]
    assert 0.01 < m["queue_wait_p99"] <= 0.1

    check = promscrape.cross_check(
        {"0.5": {"200": 10}, "1.0": {"200": 4, "503": 2, "timeout": 1}},
        {"0.5": 1000.0, "1.0": 800.0},
        server,
    )
    assert check["match"] and check["per_keep_rate"]["0.5"]["tokens_match"]
    bad = promscrape.cross_check({"0.5": {"200": 9}, "1.0": {"200": 4, "503": 2}}, {}, server)
    assert not bad["match"] and not bad["per_keep_rate"]["0.5"]["match"] and bad["per_keep_rate"]["1.0"]["match"]
    auto = promscrape.cross_check({"auto": {"200": 14, "503": 2}}, {}, server)
    assert auto["unmapped_labels"] == ["auto"] and auto["match"] and "per_keep_rate" not in auto


def test_cross_check_matches_labels_by_value():
    """The service formats labels as "0.70"; the client says "0.7" (or 0.72, which buckets there too)."""
    after = 'evit_requests_total{model="m",keep_rate="0.70",code="200"} 3\n'
    after += 'evit_requests_total{model="m",keep_rate="1.00",code="200"} 2\n'
    server = promscrape.summarize(promscrape.parse_metrics(after), seconds=1.0)
    check = promscrape.cross_check({"0.72": {"200": 3}, "1.0": {"200": 2}}, {}, server)
    assert check["match"] and set(check["per_keep_rate"]) == {"0.70", "1.00"}
    assert not promscrape.cross_check({"0.72": {"200": 2}, "1.0": {"200": 3}}, {}, server)["match"]


def test_bucket_quantile_edges():
    assert promscrape.bucket_quantile({}, 0.5) is None
    assert promscrape.bucket_quantile({1.0: 0, math.inf: 0}, 0.5) is None
    assert promscrape.bucket_quantile({1.0: 0, 2.0: 0, math.inf: 4}, 0.5) == 2.0  # all above the top bound


def test_recorder_counts_only_successes_in_latency():
    rec = Recorder(("0.5", "1.0"), slo=0.1)
    for label, status, latency in [("0.5", "200", 0.05), ("0.5", "200", 0.2), ("1.0", "503", 0.001)]:
        rec.on_send(label)
        rec.on_answer(label, status, latency, 0.0, {"tokens": 10, "keep_rate": 0.5} if status == "200" else None)
    out = rec.to_dict(seconds=2.0)
    assert out["sent"] == 3 and out["ok"] == 2
    assert out["per_keep_rate"]["0.5"]["within_slo"] == 1 and out["per_keep_rate"]["0.5"]["goodput"] == 0.5
    assert out["per_keep_rate"]["0.5"]["tokens_per_request"] == 10
    assert out["per_keep_rate"]["1.0"]["errors"] == {"503": 1} and out["per_keep_rate"]["1.0"]["p50_ms"] is None
    assert out["overall"]["max_ms"] == pytest.approx(200)


def test_histogram_saved_and_reread_exactly():
    rng = random.Random(5)
    h = LogHistogram()
    h.record_all([rng.lognormvariate(-4, 1.5) for _ in range(5000)] + [0.0])
    back = LogHistogram.from_dict(json.loads(json.dumps(h.to_dict())))
    assert [back.quantile(q) for q in (0, 0.5, 0.99, 0.999, 1)] == [h.quantile(q) for q in (0, 0.5, 0.99, 0.999, 1)]
    assert (back.count, back.total, back.min, back.max) == (h.count, h.total, h.min, h.max)
    assert LogHistogram.from_dict(LogHistogram().to_dict()).quantile(0.5) is None
    broken = {**h.to_dict(), "count": h.count + 1}
    with pytest.raises(ValueError, match="add up"):
        LogHistogram.from_dict(broken)


def test_p99_9_and_time_series():
    """1,000 answers: 998 at 10 ms, two at 1 s; p99 sees the former, p99.9 and max the latter."""
    rec = Recorder(("1.0",), start=100.0)
    for i in range(1000):
        rec.on_send("1.0")
        latency = 1.0 if i >= 998 else 0.010
        rec.on_answer("1.0", "200", latency, 0.0, None, at=100.0 + i / 400)  # 400 answers per second
    rec.on_send("1.0")
    rec.on_answer("1.0", "503", 0.001, 0.0, None, at=103.2)
    out = rec.to_dict(seconds=3.5)["per_keep_rate"]["1.0"]
    assert out["p99_ms"] == pytest.approx(10, rel=0.005) and out["p99_9_ms"] == pytest.approx(1000, rel=0.005)
    assert out["max_ms"] == 1000
    series = rec.to_dict(seconds=3.5)["time_series"]
    assert [(r["second"], r["answers"], r["ok"], r["errors"]) for r in series] == [
        (0, 400, 400, {}), (1, 400, 400, {}), (2, 200, 200, {}), (3, 1, 0, {"503": 1})]
    assert series[2]["max_ms"] == 1000 and series[0]["p99_ms"] == pytest.approx(10, rel=0.005)
    state = json.loads(json.dumps(rec.to_state()))
    assert RateStats.from_state(state["per_keep_rate"]["1.0"]).to_dict(3.5, None) == out


def test_loopback_only_unless_allowed():
    check_target("http://127.0.0.1:8000", allow_remote=False)
    check_target("http://localhost:8000", allow_remote=False)
    check_target("http://[::1]:8000", allow_remote=False)
    with pytest.raises(ValueError, match="allow-remote"):
        check_target("http://192.0.2.1:8000", allow_remote=False)  # TEST-NET-1: never contacted
    check_target("http://192.0.2.1:8000", allow_remote=True)
    with pytest.raises(ValueError, match="http"):
        check_target("ftp://127.0.0.1/", allow_remote=False)


def test_cli_needs_exactly_one_load_shape():
    parser = build_parser()
    with pytest.raises(SystemExit):
        parser.parse_args(["--duration", "1"])
    with pytest.raises(SystemExit):
        parser.parse_args(["--rate", "5", "--concurrency", "2"])
    args = parser.parse_args(["--sweep", "20,5,10"])
    assert args.sweep == [5.0, 10.0, 20.0]


def test_load_tester_imports_no_torch():
    """The load tester checks keep rates with evit.config's rule, yet its clients never import torch."""
    code = "import sys, service.loadtest.cli, service.loadtest.runner; print('torch' in sys.modules)"
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=root,
                         env={**os.environ, "PYTHONPATH": str(root)})
    assert out.stdout.strip() == "False"
