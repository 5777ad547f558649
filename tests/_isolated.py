"""``@pytest.mark.isolated`` tests run in a child pytest process, so the native threads of the sessions they
open (OpenVINO, ONNX Runtime) never live in the main one: a crash or a thread still running at exit stays in
the child. The isolated tests of one module share one child (one torch import, not one per test); each
test passes, fails (with the child's report) or skips in the main run as it did in the child. The hooks
are imported into tests/conftest.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

CHILD = "EVIT_PYTEST_ISOLATED_CHILD"  # set in the child: there the tests run in-process
_OUTCOMES = pytest.StashKey[dict[str, tuple[str, str]]]()


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "isolated: runs in a child pytest process (tests/_isolated.py), so native "
                            "runtime threads (OpenVINO, ONNX Runtime sessions) never live in the main one")


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem: pytest.Function) -> bool | None:
    """An ``isolated`` test's body runs in its module's child pytest; here it takes the child's outcome."""
    if pyfuncitem.get_closest_marker("isolated") is None or os.environ.get(CHILD):
        return None
    run(pyfuncitem)
    return True


def run(item: pytest.Function) -> None:
    """The outcome ``item`` had in its module's child run: returns if it passed, else fails or skips."""
    outcomes = item.session.stash.setdefault(_OUTCOMES, {})
    if item.nodeid not in outcomes:
        outcomes.update(_run_module(item))
    kind, text = outcomes.get(item.nodeid, ("failed", "the child run did not report this test"))
    if kind == "skipped":
        pytest.skip(text)
    if kind != "passed":
        pytest.fail(f"in the isolated child run:\n{text}", pytrace=False)


def _run_module(item: pytest.Function) -> dict[str, tuple[str, str]]:
    """Run every selected isolated test of ``item``'s module in one child pytest; nodeid -> (outcome, text)."""
    items = [i for i in item.session.items if i.path == item.path and i.get_closest_marker("isolated")]
    env = {k: v for k, v in os.environ.items() if k != "EVIT_RELIABILITY_REPORT"} | {CHILD: "1"}
    with tempfile.TemporaryDirectory(prefix="evit-isolated-") as tmp:
        report = Path(tmp) / "junit.xml"
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:randomly",
               f"--junitxml={report}", *(i.nodeid for i in items)]
        done = subprocess.run(cmd, cwd=item.config.rootpath, env=env, capture_output=True, text=True)
        cases = ET.parse(report).getroot().iter("testcase") if report.exists() else ()
        by_name = {case.get("name"): _outcome(case) for case in cases}
    tail = (done.stdout + done.stderr)[-4000:]
    return {i.nodeid: by_name.get(i.name, ("failed", f"no result (exit {done.returncode}):\n{tail}")) for i in items}


def _outcome(case: ET.Element) -> tuple[str, str]:
    for kind, name in (("failure", "failed"), ("error", "failed"), ("skipped", "skipped")):
        found = case.find(kind)
        if found is not None:
            return name, found.get("message", "") if name == "skipped" else (found.text or found.get("message", ""))
    return "passed", ""
