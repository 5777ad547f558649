"""Against a real ``python -m service`` (uvicorn) on 127.0.0.1, started and stopped by PID in each test
(``tests/_live.py``)."""

from __future__ import annotations

import signal
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from _gate import metric as parse_metric
from _live import live_server

pytestmark = pytest.mark.slow


def metric(url: str, name: str, **labels: str) -> float:
    return parse_metric(httpx.get(f"{url}/metrics").text, name, **labels)


def classify(url: str, body: bytes, **params: object) -> httpx.Response:
    return httpx.post(f"{url}/classify", params={"top_k": 10, **params}, content=body,
                      headers={"content-type": "image/jpeg"}, timeout=30)


def test_concurrent_mixed_rates_batch_and_match_solo(tmp_path, tiny_model, image_bytes) -> None:
    rates = [0.3, 0.5, 0.7, 1.0]
    jobs = [(seed, rates[seed % len(rates)]) for seed in range(24)]
    images = {seed: image_bytes(seed=seed) for seed, _ in jobs}
    with live_server(tmp_path, model=tiny_model, max_batch_size=8, max_wait_ms=100, batch_policy="mixed") as server:
        url = server.url
        solo = {job: classify(url, images[job[0]], keep_rate=job[1]).json() for job in jobs}
        assert all(s["batch_size"] == 1 for s in solo.values())
        count0, sum0 = metric(url, "evit_batch_size_count"), metric(url, "evit_batch_size_sum")
        with ThreadPoolExecutor(len(jobs)) as pool:
            answers = list(pool.map(lambda job: classify(url, images[job[0]], keep_rate=job[1]), jobs))
        batches = metric(url, "evit_batch_size_count") - count0
        samples = metric(url, "evit_batch_size_sum") - sum0
        assert samples == len(jobs) and batches < samples  # some forward passes held several requests
        assert max(a.json()["batch_size"] for a in answers) > 1
        for job, answer in zip(jobs, answers, strict=True):
            assert answer.status_code == 200
            alone, together = solo[job], answer.json()
            assert together["tokens"] == alone["tokens"] and together["keep_rate"] == job[1]
            for a, b in zip(alone["predictions"], together["predictions"], strict=True):
                assert b["class_index"] == a["class_index"]
                assert b["probability"] == pytest.approx(a["probability"], abs=1e-4)


def test_overload_gives_503_then_recovers(tmp_path, tiny_model, image_bytes) -> None:
    with live_server(tmp_path, model=tiny_model, queue_size=2, max_batch_size=64, max_wait_ms=400) as server:
        url = server.url
        body = image_bytes()
        with ThreadPoolExecutor(12) as pool:
            answers = list(pool.map(lambda _: classify(url, body), range(12)))
        codes = [a.status_code for a in answers]
        refused = [a for a in answers if a.status_code == 503]
        assert set(codes) == {200, 503} and refused
        for a in refused:
            assert a.json()["error"] == "overloaded" and int(a.headers["retry-after"]) >= 1
        assert httpx.get(f"{url}/healthz").status_code == 200 and httpx.get(f"{url}/readyz").status_code == 200
        assert classify(url, body).status_code == 200
        assert metric(url, "evit_requests_total", code="503") == len(refused)
        assert metric(url, "evit_requests_total", code="200") == codes.count(200) + 1


def test_sigterm_finishes_accepted_requests(tmp_path, tiny_model, image_bytes) -> None:
    with live_server(tmp_path, model=tiny_model, max_batch_size=64, max_wait_ms=2000) as server:
        url = server.url
        body = image_bytes()
        classify(url, body)  # the first request of an idle server runs at once; the next ones wait to batch
        with ThreadPoolExecutor(6) as pool:
            accepted = [pool.submit(classify, url, body, keep_rate=0.5) for _ in range(5)]
            deadline = time.monotonic() + 10
            while metric(url, "evit_queue_depth") < 5:
                assert time.monotonic() < deadline
                time.sleep(0.02)
            server.signal(signal.SIGTERM)
            deadline = time.monotonic() + 10
            while (ready := httpx.get(f"{url}/readyz")).status_code != 503:  # the signal handler has run
                assert time.monotonic() < deadline
                time.sleep(0.02)
            assert ready.status_code == 503 and ready.json()["draining"] is True
            late = classify(url, body)
            assert late.status_code == 503 and late.json()["error"] == "draining"
            assert [f.result().status_code for f in accepted] == [200] * 5
        assert server.wait(timeout=30) == 0
