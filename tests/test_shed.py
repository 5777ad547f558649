"""Cheap shedding and the upload budget, in process: a full queue is refused before routing or reading the
body (``/classify`` and V2 alike), counted under the labels the route would give, and logged at debug
level; bodies beyond the upload budget get 503; a V2 body is not read when the queue is full."""

from __future__ import annotations

import logging

import pytest
from _gate import metric
from test_service_v2 import infer_payload

pytestmark = pytest.mark.anyio


async def test_full_queue_is_shed_before_the_body_is_read(serve, tiny_settings, image_bytes, caplog) -> None:
    async with serve(tiny_settings(queue_size=4)) as (app, client):
        svc = app.state.service
        q = svc.batcher.queues["tiny"]
        q.admitted = 4  # as if four requests held the queue
        body_reads = 0
        read_body = app.state.uploads.take

        def counting_take(size: int) -> None:
            nonlocal body_reads
            body_reads += 1
            read_body(size)

        app.state.uploads.take = counting_take
        with caplog.at_level(logging.INFO, logger="service.access"):
            r = await client.post("/classify?keep_rate=0.5", content=image_bytes(),
                                  headers={"content-type": "image/jpeg", "x-request-id": "shed-1"})
            v2 = await client.post("/v2/models/tiny/infer", json=infer_payload([image_bytes()]))
        assert r.status_code == 503 and r.json()["error"] == "overloaded" and r.headers["retry-after"]
        assert r.json()["request_id"] == "shed-1" and r.headers["x-request-id"] == "shed-1"
        assert v2.status_code == 503 and v2.json()["code"] == "overloaded" and "overloaded" in v2.json()["error"]
        assert body_reads == 0  # neither body was read
        assert not [rec for rec in caplog.records if rec.name == "service.access"]  # debug level only
        text = (await client.get("/metrics")).text
        assert metric(text, "evit_requests_total", model="tiny", keep_rate="0.50", code="503") == 1
        assert metric(text, "evit_requests_total", model="tiny", keep_rate="none", code="503") == 1
        q.admitted = 0
        r = await client.post("/classify", content=image_bytes(), headers={"content-type": "image/jpeg"})
        assert r.status_code == 200 and body_reads > 0


async def test_upload_budget_refuses_bodies_that_do_not_fit(serve, tiny_settings, image_bytes) -> None:
    body = image_bytes()
    async with serve(tiny_settings(upload_budget_bytes=len(body) - 1)) as (app, client):
        r = await client.post("/classify", content=body, headers={"content-type": "image/jpeg"})
        assert r.status_code == 503 and r.json()["error"] == "uploads_full" and r.headers["retry-after"] == "1"
        assert app.state.uploads.used == 0  # nothing held after the refusal
    async with serve(tiny_settings(upload_budget_bytes=len(body))) as (app, client):
        r = await client.post("/classify", content=body, headers={"content-type": "image/jpeg"})
        assert r.status_code == 200 and app.state.uploads.used == 0


def test_sampled_log_counts_every_event_and_logs_one_line_per_interval(caplog) -> None:
    """The shedder's and the connection guard's log: a flood is counted in full but logged once per interval."""
    from service.logs import SampledLog

    sampled = SampledLog(logging.getLogger("test.sampled"), logging.WARNING, ("refused",), interval_s=3600)
    with caplog.at_level(logging.WARNING, logger="test.sampled"):
        for _ in range(50):
            sampled.note("refused", "guard: %s", "refused", open_connections=3)
        sampled.note("evicted", "guard: %s", "evicted")
    assert sampled.counts == {"refused": 50, "evicted": 1}
    (record,) = caplog.records
    assert record.getMessage() == "guard: refused" and record.refused == 1 and record.open_connections == 3
    every = SampledLog(logging.getLogger("test.sampled"), logging.WARNING, interval_s=0)
    with caplog.at_level(logging.WARNING, logger="test.sampled"):
        for _ in range(3):
            every.note("shed", "shed")
    assert [r.shed for r in caplog.records[1:]] == [1, 2, 3]
