"""Against a real ``python -m service`` (uvicorn) on 127.0.0.1, started and stopped by PID in each test."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def live_server(tmp_path: Path, model: dict, **settings: object) -> Iterator[tuple[subprocess.Popen, str]]:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("EVIT_")}
    env.update({"EVIT_MODELS": json.dumps([model]), "EVIT_HOST": "127.0.0.1", "EVIT_PORT": str(port),
                "EVIT_DEVICE": "cpu", "EVIT_TORCH_THREADS": "1", "EVIT_LOG_LEVEL": "warning"})
    env.update({f"EVIT_{k.upper()}": str(v) for k, v in settings.items()})
    log = (tmp_path / f"server-{port}.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "service"], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, (tmp_path / f"server-{port}.log").read_text()
            try:
                if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "server did not become ready"
            time.sleep(0.1)
        yield proc, url
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        log.close()


def metric(url: str, name: str, **labels: str) -> float:
    text = httpx.get(f"{url}/metrics").text
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    return 0.0


def classify(url: str, body: bytes, **params: object) -> httpx.Response:
    return httpx.post(f"{url}/classify", params={"top_k": 10, **params}, content=body,
                      headers={"content-type": "image/jpeg"}, timeout=30)


def test_concurrent_mixed_rates_batch_and_match_solo(tmp_path, tiny_model, image_bytes) -> None:
    rates = [0.3, 0.5, 0.7, 1.0]
    jobs = [(seed, rates[seed % len(rates)]) for seed in range(24)]
    images = {seed: image_bytes(seed=seed) for seed, _ in jobs}
    with live_server(tmp_path, tiny_model, max_batch_size=8, max_wait_ms=100, batch_policy="mixed") as (_, url):
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
    with live_server(tmp_path, tiny_model, queue_size=2, max_batch_size=64, max_wait_ms=400) as (_, url):
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
    with live_server(tmp_path, tiny_model, max_batch_size=64, max_wait_ms=2000) as (proc, url):
        body = image_bytes()
        classify(url, body)  # the first request of an idle server runs at once; the next ones wait to batch
        with ThreadPoolExecutor(6) as pool:
            accepted = [pool.submit(classify, url, body, keep_rate=0.5) for _ in range(5)]
            deadline = time.monotonic() + 10
            while metric(url, "evit_queue_depth") < 5:
                assert time.monotonic() < deadline
                time.sleep(0.02)
            os.kill(proc.pid, signal.SIGTERM)
            time.sleep(0.2)
            ready = httpx.get(f"{url}/readyz")
            assert ready.status_code == 503 and ready.json()["draining"] is True
            late = classify(url, body)
            assert late.status_code == 503 and late.json()["error"] == "draining"
            assert [f.result().status_code for f in accepted] == [200] * 5
        assert proc.wait(timeout=30) == 0
