"""The batching contract, observed at the model (forward hooks) and through the API: full batches are exactly
``max_batch_size``, a lone request leaves within ``max_wait``, an expired request is dropped by the queue
without reaching the model, mixed-rate batches count each rate's tokens under its own label, and every
request of a shared pass (``/classify`` or V2) gets its own image's answer, in order."""

from __future__ import annotations

import asyncio
import base64
import time

import pytest
from _gate import Gate, flat_png, hosted_module, level_for, metric, queued, rig_by_brightness, until

from service.exceptions import QueueTimeout
from service.job import Job
from service.metrics import rate_label

pytestmark = pytest.mark.anyio
SLACK_S = 2.0  # how late a lone request may leave after max_wait on a loaded shared machine


def post(client, image: bytes, query: str = ""):
    return asyncio.create_task(client.post(f"/classify?{query}", content=image,
                                           headers={"content-type": "image/png"}))


async def plugged(app, client) -> tuple[Gate, asyncio.Task]:
    """A gate on the model and one request held in its first pass: what is sent next queues up."""
    gate = Gate(app)
    plug = post(client, flat_png(0))
    await until(lambda: gate.passes == 1)
    return gate, plug


async def test_full_batches_are_exactly_max_batch_size(serve, tiny_settings) -> None:
    async with serve(tiny_settings(max_batch_size=4, max_wait_ms=300.0)) as (app, client):
        gate, plug = await plugged(app, client)
        tasks = [post(client, flat_png(10 * i)) for i in range(9)]
        await queued(client, 9)
        gate.open()
        answers = [(await t).json() for t in tasks]
        assert (await plug).status_code == 200
        assert gate.sizes == [1, 4, 4, 1]  # the queue cut at max_batch_size
        assert sorted(a["batch_size"] for a in answers) == [1] + [4] * 8  # (queued in decode-finish order)


async def test_lone_request_leaves_within_max_wait(serve, tiny_settings) -> None:
    max_wait = 0.3
    async with serve(tiny_settings(max_batch_size=16, max_wait_ms=max_wait * 1e3, request_timeout_s=10.0)) as (
            app, client):
        gate = Gate(app)
        gate.open()
        first = await client.post("/classify", content=flat_png(0))  # an idle model runs it at once
        start = time.monotonic()
        r = await client.post("/classify", content=flat_png(1))  # arrives soon after: waits for company
        elapsed = time.monotonic() - start
        assert first.status_code == 200 and r.status_code == 200
        assert gate.sizes == [1, 1]
        queue_s = r.json()["timings"]["queue_ms"] / 1e3
        assert queue_s >= 0.9 * max_wait  # it did wait for company ...
        assert elapsed <= max_wait + SLACK_S  # ... and left when max_wait was up, alone


async def test_expired_request_is_dropped_by_the_queue(serve, tiny_settings) -> None:
    """No handler waits on this request (submitted to the batcher directly): only the queue can drop it."""
    async with serve(tiny_settings(max_wait_ms=0.0)) as (app, client):
        gate, plug = await plugged(app, client)
        svc = app.state.service
        tensor = svc.registry.get("tiny").preprocess(flat_png(200))
        job = Job(1.0, time.monotonic() + 0.2, tensor=tensor)
        ticket = svc.batcher.admit("tiny", job)
        pending = svc.batcher.submit(ticket, job)
        await until(lambda: time.monotonic() > job.deadline + 0.05)
        gate.open()
        with pytest.raises(QueueTimeout, match="timed out waiting in the queue"):  # the edge: 504 (test_service_errors)
            await asyncio.wait_for(pending.future, 10)
        assert (await plug).status_code == 200
        await until(svc.batcher.idle)
        assert gate.sizes == [1]  # the expired request never reached the model
        assert metric((await client.get("/metrics")).text, "evit_queue_depth", model="tiny") == 0


async def test_mixed_batch_counts_tokens_per_rate_and_answers_each_image(serve, tiny_settings) -> None:
    settings = tiny_settings(max_batch_size=8, max_wait_ms=300.0, batch_policy="mixed")
    rates = [0.5, 0.25, 0.5, 1.0, 0.7, 0.25]
    classes = [3, 8, 1, 6, 0, 9]
    async with serve(settings) as (app, client):
        model = hosted_module(app)
        rig_by_brightness(model)
        gate, plug = await plugged(app, client)
        tasks = [post(client, flat_png(level_for(c)), f"keep_rate={r}&top_k=1")
                 for r, c in zip(rates, classes, strict=True)]
        await queued(client, len(rates))
        gate.open()
        answers = [(await t).json() for t in tasks]
        assert (await plug).json()["predictions"][0]["class_index"] == 0
        assert gate.sizes == [1, len(rates)]  # one mixed pass
        assert [a["predictions"][0]["class_index"] for a in answers] == classes
        assert [a["keep_rate"] for a in answers] == rates
        assert [a["tokens"] for a in answers] == [model.cost(r).total_tokens for r in rates]
        expected: dict[str, int] = {}
        for r in [1.0, *rates]:  # the plug ran at the default rate, 1.0
            expected[rate_label(r)] = expected.get(rate_label(r), 0) + model.cost(r).total_tokens
        text = (await client.get("/metrics")).text
        for label, tokens in expected.items():
            assert metric(text, "evit_tokens_processed_total", model="tiny", keep_rate=label) == tokens, label


def v2_payload(classes: list[int], **parameters) -> dict:
    images = [base64.b64encode(flat_png(level_for(c))).decode() for c in classes]
    return {"parameters": parameters,
            "inputs": [{"name": "image", "shape": [len(images)], "datatype": "BYTES", "data": images}]}


async def test_v2_outputs_are_per_image_and_in_order(serve, tiny_settings) -> None:
    classes = [7, 2, 9, 0, 4]
    async with serve(tiny_settings(max_batch_size=8, max_wait_ms=50.0)) as (app, client):
        rig_by_brightness(hosted_module(app))
        gate, plug = await plugged(app, client)
        call = asyncio.create_task(client.post("/v2/models/tiny/infer", json=v2_payload(classes, top_k=2,
                                                                                         keep_rate=0.5)))
        await queued(client, len(classes))
        gate.open()
        r = await call
        assert r.status_code == 200, r.text
        assert (await plug).status_code == 200
        out = {o["name"]: o for o in r.json()["outputs"]}
        assert out["classes"]["shape"] == [5, 2]
        assert out["classes"]["data"][0::2] == classes  # each row's top class is its own image's
        assert out["labels"]["data"][0::2] == [f"class_{c}" for c in classes]
        probs = out["probabilities"]["data"]
        assert all(probs[2 * i] > 0.99 > probs[2 * i + 1] for i in range(len(classes)))
        assert gate.sizes[:2] == [1, len(classes)]  # the images shared a pass: its rows were split back
        # the same images in reverse order answer in reverse order
        r2 = await client.post("/v2/models/tiny/infer", json=v2_payload(classes[::-1], top_k=1))
        (c2,) = [o for o in r2.json()["outputs"] if o["name"] == "classes"]
        assert c2["data"] == classes[::-1]
