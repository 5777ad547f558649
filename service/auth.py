"""Optional bearer-token authentication: deny by default, a short allow-list of open paths.

With tokens configured (``EVIT_API_TOKENS`` or ``--api-tokens-file``), every request needs
``Authorization: Bearer <token>`` except the health endpoints (orchestrators probe them without
credentials), ``/metrics`` and the docs (each of those can be moved or turned off instead). New routes
are protected without anyone remembering to. Tokens are compared in constant time (``hmac.compare_digest``,
against every configured token, so the answer time does not say which one nearly matched) and never logged.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from service.errors import error_response, is_v2

MIN_TOKEN_LENGTH = 16
HEALTH_PATHS = frozenset({"/healthz", "/readyz", "/v2/health/live", "/v2/health/ready"})
CHALLENGE = {"WWW-Authenticate": 'Bearer realm="evit-serve"'}
UNAUTHORIZED_DOC = {
    "description": "A bearer token is required (the service was started with API tokens) and was missing or wrong.",
    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}},
}
V2_UNAUTHORIZED_DOC = {**UNAUTHORIZED_DOC,
                       "content": {"application/json": {"schema": {"$ref": "#/components/schemas/V2ErrorResponse"}}}}


def read_token_file(path: Path) -> list[str]:
    """Tokens from ``path``: one a line; blank lines and ``#`` comments skipped."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read the API tokens file {path}: {e}") from e
    tokens = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not tokens:
        raise ValueError(f"the API tokens file {path} holds no tokens")
    return tokens


def check_tokens(tokens: Iterable[str]) -> list[str]:
    """Distinct tokens, each long enough and sendable in a header (printable ASCII, no spaces)."""
    out: list[str] = []
    for t in tokens:
        if len(t) < MIN_TOKEN_LENGTH:
            raise ValueError(f"API tokens must be at least {MIN_TOKEN_LENGTH} characters (one has {len(t)})")
        if not all(33 <= ord(c) <= 126 for c in t):
            raise ValueError("API tokens may only hold printable ASCII characters without spaces")
        if t not in out:
            out.append(t)
    return out


class BearerAuth:
    """Pure ASGI middleware: 401 with the service's JSON error body unless the path is open or the token matches."""

    def __init__(self, app: ASGIApp, tokens: Iterable[str], open_paths: Iterable[str]) -> None:
        self.app = app
        self.tokens = [t.encode("ascii") for t in tokens]
        self.open_paths = frozenset(open_paths)

    def allowed(self, authorization: bytes) -> bool:
        scheme, _, given = authorization.partition(b" ")
        if scheme.lower() != b"bearer":
            return False
        given = given.strip()
        matched = False
        for token in self.tokens:  # no early exit: every token is compared
            matched |= hmac.compare_digest(given, token)
        return matched

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in self.open_paths:
            await self.app(scope, receive, send)
            return
        authorization = dict(scope["headers"]).get(b"authorization")
        if authorization is not None and self.allowed(authorization):
            await self.app(scope, receive, send)
            return
        message = "missing bearer token" if authorization is None else "invalid bearer token"
        response = error_response(Request(scope), 401, "unauthorized",
                                  f"{message}: send 'Authorization: Bearer <token>'", dict(CHALLENGE))
        await response(scope, receive, send)


def open_paths(app: FastAPI, metrics_path: str) -> set[str]:
    """Health, metrics and docs paths of ``app``: reachable without a token."""
    docs = {app.docs_url, app.redoc_url, app.openapi_url, app.swagger_ui_oauth2_redirect_url}
    return {p for p in (*HEALTH_PATHS, metrics_path, *docs) if p}


def protect(app: FastAPI, tokens: Iterable[str], metrics_path: str) -> None:
    """Require a bearer token on every route but the open ones, and say so in the OpenAPI document."""
    free = open_paths(app, metrics_path)
    app.add_middleware(BearerAuth, tokens=list(tokens), open_paths=free)
    app.openapi = _documented(app.openapi, free)  # type: ignore[method-assign]


def _documented(build: Callable[[], dict[str, Any]], free: set[str]) -> Callable[[], dict[str, Any]]:
    def openapi() -> dict[str, Any]:
        spec = build()
        if "bearer" in spec.get("components", {}).get("securitySchemes", {}):
            return spec  # already documented (FastAPI caches the document)
        spec.setdefault("components", {}).setdefault("securitySchemes", {})["bearer"] = {
            "type": "http", "scheme": "bearer"}
        for path, operations in spec.get("paths", {}).items():
            if path in free:
                continue
            for operation in operations.values():
                operation["security"] = [{"bearer": []}]
                operation.setdefault("responses", {})["401"] = V2_UNAUTHORIZED_DOC if is_v2(path) else UNAUTHORIZED_DOC
        return spec

    return openapi
