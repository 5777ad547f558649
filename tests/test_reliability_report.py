"""``make reliability-report`` publishes the rows of every check that records one (the soak: ``make soak``), so
no published row goes stale because its test is left out of the report's run."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_report_runs_every_recording_test() -> None:
    recording = {p.relative_to(ROOT).as_posix() for p in (ROOT / "tests").glob("test_*.py")
                 if re.search(r"^\s+record\(", p.read_text(), re.M)}
    makefile = (ROOT / "Makefile").read_text().replace("\\\n", " ")
    (listed,) = re.findall(r"^RELIABILITY_TESTS \?=(.*)$", makefile, re.M)
    soak = re.search(r"^soak:.*\n((?:\t.*\n)+)", makefile, re.M).group(1)
    assert "tests/test_soak.py" in recording and "tests/test_soak.py" in soak
    assert recording - {"tests/test_soak.py"} == set(listed.split())
