"""evit-loadtest against a real uvicorn server on 127.0.0.1 with a known, injected latency.

Run as a script, this file is that server: a fake /classify whose latency per keep rate is known
(``--latency 0.5=0.03,1.0=0.08``), optionally serialised (one request at a time, so a queue builds),
and a /metrics exporting the service's metric names with values the test can predict.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from service.loadtest import main as loadtest_main

FAKE_BATCH_SIZE = 3  # the fake observes this batch size once per request
FAKE_QUEUE_WAIT = 0.004


def build_app(latency: dict[str, float], serial: bool, fail: dict[str, int]):
    registry = CollectorRegistry()
    requests = Counter("evit_requests_total", "", ["model", "keep_rate", "code"], registry=registry)
    tokens = Counter("evit_tokens_processed_total", "", ["model", "keep_rate"], registry=registry)
    batch = Histogram("evit_batch_size", "", ["model"], buckets=(1, 2, 4, 8), registry=registry)
    wait = Histogram("evit_queue_wait_seconds", "", ["model"], buckets=(0.001, 0.01, 0.1), registry=registry)
    lock = asyncio.Lock()
    app = FastAPI()

    @app.post("/classify")
    async def classify(request: Request, keep_rate: float = 1.0, model: str = "fake"):
        body = await request.body()
        label = repr(keep_rate)
        if not body or (label not in latency and label not in fail):
            return JSONResponse({"error": "bad request"}, status_code=422)
        if label in fail:
            requests.labels(model, label, str(fail[label])).inc()
            return JSONResponse({"error": "injected"}, status_code=fail[label])
        if serial:
            async with lock:
                await asyncio.sleep(latency[label])
        else:
            await asyncio.sleep(latency[label])
        n = round(100 * keep_rate)  # the fake processes 100 tokens per unit of keep rate
        tokens.labels(model, label).inc(n)
        batch.labels(model).observe(FAKE_BATCH_SIZE)
        wait.labels(model).observe(FAKE_QUEUE_WAIT)
        requests.labels(model, label, "200").inc()
        return {"model": model, "keep_rate": keep_rate, "tokens": n, "predictions": []}

    @app.get("/metrics")
    async def metrics():
        return Response(generate_latest(registry), media_type="text/plain; version=0.0.4")

    return app


def _serve(argv: list[str]) -> None:
    import uvicorn

    p = argparse.ArgumentParser()
    p.add_argument("--latency", required=True)  # "0.5=0.03,1.0=0.08"
    p.add_argument("--fail", default="")  # "0.3=503"
    p.add_argument("--serial", action="store_true")
    a = p.parse_args(argv)
    latency = {k: float(v) for k, v in (kv.split("=") for kv in a.latency.split(","))}
    fail = {k: int(v) for k, v in (kv.split("=") for kv in a.fail.split(",") if kv)}
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    print(sock.getsockname()[1], flush=True)
    config = uvicorn.Config(build_app(latency, a.serial, fail), log_level="warning", access_log=False)
    uvicorn.Server(config).run(sockets=[sock])


@contextmanager
def fake_server(*args: str) -> Iterator[str]:
    """Start this file as a server on 127.0.0.1 (an OS-chosen port); stop it by its PID."""
    proc = subprocess.Popen([sys.executable, __file__, *args], stdout=subprocess.PIPE, text=True)
    try:
        port = int(proc.stdout.readline())
        url = f"http://127.0.0.1:{port}"
        from _live import wait_ok  # not at the top: this file also runs as the fake server's script

        wait_ok(url + "/metrics", lambda: proc.poll() is None, 20)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def run_tool(tmp_path, args: str) -> dict:
    assert loadtest_main([*args.split(), "--out", str(tmp_path), "--quiet"]) == 0
    return json.loads((tmp_path / "results.json").read_text())


def test_closed_loop_percentiles_match_injected_latency(tmp_path):
    """Keep rate 0.1 answers at once (the HTTP round trip on this machine, right now); 0.5 and 1.0 sleep
    30 and 80 ms first. Each percentile is at least the injected sleep, and the medians sit that far above
    the round trip's median, however busy the shared CPU is."""
    with fake_server("--latency", "0.1=0,0.5=0.03,1.0=0.08", "--fail", "0.3=503") as url:
        res = run_tool(
            tmp_path,
            f"--url {url} --concurrency 4 --duration 2 --warmup 0.3 "
            "--keep-rates 0.1:2,0.5:2,1.0:2,0.3:1 --image-size 32 --generated 2",
        )
    base, fast, slow, failing = (res["per_keep_rate"][k] for k in ("0.1", "0.5", "1.0", "0.3"))
    assert base["p50_ms"] < 500
    for stats, injected in ((fast, 30), (slow, 80)):  # milliseconds
        assert stats["ok"] == stats["sent"] > 5 and stats["errors"] == {}
        ordered = [stats[k] for k in ("p50_ms", "p90_ms", "p95_ms", "p99_ms", "p99_9_ms", "max_ms")]
        assert injected <= ordered[0] and ordered == sorted(ordered) and ordered[-1] < 10_000
        # at least the injected sleep above the round trip (less 10 ms of jitter), at most 100 ms more (busy CPU)
        assert injected - 10 <= stats["p50_ms"] - base["p50_ms"] <= injected + 100, (stats, base)
    assert failing["ok"] == 0 and failing["errors"] == {"503": failing["sent"]} and failing["p50_ms"] is None
    assert res["sent"] == base["sent"] + fast["sent"] + slow["sent"] + failing["sent"]
    assert res["ok"] == base["ok"] + fast["ok"] + slow["ok"]
    assert res["throughput"] == pytest.approx(res["ok"] / res["seconds"])
    assert res["latency_unit"] == "milliseconds"

    server, check = res["server"], res["cross_check"]
    assert check["match"], check
    assert check["client_total"] == {"200": res["ok"], "503": failing["sent"]}
    assert server["per_keep_rate"]["0.5"]["tokens_per_request"] == 50
    assert server["per_keep_rate"]["1.0"]["tokens_per_request"] == 100
    tokens = 10 * base["ok"] + 50 * fast["ok"] + 100 * slow["ok"]
    assert server["tokens_per_second"] == pytest.approx(tokens / res["seconds"])
    model = server["per_model"]["fake"]
    assert model["mean_batch_size"] == FAKE_BATCH_SIZE
    assert model["queue_wait_mean"] == pytest.approx(FAKE_QUEUE_WAIT)
    assert fast["tokens_per_request"] == 50 and fast["mean_keep_rate_used"] == 0.5
    assert (tmp_path / "latency.png").stat().st_size > 1000
    rows = {r["keep_rate"]: r for r in csv.DictReader((tmp_path / "results.csv").open())}
    assert sorted(rows) == ["0.1", "0.3", "0.5", "1.0", "all"]
    assert rows["0.3"]["errors"] == f"503:{failing['sent']}" and rows["0.3"]["p50_ms"] == ""
    assert float(rows["0.5"]["p50_ms"]) == fast["p50_ms"] and int(rows["all"]["sent"]) == res["sent"]
    assert float(rows["1.0"]["p99_9_ms"]) == slow["p99_9_ms"] and float(rows["1.0"]["max_ms"]) == slow["max_ms"]
    series = list(csv.DictReader((tmp_path / "timeseries.csv").open()))  # answers by the second they came back
    assert [int(r["second"]) for r in series] == list(range(len(series))) and 2 <= len(series) <= 4
    assert sum(int(r["answers"]) for r in series) == res["sent"] and sum(int(r["ok"]) for r in series) == res["ok"]


def test_open_loop_reports_queueing_no_coordinated_omission(tmp_path):
    """60 requests at 40/s into a server that does one at a time in 50 ms (capacity 20/s).

    Request i is scheduled at 0.025*i and finishes near 0.05*(i+1): its latency is 0.05 + 0.025*i,
    so the median is ~0.8 s and the max ~1.5 s. A tool timing from the actual send, or waiting for
    answers before sending more, would report ~50 ms and hide the queue.
    """
    with fake_server("--latency", "1.0=0.05", "--serial") as url:
        res = run_tool(
            tmp_path,
            f"--url {url} --rate 40 --arrivals constant --duration 1.5 "
            "--warmup 0 --keep-rates 1.0 --generated 1 --image-size 16",
        )
    stats = res["per_keep_rate"]["1.0"]
    assert stats["sent"] == stats["ok"] == 60  # the count is fixed by the schedule, not by the server
    # Floors that hold however slow the machine is: request i cannot finish before 0.05 * (i + 1).
    p50, top = stats["p50_ms"] / 1e3, stats["max_ms"] / 1e3  # seconds
    assert p50 >= 0.05 + 0.025 * 29 - 0.01 and top >= 0.05 + 0.025 * 59 - 0.01
    # On a busy machine each request takes longer than 50 ms: compare with the measured service time.
    service = res["seconds"] / 60
    assert top <= res["seconds"] and service >= 0.05
    assert p50 == pytest.approx(30 * service - 0.025 * 29, abs=0.3), (service, stats)
    assert top == pytest.approx(60 * service - 0.025 * 59, abs=0.3), (service, stats)
    assert res["throughput"] == pytest.approx(60 / res["seconds"]) and res["throughput"] <= 20.5  # not the 40 asked


def test_sweep_and_request_bound(tmp_path):
    with fake_server("--latency", "0.5=0.01,1.0=0.02") as url:
        res = run_tool(
            tmp_path,
            f"--url {url} --sweep 10,30 --duration 1 --max-requests 12 "
            "--warmup 0.2 --keep-rates 0.5,1.0 --generated 1 --image-size 16",
        )
    assert [s["target_rate"] for s in res["steps"]] == [10.0, 30.0]
    assert res["steps"][0]["sent"] <= 12 and res["steps"][1]["sent"] == 12  # 30/s for 1 s: capped at 12
    assert res["target_rate"] == 30.0 and all(s["cross_check"]["match"] for s in res["steps"])
    assert len((tmp_path / "results.csv").read_text().splitlines()) == 1 + 2 * 3


def test_saved_histograms_merge_and_reread(tmp_path):
    """Two runs (as two load generators) merged by `evit-loadtest report`: counts add, quantiles come from the
    merged histograms; re-reading the merged report's own histograms.json gives the same report."""
    a, b, merged, again = (tmp_path / n for n in ("a", "b", "merged", "again"))
    with fake_server("--latency", "0.5=0.01,1.0=0.06") as url:
        common = f"--url {url} --concurrency 2 --duration 1 --warmup 0 --generated 1 --image-size 16"
        first = run_tool(a, f"{common} --keep-rates 0.5")
        second = run_tool(b, f"{common} --keep-rates 0.5,1.0")
    assert loadtest_main(["report", str(a), str(b / "histograms.json"), "--output", str(merged), "--quiet"]) == 0
    res = json.loads((merged / "results.json").read_text())
    fast = res["per_keep_rate"]["0.5"]
    assert fast["sent"] == first["per_keep_rate"]["0.5"]["sent"] + second["per_keep_rate"]["0.5"]["sent"]
    assert res["per_keep_rate"]["1.0"]["ok"] == second["per_keep_rate"]["1.0"]["ok"] > 0
    assert res["sent"] == first["sent"] + second["sent"] and res["concurrency"] == 4 and res["merged_runs"] == 2
    assert 10 <= fast["p50_ms"] < res["per_keep_rate"]["1.0"]["p50_ms"]
    assert res["overall"]["max_ms"] == max(first["overall"]["max_ms"], second["overall"]["max_ms"])
    assert sum(r["answers"] for r in res["time_series"]) == res["sent"]
    assert loadtest_main(["report", str(merged), "--output", str(again), "--quiet"]) == 0
    reread = json.loads((again / "results.json").read_text())
    assert reread["steps"] == [{**step, "merged_runs": 1} for step in res["steps"]]
    with pytest.raises(SystemExit):
        loadtest_main(["report", str(tmp_path / "nothing-here"), "--output", str(tmp_path / "x")])


def test_client_timeouts_are_counted(tmp_path):
    """Answers slower than --timeout are counted as "timeout" errors (and nothing succeeded: exit status 1)."""
    with fake_server("--latency", "1.0=1.5") as url:
        args = f"--url {url} --concurrency 2 --duration 0.5 --warmup 0 --timeout 0.3 --generated 1 --image-size 16"
        assert loadtest_main([*args.split(), "--output", str(tmp_path), "--quiet"]) == 1
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["ok"] == 0 and res["sent"] >= 2 and res["overall"]["errors"] == {"timeout": res["sent"]}


def test_refuses_remote_target_without_sending(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        loadtest_main(["--url", "http://192.0.2.1:8000", "--rate", "1", "--duration", "1", "--out", str(tmp_path)])
    assert exc.value.code == 2 and "--allow-remote" in capsys.readouterr().err
    assert not (tmp_path / "results.json").exists()


def test_unreachable_server_exits_nonzero(tmp_path):
    with socket.socket() as s:  # a loopback port with nothing listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code = loadtest_main(
        [
            "--url",
            f"http://127.0.0.1:{port}",
            "--rate",
            "20",
            "--duration",
            "0.2",
            "--warmup",
            "0",
            "--generated",
            "1",
            "--image-size",
            "16",
            "--out",
            str(tmp_path),
            "--quiet",
        ]
    )
    res = json.loads((tmp_path / "results.json").read_text())
    assert code == 1 and res["ok"] == 0 and res["overall"]["errors"] == {"connection_error": res["sent"]}
    assert res["server"] is None and "could not read" in res["metrics_error"]


if __name__ == "__main__":
    _serve(sys.argv[1:])
