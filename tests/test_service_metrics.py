"""/metrics as Prometheus scrapes it: gzip and OpenMetrics by negotiation, evit_build_info, one unit per
metric, and the metrics alone on --metrics-port beside the main port (a real server process)."""

from __future__ import annotations

import gzip
import socket
from importlib.metadata import version

import httpx
import pytest
import timm
import torch
from _gate import metric
from _live import free_port, live_server
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics

pytestmark = pytest.mark.anyio
OPENMETRICS = "application/openmetrics-text; version=1.0.0; charset=utf-8"


async def test_gzip_and_openmetrics_by_negotiation(serve, tiny_settings, image_bytes) -> None:
    async with serve(tiny_settings()) as (_, client):
        assert (await client.post("/classify", content=image_bytes())).status_code == 200
        plain = await client.get("/metrics", headers={"accept-encoding": "identity"})
        assert "content-encoding" not in plain.headers and plain.headers["content-type"].startswith("text/plain")
        async with client.stream("GET", "/metrics", headers={"accept-encoding": "gzip"}) as zipped:
            wire = b"".join([chunk async for chunk in zipped.aiter_raw()])  # as sent, not un-gzipped
        assert zipped.headers["content-encoding"] == "gzip" and len(wire) < len(plain.content) / 3
        assert b"evit_ready 1.0" in gzip.decompress(wire)
        om = await client.get("/metrics", headers={"accept": OPENMETRICS, "accept-encoding": "identity"})
        assert om.headers["content-type"].startswith("application/openmetrics-text") and om.text.endswith("# EOF\n")
        families = {f.name: f for f in parse_openmetrics(om.text)}  # a strict parser: fails on a format error
        assert families["evit_requests"].type == "counter"
        assert (await client.post("/metrics")).status_code == 405


async def test_build_info_and_one_unit_per_metric(serve, tiny_settings) -> None:
    async with serve(tiny_settings()) as (_, client):
        text = (await client.get("/metrics")).text
        assert metric(text, "evit_build_info", version=version("evit-serve"), torch=torch.__version__,
                      timm=timm.__version__, backend="torch") == 1
        assert "evit_latency_model{" not in text and "# TYPE evit_latency_model_seconds_per_gmac gauge" in text
        for name in ("evit_latency_model_overhead_seconds", "evit_latency_model_relative_error"):
            assert f"# TYPE {name} gauge" in text


def test_metrics_port_serves_the_same_registry(tmp_path, image_bytes) -> None:
    port = free_port()
    with live_server(tmp_path, metrics_port=port, metrics_path="") as server:
        assert httpx.post(f"{server.url}/classify", content=image_bytes(), timeout=30).status_code == 200
        assert httpx.get(f"{server.url}/metrics", timeout=5).status_code == 404  # main port: turned off
        r = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5, headers={"accept-encoding": "gzip"})
        assert r.status_code == 200 and r.headers["content-encoding"] == "gzip"
        assert metric(r.text, "evit_requests_total", model="tiny", code="200") == 1
        assert metric(r.text, "evit_request_duration_seconds_count", model="tiny", code="200") == 1


def test_a_taken_metrics_port_fails_before_loading(monkeypatch, capsys) -> None:
    from service.__main__ import main

    monkeypatch.setattr("service.__main__.configure_logging", lambda *a: None)  # keep pytest's log handlers
    monkeypatch.setattr("service.__main__.load_registry", lambda s: pytest.fail("loaded models"))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["--host", "127.0.0.1", "--metrics-port", str(port)]) == 2
    assert f"cannot serve metrics on 127.0.0.1:{port}" in capsys.readouterr().err
