"""The core raises its own exceptions (service.exceptions); service.errors maps them to HTTP in one place."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from service import exceptions as core
from service.errors import CLIENT_GONE, api_error

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(("error", "status", "code", "headers"), [
    (core.NotReady("loading"), 503, "not_ready", {"Retry-After": "1"}),
    (core.Draining("bye"), 503, "draining", {"Retry-After": "1"}),
    (core.Overloaded("full", 7), 503, "overloaded", {"Retry-After": "7"}),
    (core.OutOfMemory("oom"), 503, "out_of_memory", {"Retry-After": "1"}),
    (core.DeadlineUnreachable("busy", 3), 503, "deadline_unreachable", {"Retry-After": "3"}),
    (core.DeadlineUnreachable("too tight"), 504, "deadline_unreachable", {}),
    (core.QueueTimeout("late"), 504, "timeout", {}),
    (core.UnknownModel("who"), 404, "unknown_model", {}),
    (core.InvalidRequest("top_k"), 422, "invalid_parameter", {}),
    (core.InferenceFailed("boom"), 500, "inference_failed", {}),
    (core.ClientGone("left"), CLIENT_GONE, "client_closed_request", {}),
])
def test_each_core_exception_has_one_http_answer(error, status, code, headers) -> None:
    answer = api_error(error)
    assert (answer.status, answer.error, answer.headers, answer.message) == (status, code, headers, error.message)


CORE = ("scheduler", "batcher", "modelqueue", "registry", "runtime", "worker", "policy", "latency")


@pytest.mark.parametrize("module", CORE)
def test_the_core_speaks_no_http(module: str) -> None:
    """No core module imports the HTTP edge (errors, fastapi, starlette); the worker reports no metrics."""
    tree = ast.parse((ROOT / "service" / f"{module}.py").read_text())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    edge = {"service.errors", "service.edge", "service.app", "service.v2", "fastapi", "starlette"}
    assert not {m for m in imported if (m and m.split(".")[0] in {"fastapi", "starlette"}) or m in edge}
    if module == "worker":
        assert "service.metrics" not in imported
