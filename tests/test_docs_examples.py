"""The curl examples of README.md and docs/*.md, run as written against a live tiny server (only the
host:port is pointed at it, and ``cat.jpg`` is a test JPEG): each must get a 200 answer with predictions."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
from pathlib import Path

import pytest
from _hostile import encode, noise
from _live import live_server

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
