"""The core raises its own exceptions (service.exceptions); service.errors maps them to HTTP in one place."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from service import exceptions as core
from service.errors import CLIENT_GONE, api_error

ROOT = Path(__file__).resolve().parents[1]


CASES = [
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
]


@pytest.mark.parametrize(("error", "status", "code", "headers"), CASES)
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


def test_inference_routes_document_every_core_answer(tiny_settings) -> None:
    """Both inference routes run ``Service.infer``, so each can answer every core exception's status (the
    client-gone 499 is never seen by a client): their OpenAPI entries list each one, in their error body."""
    from service.app import create_app

    spec = create_app(tiny_settings()).openapi()
    statuses = {str(status) for _, status, _, _ in CASES if status != CLIENT_GONE}
    for path, body in (("/classify", "ErrorResponse"), ("/v2/models/{model_name}/infer", "V2ErrorResponse")):
        responses = spec["paths"][path]["post"]["responses"]
        assert statuses <= set(responses), (path, statuses - set(responses))
        for status in statuses:
            assert responses[status]["content"]["application/json"]["schema"]["$ref"].endswith("/" + body)
