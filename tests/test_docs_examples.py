"""The curl examples of README.md and docs/*.md, run as written against a live tiny server (only the
host:port is pointed at it, and ``cat.jpg`` is a test JPEG): each must get a 200 answer with predictions.
The load generators' examples of docs/tools.md (evit-loadtest, locust) run against it too, shortened."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from _hostile import encode, noise
from _live import live_server
from conftest import IMAGES

ROOT = Path(__file__).resolve().parents[1]
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.M | re.S)
LOCAL = re.compile(r"(?:http://)?(?:localhost|127\.0\.0\.1):8000")


def curl_examples() -> list[tuple[str, str]]:
    """(where, command) for every curl command in a shell (or untyped) fence that targets a local server."""
    found = []
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for lang, body in FENCE.findall(path.read_text()):
            if lang not in ("", "bash", "sh", "shell", "console"):
                continue
            for command in body.replace("\\\n", " ").splitlines():
                command = command.split(" #")[0].strip()
                if command.startswith("curl ") and LOCAL.search(command):
                    found.append((f"{path.name}: {command[:60]}", command))
    return found


EXAMPLES = curl_examples()


def test_examples_are_found() -> None:
    assert len(EXAMPLES) >= 6, EXAMPLES  # README 1, deploy 1, scheduling 3, service 2


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with live_server(tmp_path_factory.mktemp("docs-server")) as s:
        yield s


@pytest.mark.slow
@pytest.mark.parametrize("command", [c for _, c in EXAMPLES], ids=[w for w, _ in EXAMPLES])
def test_curl_example_works_as_written(server, tmp_path, command: str) -> None:
    (tmp_path / "cat.jpg").write_bytes(encode(noise((64, 48)), "JPEG"))
    argv = shlex.split(LOCAL.sub(server.url, command))
    done = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    body = json.loads(done.stdout)
    assert "error" not in body and body["predictions"], body


LOAD_TOOLS = {"evit-loadtest": [sys.executable, "-m", "service.loadtest"],  # this checkout's, not an installed copy
              "locust": [str(Path(sys.executable).parent / "locust")]}
SHORTER = {"--duration": "1", "--warmup": "0.5", "-t": "3s"}  # the one change: how long they run


def load_examples() -> list[tuple[str, str]]:
    """(where, command) for every load-generator command (evit-loadtest, locust) of docs/tools.md."""
    text = (ROOT / "docs" / "tools.md").read_text()
    found = []
    for _, body in FENCE.findall(text):
        for command in body.replace("\\\n", " ").splitlines():
            command = " ".join(command.split())
            if command.split(" ")[0] in LOAD_TOOLS and LOCAL.search(command):
                found.append((f"tools.md: {command[:50]}", command))
    return found


LOAD_EXAMPLES = load_examples()


def test_load_examples_are_found() -> None:
    assert sorted(c.split()[0] for _, c in LOAD_EXAMPLES) == ["evit-loadtest", "locust"], LOAD_EXAMPLES


@pytest.mark.slow
@pytest.mark.skipif(not IMAGES.is_dir(), reason=f"the sample images are absent ({IMAGES})")
@pytest.mark.parametrize("command", [c for _, c in LOAD_EXAMPLES], ids=[w for w, _ in LOAD_EXAMPLES])
def test_load_example_works_as_written(server, tmp_path, command: str) -> None:
    """Run from the repository root as the docs are; only the run length is cut and the output sent to tmp."""
    tool, *args = shlex.split(LOCAL.sub(server.url, command))
    args = [SHORTER.get(prev, a) for prev, a in zip(["", *args], args, strict=False)]
    if "--output" in args:
        args[args.index("--output") + 1] = str(tmp_path / "out")
    before = metric_total(server.url)
    done = subprocess.run([*LOAD_TOOLS[tool], *args], cwd=ROOT, capture_output=True, text=True, timeout=180,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert metric_total(server.url) - before >= 3  # it did send requests, and the server answered them 200
    if tool == "evit-loadtest":
        assert {"results.json", "results.csv"} <= {p.name for p in (tmp_path / "out").rglob("*")}


def metric_total(url: str) -> float:
    text = subprocess.run(["curl", "-s", url + "/metrics"], capture_output=True, text=True, timeout=30).stdout
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("evit_requests_total{") and 'code="200"' in line)
