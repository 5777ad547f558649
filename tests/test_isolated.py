"""tests/_isolated.py: an ``isolated`` test runs in a child pytest and passes, fails or skips in the main run
as it did there."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent

MODULE = '''
import os

import pytest


@pytest.mark.isolated
def test_runs_in_the_child():
    assert os.environ.get("EVIT_PYTEST_ISOLATED_CHILD") == "1"


@pytest.mark.isolated
def test_fails_there():
    assert 1 == 2, "boom in the child"


@pytest.mark.isolated
def test_skips_there():
    pytest.skip("no runtime in the child")


def test_not_isolated_runs_here():
    assert "EVIT_PYTEST_ISOLATED_CHILD" not in os.environ
'''


def test_isolated_tests_take_their_child_outcome(tmp_path) -> None:
    (tmp_path / "conftest.py").write_text(
        f"import sys\nsys.path.insert(0, {str(TESTS)!r})\n"
        "from _isolated import pytest_configure, pytest_pyfunc_call  # noqa: F401\n")
    (tmp_path / "test_mod.py").write_text(MODULE)
    env = {k: v for k, v in os.environ.items() if k != "EVIT_PYTEST_ISOLATED_CHILD"}
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rA", "-p", "no:randomly", "-p", "no:cacheprovider",
                           "--rootdir", str(tmp_path), str(tmp_path)], cwd=tmp_path, env=env, capture_output=True,
                          text=True)
    out = done.stdout
    assert done.returncode == 1, out
    assert "PASSED test_mod.py::test_runs_in_the_child" in out
    assert "PASSED test_mod.py::test_not_isolated_runs_here" in out
    assert "FAILED test_mod.py::test_fails_there" in out and "boom in the child" in out
    assert "no runtime in the child" in out and "1 failed, 2 passed, 1 skipped" in out
