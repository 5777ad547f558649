"""The dashboard, alerts and autoscaling rule against a real service process and a real Prometheus.

One `python -m service` process on 127.0.0.1 (a tiny random-weights ViT, started and stopped by PID by
tests/_live.py)
answers a few classify requests; then
- every metric name (and label) the dashboard, the alert rules and the HPA use must be in its live /metrics;
- Debian's `prometheus` server, started on 127.0.0.1 with a temporary config and the real alerts.yml,
  scrapes it, and the latency histogram, the token counter and every dashboard query are read back
  through the HTTP query API.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml
from _live import free_port, live_server, wait_ok
from conftest import skip_or_fail
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
DASHBOARD = DOCKER / "grafana" / "dashboards" / "evit-serve.json"
ALERTS = DOCKER / "prometheus" / "alerts.yml"
KEEP_RATES = (0.5, 0.7, 1.0)
TARGET_LABELS = {"job", "instance"}  # added by Prometheus at scrape time


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def png() -> bytes:
    import io

    buf = io.BytesIO()
    Image.new("RGB", (48, 40), (30, 120, 200)).save(buf, "PNG")
    return buf.getvalue()


def classify(service: dict, rate: float) -> None:
    """One answered request, counted in ``service`` (what Prometheus should see)."""
    r = httpx.post(f"{service['url']}/classify", params={"keep_rate": rate}, content=png(),
                   headers={"content-type": "image/png"}, timeout=30)
    assert r.status_code == 200, r.text
    label = f"{rate:.2f}"
    service["per_rate"][label] = service["per_rate"].get(label, 0) + 1
    service["tokens"] += r.json()["tokens"]


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """A live service that answered 2 requests per keep rate (200) and one bad one (422); tests may add
    answered requests through ``classify``."""
    with live_server(tmp_path_factory.mktemp("service"), max_wait_ms=1) as server:  # conftest's TINY_MODEL
        state = {"url": server.url, "port": server.port, "per_rate": {}, "tokens": 0}
        for rate in KEEP_RATES * 2:
            classify(state, rate)
        bad = httpx.post(f"{server.url}/classify", params={"keep_rate": 1.5}, content=png(),
                         headers={"content-type": "image/png"}, timeout=30)
        assert bad.status_code == 422
        yield state


# ---------------------------------------------------------------- names used by the deployment files


def dashboard_exprs() -> list[str]:
    dash = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    exprs += [v["definition"] for v in dash["templating"]["list"] if "definition" in v]
    return exprs


def alert_exprs() -> list[str]:
    return [r["expr"] for g in yaml.safe_load(ALERTS.read_text())["groups"] for r in g["rules"]]


def autoscaling_names() -> set[str]:
    hpa = yaml.safe_load((DOCKER / "k8s" / "base" / "hpa.yaml").read_text())
    names = {m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"] if m["type"] == "Pods"}
    cm = yaml.safe_load((DOCKER / "k8s" / "prometheus-adapter" / "adapter-config.yaml").read_text())
    for rule in yaml.safe_load(cm["data"]["config.yaml"])["rules"]:
        names.add(rule["seriesQuery"].split("{")[0])
    return names


def metric_names(expr: str) -> set[str]:
    """Series names in a PromQL expression (recording-rule names, with a colon, are not exported)."""
    tokens = re.findall(r"[A-Za-z_:][A-Za-z0-9_:]*", re.sub(r'"[^"]*"', '""', expr))
    return {t for t in tokens if t.startswith("evit_") and ":" not in t} | ({"up"} if "up{" in expr else set())


def selectors(expr: str) -> list[tuple[str, set[str]]]:
    """(metric, label names matched) for every `metric{...}` selector."""
    return [(m, set(re.findall(r"([A-Za-z_]\w*)\s*(?:=~|!~|!=|=)", body)))
            for m, body in re.findall(r"\b(evit_\w+)\{([^}]*)\}", expr)]


def grouping_labels(expr: str) -> set[str]:
    return {lbl.strip() for grp in re.findall(r"\b(?:by|without|on|ignoring)\s*\(([^)]*)\)", expr)
            for lbl in grp.split(",") if lbl.strip()}


@pytest.fixture(scope="module")
def exported(service: dict) -> dict[str, set[str]]:
    """Sample name -> label names, from the live /metrics."""
    text = httpx.get(f"{service['url']}/metrics", timeout=10).text
    labels: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels.setdefault(s.name, set()).update(s.labels)
    return labels


def test_every_metric_the_deployment_uses_is_exported(exported: dict[str, set[str]]) -> None:
    exprs = dashboard_exprs() + alert_exprs()
    used = set().union(*map(metric_names, exprs)) | autoscaling_names()
    assert {"evit_requests_total", "evit_request_duration_seconds_bucket", "evit_tokens_processed_total",
            "evit_batch_size_bucket", "evit_queue_depth", "evit_queue_wait_seconds_bucket"} <= used
    missing = {n for n in used - {"up"} if n not in exported}
    assert not missing, f"used by dashboard/alerts/HPA but not in /metrics: {sorted(missing)}"
    for expr in exprs:
        for metric, matched in selectors(expr):
            assert matched <= exported[metric] | TARGET_LABELS, f"{metric} has no label {matched - exported[metric]}"
        names = metric_names(expr) - {"up"}
        if names:  # (expressions over recording rules only carry the labels their rules kept)
            available = set().union(*(exported[n] for n in names)) | TARGET_LABELS
            assert grouping_labels(expr) <= available, f"grouping by a label no series has, in: {expr}"


# ---------------------------------------------------------------- a real Prometheus


@pytest.fixture(scope="module")
def prometheus(service: dict, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    exe = shutil.which("prometheus")
    if not exe:
        skip_or_fail("prometheus server not installed (Debian package prometheus; docker/ci-tools.sh installs it)")
    tmp = tmp_path_factory.mktemp("prometheus")
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(ALERTS)],
        "scrape_configs": [{"job_name": "evit", "static_configs": [{"targets": [f"127.0.0.1:{service['port']}"]}]}],
    }
    (tmp / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    log = tmp / "prometheus.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [exe, f"--config.file={tmp / 'prometheus.yml'}", f"--storage.tsdb.path={tmp / 'data'}",
             f"--web.listen-address=127.0.0.1:{port}"], stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ok(f"{url}/-/ready", lambda: proc.poll() is None, 60, lambda: log.read_text()[-3000:], request_timeout=2)
        yield url
    finally:
        stop(proc)


def query(prom: str, expr: str) -> list[dict]:
    r = httpx.get(f"{prom}/api/v1/query", params={"query": expr}, timeout=10)
    body = r.json()
    assert r.status_code == 200 and body["status"] == "success", f"{expr}: {body}"
    return body["data"]["result"]


def query_until(prom: str, expr: str, timeout: float = 30.0, ok=bool) -> list[dict]:
    """The query's result once ``ok(result)`` holds (scrapes lag), or the last result at the timeout."""
    deadline = time.monotonic() + timeout
    while not ok(result := query(prom, expr)) and time.monotonic() < deadline:
        time.sleep(0.5)
    return result


def test_prometheus_reads_back_the_latency_histogram(service: dict, prometheus: str) -> None:
    (up,) = query_until(prometheus, 'up{job="evit"} == 1')
    assert up["metric"]["instance"] == f"127.0.0.1:{service['port']}"
    classify(service, KEEP_RATES[0])  # one more, after Prometheus started
    expected = {rate: float(n) for rate, n in service["per_rate"].items()}

    def by_rate(result: list[dict]) -> dict[str, float]:
        return {c["metric"]["keep_rate"]: float(c["value"][1]) for c in result}

    counts = query_until(prometheus, 'evit_request_duration_seconds_count{job="evit",code="200"}',
                         ok=lambda res: by_rate(res) == expected)
    assert by_rate(counts) == expected, "answered requests per keep rate"
    buckets = query(prometheus, 'evit_request_duration_seconds_bucket{job="evit",code="200",le="+Inf"}')
    assert by_rate(buckets) == expected, "the +Inf bucket counts every request"
    p50 = query(prometheus, 'histogram_quantile(0.5, sum by (keep_rate, le) '
                            '(evit_request_duration_seconds_bucket{code="200"}))')
    assert len(p50) == len(KEEP_RATES)
    for series in p50:
        assert 0 < float(series["value"][1]) < 30, series
    (tokens,) = query(prometheus, "sum(evit_tokens_processed_total)")
    assert float(tokens["value"][1]) == service["tokens"], "tokens counted = tokens reported to clients"
    (rejected,) = query(prometheus, 'sum(evit_requests_total{code="422"})')
    assert float(rejected["value"][1]) == 1
    (refused,) = query(prometheus, 'sum(evit_request_duration_seconds_count{code="422"})')
    assert float(refused["value"][1]) == 1, "refusals have durations too"


def test_every_dashboard_query_runs_on_real_data(service: dict, prometheus: str) -> None:
    query_until(prometheus, "evit_requests_total")
    for rate in KEEP_RATES:  # fresh traffic between scrapes, so rate() is not 0/0
        classify(service, rate)
        time.sleep(1.2)  # spacing the traffic across scrapes (generating data, not waiting for a condition)

    def has_data(result: list[dict]) -> bool:
        return bool(result) and not all(math.isnan(float(s["value"][1])) for s in result)

    for expr in dashboard_exprs():
        if expr.startswith("label_values("):
            continue
        concrete = (expr.replace("$__rate_interval", "1m").replace("$model", ".*").replace("$keep_rate", ".*"))
        rejected_only = 'code=~"503|504"' in expr  # nothing was rejected here
        result = query(prometheus, concrete) if rejected_only else query_until(prometheus, concrete, ok=has_data)
        if not rejected_only:
            assert result, f"no data for dashboard query {expr}"
            values = [float(s["value"][1]) for s in result]
            assert not all(math.isnan(v) for v in values), f"only NaN for {expr}"


def test_alert_rules_evaluate_cleanly(prometheus: str) -> None:
    deadline = time.monotonic() + 20
    while True:
        groups = httpx.get(f"{prometheus}/api/v1/rules", timeout=10).json()["data"]["groups"]
        rules = [r for g in groups for r in g["rules"]]
        if rules and all(r.get("lastEvaluation", "").startswith("20") for r in rules):
            break
        assert time.monotonic() < deadline, "rules were never evaluated"
        time.sleep(0.5)
    assert len(rules) == sum(len(g["rules"]) for g in yaml.safe_load(ALERTS.read_text())["groups"])
    bad = {r["name"]: r.get("lastError") for r in rules if r["health"] != "ok"}
    assert not bad, bad
    firing = {r["name"] for r in rules if r["type"] == "alerting" and r["state"] != "inactive"}
    assert not firing, f"a healthy, idle service raised {firing}"
