"""Security: bearer tokens (env and file, constant time, deny by default), open and movable endpoints,
no stack traces or paths in answers, request ids in answers and in one JSON log line per request."""

from __future__ import annotations

import json
import logging
from collections import Counter
from datetime import datetime

import httpx
import pytest
from _reliability import LEAK, Tally, record
from pydantic import ValidationError

from service.errors import is_v2
from service.logs import JsonFormatter
from service.settings import Settings

pytestmark = pytest.mark.anyio
TOKEN_ENV = "env-token-0123456789abcdef"
TOKEN_FILE = "file-token-fedcba9876543210"
TALLY = Tally()  # every request this module's tests send (see record_figures)


def tally(client) -> None:
    TALLY.attach(client)


@pytest.fixture(scope="module", autouse=True)
def record_figures():
    """After this module's tests (whichever ran, in any order): their requests, measured by the clients."""
    TALLY.sent, TALLY.codes = 0, Counter()
    yield
    codes = TALLY.codes
    if not TALLY.sent:
        return
    injected = min(1, codes[500])  # the deliberate exception of test_no_stack_traces_...
    record("security", {
        "what": "bearer tokens from env and file (wrong, partial, other schemes, non-ASCII headers), open health/"
                "metrics/docs paths and near misses of them, deny-by-default routes, moved and disabled /metrics "
                "and /docs, an injected unexpected error, request ids (valid, too long, odd characters) in answers "
                "and logs",
        "sent": TALLY.sent, "answered": TALLY.answered, "accepted": codes[200],
        "rejected": sum(n for c, n in codes.items() if 400 <= c < 500) + injected,
        "crashes": sum(n for c, n in codes.items() if c >= 500) - injected, "memory_growth_mb": None,
        "notes": f"by status: {TALLY.by_status()}; the one 500 is the injected exception (generic message, trace "
                 "only in the log)",
    })


def bearer(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


@pytest.fixture
def token_settings(tiny_settings, tmp_path, monkeypatch):
    path = tmp_path / "tokens"
    path.write_text(f"# rotated 2026-01\n\n{TOKEN_FILE}\n")
    monkeypatch.setenv("EVIT_API_TOKENS", f"{TOKEN_ENV}, other-token-000000000000")
    return tiny_settings(api_tokens_file=str(path))


async def test_tokens_guard_every_route_but_health_metrics_and_docs(serve, token_settings, image_bytes, caplog,
                                                                     monkeypatch) -> None:
    import service.auth

    assert len(token_settings.api_tokens) == 3 and TOKEN_ENV not in repr(token_settings)  # secrets stay hidden
    compared = []
    real = service.auth.hmac.compare_digest
    monkeypatch.setattr(service.auth.hmac, "compare_digest", lambda a, b: compared.append(1) or real(a, b))
    caplog.set_level(logging.DEBUG)
    async with serve(token_settings) as (app, client):
        tally(client)
        jpeg = image_bytes()
        for headers in ({}, bearer("wrong-token-0123456789"), {"authorization": f"Basic {TOKEN_ENV}"},
                        bearer(TOKEN_ENV + "x"), bearer(TOKEN_ENV[:-1]), {"authorization": b"Bearer \xe9\xff\x00"}):
            r = await client.post("/classify", content=jpeg, headers=headers)
            assert r.status_code == 401, headers
            body = r.json()
            assert body["error"] == "unauthorized" and body["request_id"] == r.headers["x-request-id"]
            assert r.headers["www-authenticate"].startswith("Bearer")
        for token in (TOKEN_ENV, TOKEN_FILE):
            assert (await client.post("/classify", content=jpeg, headers=bearer(token))).status_code == 200
        compared.clear()
        assert (await client.post("/classify", content=jpeg, headers=bearer(TOKEN_ENV))).status_code == 200
        assert len(compared) == 3  # every configured token compared, even after the first one matched

        for path in ("/healthz", "/readyz", "/metrics", "/docs", "/redoc", "/openapi.json", "/v2/health/live",
                     "/v2/health/ready"):
            assert (await client.get(path)).status_code == 200, path
        for method, path in (("GET", "/models"), ("GET", "/v2/models/tiny"), ("POST", "/v2/models/tiny/infer"),
                             ("GET", "/no-such-route"), ("GET", "/v2")):
            assert (await client.request(method, path)).status_code == 401, path  # deny by default
        assert (await client.get("/models", headers=bearer(TOKEN_FILE))).status_code == 200

        spec = (await client.get("/openapi.json")).json()
        classify = spec["paths"]["/classify"]["post"]
        assert classify["security"] == [{"bearer": []}] and "401" in classify["responses"]
        assert "security" not in spec["paths"]["/healthz"]["get"]
        assert spec["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
        metrics = app.state.service.metrics.render().decode()
        assert 'code="401"' in metrics
    decoded = [line for line in metrics.splitlines() if line.startswith("evit_decode_seconds_count")]
    assert decoded == ['evit_decode_seconds_count{model="tiny"} 3.0']  # refused requests never reached the decoder
    logged = "\n".join(JsonFormatter().format(r) for r in caplog.records)
    assert TOKEN_ENV not in logged and TOKEN_FILE not in logged


NEAR_OPEN = ("/metricsX", "/metrics/x", "/metrics/", "/docs/x", "/docsx", "/docs/", "/redoc/x", "/openapi.jsonx",
             "/openapi.json/x", "/healthzz", "/healthz/", "/healthz/x", "/readyz2", "/HEALTHZ", "/v2/health/livex",
             "/v2/health/ready/x", "/x/healthz", "//healthz")


@pytest.mark.parametrize("metrics_path", ["/metrics", "/internal/metrics"])
async def test_open_paths_match_exactly(serve, token_settings, metrics_path) -> None:
    """A path that only starts or ends like an open one (or differs in case) needs the token like any other."""
    settings = token_settings.model_copy(update={"metrics_path": metrics_path})
    async with serve(settings) as (_, client):
        tally(client)
        for path in (*NEAR_OPEN, metrics_path + "x", metrics_path + "/x", metrics_path.upper()):
            for method in ("GET", "POST"):
                r = await client.request(method, path)
                kind = r.json()["code" if is_v2(path) else "error"]  # V2 bodies: the message in "error"
                assert r.status_code == 401 and kind == "unauthorized", (method, path)
        assert (await client.get(metrics_path)).status_code == 200
        assert (await client.get("/healthz")).status_code == 200


def test_token_settings_fail_clearly(tmp_path, capsys) -> None:
    from service.__main__ import main

    empty = tmp_path / "empty"
    empty.write_text("# nothing\n\n")
    cases = [dict(api_tokens="short"), dict(api_tokens_file=str(tmp_path / "missing")),
             dict(api_tokens_file=str(empty)), dict(api_tokens="t\u00e9st-token-0123456789"),
             dict(metrics_path="metrics"), dict(docs_path="/docs?x")]
    for values in cases:
        with pytest.raises(ValidationError):
            Settings(**values)
    assert main(["--api-tokens-file", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert "cannot read the API tokens file" in err and "Traceback" not in err


async def test_metrics_and_docs_move_or_turn_off(serve, tiny_settings) -> None:
    moved = tiny_settings(metrics_path="/internal/metrics/", docs_path="/internal/docs")
    async with serve(moved) as (_, client):
        tally(client)
        assert (await client.get("/metrics")).status_code == 404 and (await client.get("/docs")).status_code == 404
        r = await client.get("/internal/metrics")
        assert r.status_code == 200 and "evit_ready 1.0" in r.text
        assert (await client.get("/internal/docs")).status_code == 200
    async with serve(tiny_settings(metrics_path="", docs_path="")) as (_, client):
        tally(client)
        for path in ("/metrics", "/docs", "/redoc", "/openapi.json"):
            r = await client.get(path)
            assert r.status_code == 404 and r.json()["error"] == "not_found", path
        assert (await client.get("/healthz")).status_code == 200 and (await client.get("/readyz")).status_code == 200


async def test_no_stack_traces_or_paths_and_request_ids(serve, tiny_settings, image_bytes, caplog,
                                                        monkeypatch) -> None:
    from service.runtime import Service

    caplog.set_level(logging.INFO, logger="service")
    async with serve(tiny_settings()) as (app, client):
        tally(client)
        secret = "/work/main/service/secret_module.py"

        def explode(self, name):
            raise RuntimeError(f"unexpected failure in {secret}")

        monkeypatch.setattr(Service, "model", explode)
        # as a server would: Starlette sends the 500 answer, then re-raises for the server to log
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://svc") as raw:
            tally(raw)
            r = await raw.post("/classify", content=image_bytes(), headers={"x-request-id": "trace-me-1"})
        assert r.status_code == 500 and r.json()["error"] == "internal_error"
        assert secret not in r.text and not LEAK.search(r.text) and r.json()["request_id"] == "trace-me-1"
        monkeypatch.undo()
        for method, path, status in (("GET", "/classify", 405), ("GET", "/nope", 404), ("POST", "/classify?top_k=x",
                                                                                        422)):
            r = await client.request(method, path, content=b"" if method == "POST" else None)
            assert r.status_code == status and r.json()["status"] == status and not LEAK.search(r.text)

        ids = ["client-id.42", "x" * 129, "has space", "semi;colon", ""]
        answers = [await client.post("/classify", content=image_bytes(), headers={"x-request-id": i}) for i in ids]
    assert answers[0].headers["x-request-id"] == "client-id.42"
    for a in answers[1:]:  # unusable ids are replaced, never echoed into headers or logs
        assert len(a.headers["x-request-id"]) == 32 and a.headers["x-request-id"].isalnum()
    access = [r for r in caplog.records if r.name == "service.access" and r.path == "/classify"]
    assert [r.request_id for r in access[-len(ids):]] == [a.headers["x-request-id"] for a in answers]
    crash = [r for r in caplog.records if r.name == "service.errors"]
    assert crash and crash[0].request_id == "trace-me-1" and crash[0].exc_info  # the trace is in the log only
    line = JsonFormatter().format(crash[0])
    assert "\n" not in line and json.loads(line)["request_id"] == "trace-me-1" and secret in line
    for r in access:
        entry = json.loads(JsonFormatter().format(r))
        assert {"request_id", "method", "path", "status", "duration_ms"} <= entry.keys()
        assert entry["level"] == "info" and entry["message"] == f"{entry['method']} /classify {entry['status']}"
        assert datetime.fromisoformat(entry["timestamp"]).tzinfo is not None and "ts" not in entry


async def test_token_edges_and_401_messages(serve, tiny_settings) -> None:
    """Mutation survivors killed: the 16-character minimum is inclusive, '~' is printable, extra spaces after
    the scheme are tolerated, and the 401 says whether the token was missing or wrong."""
    edge = "~" * 16
    with pytest.raises(ValidationError):
        Settings(api_tokens="x" * 15)
    with pytest.raises(ValidationError):
        Settings(api_tokens="x" * 15 + "\x7f")
    async with serve(tiny_settings(api_tokens=edge)) as (_, client):
        tally(client)
        assert (await client.get("/models", headers={"authorization": f"Bearer  {edge}"})).status_code == 200
        missing = await client.get("/models")
        wrong = await client.get("/models", headers=bearer("~" * 17))
        assert missing.status_code == wrong.status_code == 401
        assert missing.json()["message"].startswith("missing bearer token")
        assert wrong.json()["message"].startswith("invalid bearer token")
