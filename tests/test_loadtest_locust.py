"""locustfile.py against the fake server of test_loadtest_e2e: stats per keep rate, loopback only.

Needs a `locust` executable: ``EVIT_LOCUST``, else the one beside this Python (the project's venv), else on PATH;
skipped without.
"""

import csv
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import skip_or_fail
from test_loadtest_e2e import fake_server

ROOT = Path(__file__).resolve().parents[1]
VENV_LOCUST = Path(sys.executable).parent / "locust"  # the dev extra installs it next to this Python
LOCUST = os.environ.get("EVIT_LOCUST") or (str(VENV_LOCUST) if VENV_LOCUST.exists() else shutil.which("locust"))


@pytest.fixture(autouse=True)
def locust_installed() -> None:
    if LOCUST is None:
        skip_or_fail("locust is not installed (pip install locust, or the dev extra)")


def run_locust(host: str, tmp_path: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [LOCUST, "-f", str(ROOT / "locustfile.py"), "--host", host, "--headless", "--only-summary"]
    cmd += ["-u", "2", "-r", "2", "-t", "2s", "--csv", str(tmp_path / "lc"), *extra]
    return subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)


def test_locust_reports_each_keep_rate(tmp_path):
    with fake_server("--latency", "0.5=0.02,1.0=0.06") as url:
        proc = run_locust(url, tmp_path, "--keep-rates", "0.5:1,1.0:1")
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = {r["Name"]: r for r in csv.DictReader((tmp_path / "lc_stats.csv").open())}
    for rate, injected_ms in (("0.5", 20), ("1.0", 60)):
        row = rows[f"/classify keep_rate={rate}"]
        assert int(row["Request Count"]) > 5 and int(row["Failure Count"]) == 0
        assert injected_ms <= float(row["50%"]) <= injected_ms + 40


def test_locust_refuses_a_remote_host(tmp_path):
    proc = run_locust("http://192.0.2.1:9", tmp_path)  # TEST-NET-1: refused before anything is sent
    assert "--allow-remote" in proc.stdout + proc.stderr
    assert not (tmp_path / "lc_stats.csv").exists() or "keep_rate" not in (tmp_path / "lc_stats.csv").read_text()
