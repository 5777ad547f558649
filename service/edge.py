"""Glue between a Starlette request and the service core: the ``Call`` a route hands to ``Service.infer``,
the ``ServiceDep`` dependency, and the request metrics the logging middleware reports once per response."""

from __future__ import annotations

import functools
import re
from typing import Annotated
from urllib.parse import parse_qs

from fastapi import Depends, Request
from starlette.types import Receive, Scope

from service.metrics import NO_MODEL
from service.runtime import Call, Service

_V2_INFER = re.compile(r"^/v2/models/([^/]+)(?:/versions/[^/]+)?/infer$")


async def get_service(request: Request) -> Service:
    return request.app.state.service  # async: a sync dependency would cost a thread-pool hop per request


ServiceDep = Annotated[Service, Depends(get_service)]


def call_of(request: Request) -> Call:
    """What the inference path needs from ``request``: arrival time, disconnect watch, log and metric labels."""
    state = request.state

    def label(model: str, keep_rate: float | None) -> None:
        state.metric_labels = (model, keep_rate)

    return Call(state.started, functools.partial(client_gone, request.receive), state.log, label)


async def client_gone(receive: Receive) -> None:
    """Returns when the client disconnects (the body has been read, so nothing else can arrive)."""
    while (await receive())["type"] != "http.disconnect":
        pass


def count_request(svc: Service, scope: Scope, status: int, seconds: float) -> None:
    """Request metrics for the inference routes (called by the logging middleware once per response)."""
    path = scope["path"]
    name_in_path = _V2_INFER.match(path)
    if path != "/classify" and name_in_path is None:
        return
    state = scope.get("state", {})
    labels = state.get("metric_labels")
    if labels is None:  # refused before the route ran (422): label with the model it named, if hosted
        named = name_in_path.group(1) if name_in_path else _query_param(scope, "model")
        labels = (_hosted_name(svc, named), None)
    svc.metrics.count_request(labels[0], labels[1], status, seconds)


def _hosted_name(svc: Service, name: str | None) -> str:
    """A metric label that only ever holds hosted model names."""
    if svc.registry is None:
        return NO_MODEL
    name = name or svc.registry.default
    return name if name in svc.registry.models else NO_MODEL


def _query_param(scope: Scope, key: str) -> str | None:
    values = parse_qs(scope.get("query_string", b"").decode("latin-1")).get(key)
    return values[0] if values else None
