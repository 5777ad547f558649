"""Deadlines, keep_rate=auto and priorities through the HTTP API (tiny model, in process).

Where a test needs exact predictions it replaces the model's latency model with a known line (a pass
takes 50 ms, no safety margin) while the device is held by a gate, so nothing is measured meanwhile.
"""

from __future__ import annotations

import asyncio

import pytest
from _gate import Gate, metric, until

from service.latency import LatencyModel
from service.policy import PassCost

pytestmark = pytest.mark.anyio

PASS_S = 0.05


def slow_model(app) -> LatencyModel:
    """Install a latency model predicting PASS_S per pass (whatever the batch) with no margin."""
    q = app.state.service.batcher.queues["tiny"]
    q.scheduler.latency = LatencyModel.from_warmup(PassCost(PASS_S, 1e-9), 1.0, 2, z=0.0)
    return q.scheduler.latency


async def test_auto_reports_the_rate_it_chose(serve, tiny_settings, image_bytes) -> None:
    async with serve(tiny_settings(latency_target_ms=10.0)) as (app, client):
        model = app.state.service.registry.get("tiny").model
        r = await client.post("/classify?keep_rate=auto&deadline_ms=5000", content=image_bytes())
        assert r.status_code == 200 and r.json()["keep_rate"] == 1.0  # idle, ample deadline: the full model
        q = app.state.service.batcher.queues["tiny"]
        await until(lambda: q.latency.passes == 1)  # learnt just after the answer: not into the model below
        slow_model(app)  # 50 ms a pass: a 10 ms latency target is out of reach, so auto takes its floor
        r = await client.post("/classify?keep_rate=auto&min_keep_rate=0.5", content=image_bytes())
        body = r.json()
        assert r.status_code == 200 and body["keep_rate"] == 0.5 and body["tokens"] == model.cost(0.5).total_tokens
        for _ in range(200):  # a batch's time is recorded just after its answers go out
            metrics = (await client.get("/metrics")).text
            if metric(metrics, "evit_batch_measured_seconds_count", model="tiny") == 2:
                break
            await asyncio.sleep(0.01)
        assert metric(metrics, "evit_auto_keep_rate_count", model="tiny", priority="normal") == 2
        assert metric(metrics, "evit_auto_keep_rate_sum", model="tiny", priority="normal") == 1.5
        assert metric(metrics, "evit_requests_total", model="tiny", keep_rate="0.50", code="200") == 1
        batches = metric(metrics, "evit_batch_measured_seconds_count", model="tiny")
        assert batches == 2 == metric(metrics, "evit_batch_predicted_seconds_count", model="tiny")
        assert metric(metrics, "evit_latency_model_overhead_seconds", model="tiny") > 0
        info = (await client.get("/models")).json()["models"][0]["latency_model"]
        assert info["calibrated"] and info["passes_observed"] >= 1 and info["max_batch_size"] == 16
        slope = metric(metrics, "evit_latency_model_seconds_per_gmac", model="tiny")
        assert slope * 1e3 == pytest.approx(info["ms_per_gmac"], abs=1e-4)  # no traffic since: the same fit
        assert metric(metrics, "evit_latency_model_relative_error", model="tiny") == pytest.approx(
            info["relative_error"], abs=1e-4)
        assert info["predicted_batch_ms"]["1.00"] >= info["predicted_batch_ms"]["0.25"] > 0


async def test_deadline_refused_at_once_when_it_cannot_be_met(serve, tiny_settings, image_bytes) -> None:
    async with serve(tiny_settings(max_batch_size=1)) as (app, client):
        gate = Gate(app)

        def post(query: str = "", **headers: str):
            return asyncio.create_task(client.post(f"/classify?{query}", content=image_bytes(), headers=headers))

        held = [post()]
        await until(lambda: gate.passes == 1)
        slow_model(app)
        held += [post() for _ in range(3)]  # three 50 ms passes queued behind the held one
        q = app.state.service.batcher.queues["tiny"]
        await until(lambda: len(q.items) == 3)
        busy = await post("deadline_ms=120")  # predicted to finish in 4 x 50 ms
        assert busy.status_code == 503 and busy.json()["error"] == "deadline_unreachable"
        assert int(busy.headers["retry-after"]) >= 1 and "3 requests queued" in busy.json()["message"]
        header = await post(**{"X-Deadline-Ms": "120"})
        assert header.status_code == 503 and header.json()["error"] == "deadline_unreachable"
        both = await post("deadline_ms=5000", **{"X-Deadline-Ms": "120"})  # the smaller counts
        assert both.status_code == 503
        hopeless = await post("deadline_ms=30&keep_rate=auto&min_keep_rate=0.1")  # even alone: 50 ms
        assert hopeless.status_code == 504 and hopeless.json()["error"] == "deadline_unreachable"
        held.append(post("deadline_ms=5000"))  # room enough: accepted
        await until(lambda: len(q.items) == 4)
        gate.open()
        assert [r.status_code for r in await asyncio.gather(*held)] == [200] * 5
        metrics = (await client.get("/metrics")).text
        refused = metric(metrics, "evit_deadline_refused_total", model="tiny", priority="normal", stage="admission")
        assert refused == 4
        assert metric(metrics, "evit_requests_total", model="tiny", keep_rate="1.00", code="503") == 3
        assert metric(metrics, "evit_requests_total", model="tiny", keep_rate="none", code="504") == 1


async def test_high_priority_runs_first_and_low_gets_part_of_the_queue(serve, tiny_settings, image_bytes) -> None:
    settings = tiny_settings(max_batch_size=1, queue_size=4, low_priority_queue_share=0.5)
    async with serve(settings) as (app, client):
        gate = Gate(app)
        done: list[str] = []

        def post(name: str, priority: str) -> asyncio.Task:
            async def send():
                r = await client.post(f"/classify?priority={priority}", content=image_bytes())
                done.append(name)
                return r
            return asyncio.create_task(send())

        tasks = [post("held", "normal")]
        await until(lambda: gate.passes == 1)
        q = app.state.service.batcher.queues["tiny"]
        for name, priority in (("low1", "low"), ("low2", "low")):
            tasks.append(post(name, priority))
            queued = len(tasks) - 1
            await until(lambda n=queued: len(q.items) == n)
        refused = await client.post("/classify?priority=low", content=image_bytes())  # low's half is full
        assert refused.status_code == 503 and "low-priority" in refused.json()["message"]
        for name, priority in (("high", "high"), ("normal", "normal")):
            tasks.append(post(name, priority))
            queued = len(tasks) - 1
            await until(lambda n=queued: len(q.items) == n)
        assert [p.priority for p in q.items] == [0, 1, 2, 2]  # run order: high, normal, low, low
        gate.open()
        assert all(r.status_code == 200 for r in await asyncio.gather(*tasks))
        assert done == ["held", "high", "normal", "low1", "low2"]


async def test_deadline_cuts_the_batch_wait(serve, tiny_settings, image_bytes) -> None:
    # A 2 s max wait would make these 600 ms-deadline requests time out (504) waiting for company.
    async with serve(tiny_settings(max_wait_ms=2000.0, max_batch_size=8)) as (_, client):
        first = await client.post("/classify", content=image_bytes())  # runs at once (no arrival history)
        assert first.status_code == 200
        rs = await asyncio.gather(*(client.post("/classify?deadline_ms=600", content=image_bytes())
                                    for _ in range(2)))
        assert [r.status_code for r in rs] == [200, 200]
        assert all(r.json()["timings"]["queue_ms"] < 600 for r in rs)


@pytest.mark.parametrize("query, headers, field", [
    ("min_keep_rate=0", {}, "min_keep_rate"), ("min_keep_rate=1.5", {}, "min_keep_rate"),
    ("priority=urgent", {}, "priority"), ("deadline_ms=0", {}, "deadline_ms"), ("deadline_ms=nan", {}, "deadline_ms"),
    ("keep_rate=automatic", {}, "keep_rate"), ("", {"X-Deadline-Ms": "soon"}, "X-Deadline-Ms"),
])
async def test_bad_scheduling_parameters_422(serve, tiny_settings, image_bytes, query, headers, field) -> None:
    async with serve(tiny_settings()) as (_, client):
        r = await client.post(f"/classify?{query}", content=image_bytes(), headers=headers)
        assert r.status_code == 422 and r.json()["error"] == "invalid_parameter" and field in r.json()["message"]


async def test_openapi_documents_the_scheduling_parameters(serve, tiny_settings) -> None:
    async with serve(tiny_settings(), ready=False) as (_, client):
        op = (await client.get("/openapi.json")).json()["paths"]["/classify"]["post"]
        params = {p["name"]: p for p in op["parameters"]}
        assert {"keep_rate", "min_keep_rate", "deadline_ms", "priority", "X-Deadline-Ms"} <= set(params)
        assert params["X-Deadline-Ms"]["in"] == "header"
        assert {"const": "auto", "type": "string"} in params["keep_rate"]["schema"]["anyOf"]
        assert params["priority"]["schema"]["enum"] == ["high", "normal", "low"]
        assert all("deadline" in op["responses"][code]["description"] for code in ("503", "504"))


async def test_models_answers_before_the_latency_model_is_calibrated(serve, tiny_settings) -> None:
    async with serve(tiny_settings(warmup=False)) as (_app, client):  # nothing measured yet: no predictions
        r = await client.get("/models")
        assert r.status_code == 200
        info = r.json()["models"][0]["latency_model"]
        assert not info["calibrated"] and info["predicted_batch_ms"] is None and info["max_batch_size"] == 16
