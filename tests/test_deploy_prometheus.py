"""Prometheus configuration, alert rules (promtool) and the Grafana dashboard and provisioning."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import yaml
from conftest import skip_or_fail

ROOT = Path(__file__).resolve().parents[1]
PROM = ROOT / "docker" / "prometheus"
GRAFANA = ROOT / "docker" / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "evit-serve.json"


def promtool(*args: str, cwd: Path = PROM) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("promtool")
    if not exe:
        skip_or_fail("promtool not installed (Debian package prometheus; docker/ci-tools.sh installs it)")
    return subprocess.run([exe, *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def test_promtool_check_config() -> None:
    out = promtool("check", "config", "prometheus.yml")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS" in out.stdout + out.stderr


def test_alert_rules_unit_tests() -> None:
    out = promtool("test", "rules", "alerts.test.yml")
    assert out.returncode == 0, out.stdout + out.stderr


def test_alert_rules_cover_the_required_cases() -> None:
    groups = yaml.safe_load((PROM / "alerts.yml").read_text())["groups"]
    alerts = {r["alert"]: r for g in groups for r in g["rules"] if "alert" in r}
    assert {"EvitP99LatencyHigh", "EvitRejectionRateHigh", "EvitServiceDown", "EvitServiceAbsent"} <= set(alerts)
    tests = yaml.safe_load((PROM / "alerts.test.yml").read_text())["tests"]
    tested = {t["alertname"] for case in tests for t in case.get("alert_rule_test", []) if t["exp_alerts"]}
    assert tested == set(alerts), f"alerts never seen firing in alerts.test.yml: {set(alerts) - tested}"
    for name, rule in alerts.items():
        assert rule["labels"]["severity"] in ("warning", "critical"), name
        assert rule["annotations"]["summary"], name


def test_k8s_scrape_config_relabelling(tmp_path: Path) -> None:
    """The in-cluster scrape job, with its Kubernetes discovery swapped for a static target: Debian's
    promtool is built without kubernetes_sd, the relabelling (which prometheus-adapter relies on) is
    checked all the same."""
    cfg = yaml.safe_load((ROOT / "docker" / "k8s" / "prometheus-adapter" / "prometheus-scrape.yml").read_text())
    (job,) = cfg["scrape_configs"]
    assert job["job_name"] == "evit", "alerts.yml selects up{job=\"evit\"}"
    targets = {r["target_label"] for r in job["relabel_configs"] if "target_label" in r}
    assert {"namespace", "pod"} <= targets, "prometheus-adapter maps these labels to Kubernetes objects"
    assert job.pop("kubernetes_sd_configs")[0]["role"] == "pod"
    job["static_configs"] = [{"targets": ["127.0.0.1:8000"]}]
    (tmp_path / "p.yml").write_text(yaml.safe_dump(cfg))
    out = promtool("check", "config", "p.yml", cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr


# ---------------------------------------------------------------- Grafana


def panels() -> list[dict]:
    return json.loads(DASHBOARD.read_text())["panels"]


def test_dashboard_layout() -> None:
    dash = json.loads(DASHBOARD.read_text())
    assert dash["uid"] == "evit-serve"
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    cells: set[tuple[int, int]] = set()
    for p in dash["panels"]:
        g = p["gridPos"]
        assert g["x"] >= 0 and g["w"] > 0 and g["x"] + g["w"] <= 24, p["title"]
        mine = {(g["x"] + dx, g["y"] + dy) for dx in range(g["w"]) for dy in range(g["h"])}
        assert not cells & mine, f"panel {p['title']!r} overlaps another"
        cells |= mine
    names = {v["name"] for v in dash["templating"]["list"]}
    assert {"datasource", "model", "keep_rate"} <= names


def test_dashboard_has_the_required_panels() -> None:
    graphs = [p for p in panels() if p["type"] != "row"]
    exprs = {p["title"]: " ".join(t["expr"] for t in p["targets"]) for p in graphs}

    def titled(*words: str) -> list[str]:
        return [e for t, e in exprs.items() if all(w in t.lower() for w in words)]

    assert any("evit_requests_total" in e for e in titled("request rate"))
    for q in ("p50", "p95", "p99"):
        (e,) = titled(q, "latency", "keep rate")
        assert "evit_request_duration_seconds_bucket" in e and "keep_rate" in e
    (e,) = titled("tokens", "keep rate")
    assert "rate(evit_tokens_processed_total" in e and "by (keep_rate)" in e
    assert any("evit_batch_size" in e for e in titled("batch size"))
    assert any("evit_queue_depth" in e for e in titled("queue depth"))
    assert any("evit_queue_wait_seconds" in e for e in titled("queue wait"))
    assert any('code=~"503|504"' in e for e in titled("rejections"))
    for p in graphs:
        assert p["datasource"]["uid"] == "${datasource}", p["title"]
        for t in p["targets"]:
            assert t["datasource"]["uid"] == "${datasource}", p["title"]


def test_grafana_provisioning_points_at_the_stack() -> None:
    (ds,) = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text())["datasources"]
    assert ds["type"] == "prometheus" and ds["url"] == "http://prometheus:9090"
    dash = json.loads(DASHBOARD.read_text())
    (var,) = [v for v in dash["templating"]["list"] if v["name"] == "datasource"]
    assert var["current"]["value"] == ds["uid"]
    (prov,) = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "evit.yml").read_text())["providers"]
    compose = yaml.safe_load((ROOT / "docker" / "compose.yaml").read_text())
    mounts = dict(v.split(":")[:2] for v in compose["services"]["grafana"]["volumes"])
    assert mounts["./grafana/dashboards"] == prov["options"]["path"]
    assert mounts["./grafana/provisioning"] == "/etc/grafana/provisioning"
    prometheus = compose["services"]["prometheus"]
    assert "./prometheus:/etc/prometheus:ro" in prometheus["volumes"]
    assert "--config.file=/etc/prometheus/prometheus.yml" in prometheus["command"]
