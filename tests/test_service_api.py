"""In-process API tests: answers, every error code with its JSON body, batching, readiness and draining."""

from __future__ import annotations

import asyncio
import io

import pytest
from _gate import Gate, metric, until
from _hostile import png_declaring
from PIL import Image

import evit

pytestmark = pytest.mark.anyio


def flat_png(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    Image.new("L", (width, height), 7).save(buf, "PNG")
    assert len(buf.getvalue()) < 10_000  # highly compressible: small body, many pixels
    return buf.getvalue()


async def test_classify_answer(serve, tiny_settings, image_bytes) -> None:
    async with serve(tiny_settings()) as (app, client):
        r = await client.post("/classify?keep_rate=0.5&top_k=3&return_tokens=true", content=image_bytes(),
                              headers={"content-type": "image/jpeg", "x-request-id": "req-42"})
        assert r.status_code == 200 and r.headers["x-request-id"] == "req-42"
        body = r.json()
        model = app.state.service.registry.get("tiny").model
        assert body["model"] == "tiny" and body["keep_rate"] == 0.5
        assert body["tokens"] == model.cost(0.5).total_tokens
        probs = [p["probability"] for p in body["predictions"]]
        assert len(probs) == 3 and probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-6
        assert body["predictions"][0]["label"] == f"class_{body['predictions'][0]['class_index']}"
        assert set(body["timings"]) == {"decode_ms", "queue_ms", "inference_ms", "total_ms"}
        assert body["timings"]["total_ms"] >= body["timings"]["inference_ms"] > 0
        kept = body["kept"]
        assert kept["grid"] == [4, 4] and [s["block"] for s in kept["stages"]] == list(model.evit_cfg.prune_blocks)
        counts = [len(s["patches"]) for s in kept["stages"]]  # ceil(0.5 * n) of the tokens left (16 -> 8 -> ...)
        assert counts[0] == 8 and counts == sorted(counts, reverse=True)
        # multipart upload of the same image gives the same answer; default keep rate is the model's (1.0)
        upload = {"file": ("x.jpg", image_bytes(), "image/jpeg")}
        r2 = await client.post("/classify?keep_rate=0.5&top_k=3", files=upload)
        assert r2.json()["predictions"] == body["predictions"]
        r3 = await client.post("/classify", content=image_bytes())
        assert r3.json()["keep_rate"] == 1.0 and r3.json()["tokens"] == model.cost(1.0).total_tokens
        assert len(r3.headers["x-request-id"]) == 32  # generated when the client sent none


@pytest.mark.parametrize("query", ["keep_rate=0", "keep_rate=1.5", "keep_rate=nan", "keep_rate=abc",
                                   "keep_rate=-0.2", "keep_rate=inf", "top_k=0", "top_k=11"])
async def test_bad_parameters_422(serve, tiny_settings, image_bytes, query) -> None:
    async with serve(tiny_settings()) as (_, client):
        r = await client.post(f"/classify?{query}", content=image_bytes())
        assert r.status_code == 422
        body = r.json()
        assert body["status"] == 422 and body["error"] == "invalid_parameter" and query.split("=")[0] in body["message"]
        assert "Traceback" not in r.text
        assert (await client.get("/healthz")).status_code == 200  # still serving


async def test_error_codes(serve, tiny_settings, image_bytes) -> None:
    settings = tiny_settings(max_body_bytes=60_000, max_image_pixels=1_000_000)
    async with serve(settings) as (_, client):
        jpeg = image_bytes(size=(64, 64))
        cases = [
            (dict(url="/classify?model=nope", content=jpeg), 404, "unknown_model"),
            (dict(url="/nothing-here", content=jpeg), 404, "not_found"),
            (dict(url="/classify", content=b"\x00" * 70_000), 413, "body_too_large"),
            (dict(url="/classify", content=png_declaring(100_000, 100_000)), 413, "image_too_large"),
            (dict(url="/classify", content=flat_png(1100, 1000)), 413, "image_too_large"),  # a real 1.1 MP image
            (dict(url="/classify", content=b"hello", headers={"content-type": "text/plain"}), 415,
             "unsupported_media_type"),
            (dict(url="/classify", content=image_bytes("PCX")), 415, "unsupported_image_format"),
            (dict(url="/classify", content=b"this is not an image"), 400, "undecodable_image"),
            (dict(url="/classify", content=jpeg[: len(jpeg) // 2]), 400, "undecodable_image"),
            (dict(url="/classify", content=b""), 400, "empty_body"),
            (dict(url="/classify", files={"other": ("x.jpg", jpeg, "image/jpeg")}), 422, "missing_file"),
        ]
        for kwargs, code, error in cases:
            r = await client.post(**kwargs)
            assert (r.status_code, r.json()["error"]) == (code, error), kwargs["url"]
            assert r.json()["status"] == code and r.json()["message"] and r.json()["request_id"]
        assert (await client.post("/classify", content=jpeg)).status_code == 200  # still serving


async def test_body_limit_without_content_length(serve, tiny_settings) -> None:
    async def chunks():
        for _ in range(20):
            yield b"\xff" * 10_000

    async with serve(tiny_settings(max_body_bytes=50_000)) as (_, client):
        r = await client.post("/classify", content=chunks())  # chunked: no Content-Length to check up front
        assert r.status_code == 413 and r.json()["error"] == "body_too_large"


async def test_not_ready_until_warm(serve, tiny_settings, image_bytes, monkeypatch) -> None:
    from service.batcher import Batcher

    warm = asyncio.Event()
    original = Batcher.warm_up

    async def slow_warm_up(self) -> None:
        await warm.wait()
        await original(self)

    monkeypatch.setattr(Batcher, "warm_up", slow_warm_up)
    async with serve(tiny_settings(), ready=False) as (_, client):
        r = await client.get("/readyz")
        assert r.status_code == 503 and r.json() == {"ready": False, "draining": False, "models": {"tiny": False}}
        r = await client.post("/classify", content=image_bytes())
        assert r.status_code == 503 and r.json()["error"] == "not_ready" and r.headers["retry-after"] == "1"
        assert (await client.get("/healthz")).status_code == 200
        warm.set()
        for _ in range(200):
            if (await client.get("/readyz")).status_code == 200:
                break
            await asyncio.sleep(0.01)
        assert (await client.post("/classify", content=image_bytes())).status_code == 200


async def test_overload_503_with_retry_after(serve, tiny_settings, image_bytes) -> None:
    async with serve(tiny_settings(queue_size=2, max_wait_ms=0.0, max_batch_size=8)) as (app, client):
        gate = Gate(app)
        batcher = app.state.service.batcher
        first = asyncio.create_task(client.post("/classify", content=image_bytes()))
        await until(lambda: gate.passes == 1)  # running, blocked on the device thread
        queued = [asyncio.create_task(client.post("/classify", content=image_bytes(seed=i))) for i in (1, 2)]
        await until(lambda: len(batcher.queues["tiny"].items) == 2)
        r = await client.post("/classify", content=image_bytes(seed=3))
        assert r.status_code == 503 and r.json()["error"] == "overloaded" and int(r.headers["retry-after"]) >= 1
        gate.open()
        assert [t.status_code for t in await asyncio.gather(first, *queued)] == [200, 200, 200]
        assert (await client.post("/classify", content=image_bytes())).status_code == 200
        text = (await client.get("/metrics")).text
        assert metric(text, "evit_requests_total", model="tiny", code="503") == 1
        assert metric(text, "evit_requests_total", model="tiny", code="200") == 4


async def test_timeout_504_and_not_run(serve, tiny_settings, image_bytes) -> None:
    async with serve(tiny_settings(request_timeout_s=0.3, max_wait_ms=0.0)) as (app, client):
        gate = Gate(app)
        first = asyncio.create_task(client.post("/classify", content=image_bytes()))
        await until(lambda: gate.passes == 1)
        second = await client.post("/classify", content=image_bytes(seed=1))  # queued behind the blocked pass
        assert second.status_code == 504 and second.json()["error"] == "timeout"
        assert (await first).status_code == 504  # its pass was already running: answered 504 all the same
        gate.open()
        await until(lambda: app.state.service.batcher.idle())
        text = (await client.get("/metrics")).text
        assert gate.passes == 1  # the queued request was dropped, never run
        assert metric(text, "evit_batch_size_count", model="tiny") == 1
        assert metric(text, "evit_requests_total", model="tiny", code="504") == 2


async def test_client_gone_is_dropped_before_inference(serve, tiny_settings, image_bytes) -> None:
    async with serve(tiny_settings(max_wait_ms=0.0)) as (app, client):
        gate = Gate(app)
        first = asyncio.create_task(client.post("/classify", content=image_bytes()))
        await until(lambda: gate.passes == 1)
        body = [{"type": "http.request", "body": image_bytes(seed=1), "more_body": False}]
        gone, sent = asyncio.Event(), []

        async def receive():
            if body:
                return body.pop()
            await gone.wait()
            return {"type": "http.disconnect"}

        async def send(message):
            sent.append(message)

        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
                 "scheme": "http", "path": "/classify", "raw_path": b"/classify", "query_string": b"",
                 "root_path": "", "headers": [(b"host", b"svc"), (b"content-type", b"image/jpeg")],
                 "client": ("127.0.0.1", 5000), "server": ("svc", 80)}
        call = asyncio.create_task(app(scope, receive, send))
        await until(lambda: len(app.state.service.batcher.queues["tiny"].items) == 1)
        gone.set()
        await call
        assert sent[0]["status"] == 499
        gate.open()
        assert (await first).status_code == 200
        await until(lambda: app.state.service.batcher.idle())
        assert gate.passes == 1
        text = (await client.get("/metrics")).text
        assert metric(text, "evit_requests_total", model="tiny", code="499") == 1


@pytest.mark.parametrize("options", [{}, evit.ACCURATE], ids=["paper", "accurate"])
async def test_mixed_rates_share_a_batch_and_match_solo(serve, tiny_settings, tiny_model, image_bytes, options) -> None:
    rates = [0.25, 0.5, 0.7, 1.0, 0.5, 0.9]
    model = {**tiny_model, "model_kwargs": {**tiny_model["model_kwargs"], **options}}  # options reach create_model
    settings = tiny_settings(models=[model], max_batch_size=8, max_wait_ms=0.0, batch_policy="mixed")  # gate: batch
    async with serve(settings) as (app, client):
        (info,) = (await client.get("/models")).json()["models"]
        assert info["fusion"] == ("nearest" if options else "one")
        solo = []
        for i, rate in enumerate(rates):
            r = await client.post(f"/classify?keep_rate={rate}&top_k=10", content=image_bytes(seed=i))
            solo.append(r.json())
        gate = Gate(app)
        blocker = asyncio.create_task(client.post("/classify", content=image_bytes(seed=99)))
        await until(lambda: gate.passes == 1)
        tasks = [asyncio.create_task(client.post(f"/classify?keep_rate={rate}&top_k=10", content=image_bytes(seed=i)))
                 for i, rate in enumerate(rates)]
        await until(lambda: len(app.state.service.batcher.queues["tiny"].items) == len(rates))
        gate.open()
        batched = [t.json() for t in await asyncio.gather(*tasks)]
        await blocker
        for alone, together in zip(solo, batched, strict=True):
            assert together["batch_size"] == len(rates) and alone["batch_size"] == 1
            assert together["tokens"] == alone["tokens"]
            for a, b in zip(alone["predictions"], together["predictions"], strict=True):
                assert b["class_index"] == a["class_index"]
                assert b["probability"] == pytest.approx(a["probability"], abs=1e-4)


async def test_metrics_match_requests(serve, tiny_settings, image_bytes) -> None:
    async with serve(tiny_settings()) as (app, client):
        model = app.state.service.registry.get("tiny").model
        for rate, n in ((0.5, 3), (0.62, 2)):
            for i in range(n):
                r = await client.post(f"/classify?keep_rate={rate}", content=image_bytes(seed=i))
                assert r.status_code == 200
        await client.post("/classify?keep_rate=1.5", content=image_bytes())
        await client.post("/classify?model=nope", content=image_bytes())
        await client.post("/classify", content=b"junk")
        text = (await client.get("/metrics")).text
        assert metric(text, "evit_requests_total", model="tiny", keep_rate="0.50", code="200") == 3
        assert metric(text, "evit_requests_total", model="tiny", keep_rate="0.60", code="200") == 2  # bucketed
        assert metric(text, "evit_requests_total", model="tiny", keep_rate="none", code="422") == 1
        assert metric(text, "evit_requests_total", model="none", code="404") == 1
        assert metric(text, "evit_requests_total", model="tiny", keep_rate="1.00", code="400") == 1
        assert metric(text, "evit_request_duration_seconds_count", model="tiny", keep_rate="0.50", code="200") == 3
        for labels in (dict(keep_rate="none", code="422"), dict(model="none", code="404"), dict(code="400")):
            assert metric(text, "evit_request_duration_seconds_count", **{"model": "tiny", **labels}) == 1
        tokens = "evit_tokens_processed_total"
        assert metric(text, tokens, model="tiny", keep_rate="0.50") == 3 * model.cost(0.5).total_tokens
        assert metric(text, tokens, model="tiny", keep_rate="0.60") == 2 * model.cost(0.62).total_tokens
        assert metric(text, "evit_batch_size_sum", model="tiny") == 5
        assert metric(text, "evit_queue_wait_seconds_count", model="tiny") == 5
        assert metric(text, "evit_decode_seconds_count", model="tiny") == 6  # the junk body was decoded too
        assert metric(text, "evit_queue_depth", model="tiny") == 0
        assert metric(text, "evit_ready") == 1


async def test_drain_refuses_new_and_finishes_admitted(serve, tiny_settings, image_bytes) -> None:
    async with serve(tiny_settings(max_wait_ms=0.0)) as (app, client):
        gate = Gate(app)
        admitted = asyncio.create_task(client.post("/classify", content=image_bytes()))
        await until(lambda: gate.passes == 1)
        drained = app.state.service.begin_drain()
        r = await client.get("/readyz")
        assert r.status_code == 503 and r.json()["draining"] is True
        r = await client.post("/classify", content=image_bytes())
        assert r.status_code == 503 and r.json()["error"] == "draining"
        assert not drained.done()
        gate.open()
        assert (await admitted).status_code == 200
        assert await drained is True


async def test_models_and_openapi(serve, tiny_settings) -> None:
    async with serve(tiny_settings()) as (app, client):
        info = (await client.get("/models")).json()
        assert info["default"] == "tiny"
        (m,) = info["models"]
        model = app.state.service.registry.get("tiny").model
        assert m["random_weights"] is True and m["weights"] == "random" and m["input_size"] == [3, 32, 32]
        assert m["prune_blocks"] == list(model.evit_cfg.prune_blocks) and m["num_classes"] == 10
        assert m["fuse"] is True and m["fusion"] == "one"
        assert m["gmacs"]["0.50"] == pytest.approx(model.cost(0.5).gmacs, abs=1e-4)
        assert m["gmacs"]["1.00"] > m["gmacs"]["0.70"] > m["gmacs"]["0.50"]
        spec = (await client.get("/openapi.json")).json()
        responses = spec["paths"]["/classify"]["post"]["responses"]
        for code in ("200", "400", "404", "408", "413", "415", "422", "500", "503", "504"):
            assert code in responses
        assert responses["413"]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorResponse")
        assert "Retry-After" in responses["503"]["headers"]
        assert "multipart/form-data" in spec["paths"]["/classify"]["post"]["requestBody"]["content"]


async def test_several_models(serve, tiny_settings, tiny_model, image_bytes) -> None:
    five = {**tiny_model, "name": "five", "keep_rate": 0.5,
            "model_kwargs": {**tiny_model["model_kwargs"], "num_classes": 5}}
    async with serve(tiny_settings(models=[tiny_model, five])) as (app, client):
        names = [m["name"] for m in (await client.get("/models")).json()["models"]]
        assert names == ["tiny", "five"]
        r = (await client.post("/classify?model=five&top_k=5", content=image_bytes())).json()
        assert r["model"] == "five" and r["keep_rate"] == 0.5 and len(r["predictions"]) == 5
        assert r["tokens"] == app.state.service.registry.get("five").model.cost(0.5).total_tokens
        assert (await client.post("/classify?model=five&top_k=6", content=image_bytes())).status_code == 422
        assert (await client.post("/classify", content=image_bytes())).json()["model"] == "tiny"  # the default


async def test_warm_up_calibrates_each_model_and_exports_its_series(serve, tiny_settings) -> None:
    """Warm-up seeds each model's latency model with the configured safety margin and marks it ready; its
    metric series exist (at 0) before any traffic."""
    async with serve(tiny_settings(latency_safety_z=3.5)) as (app, client):
        q = app.state.service.batcher.queues["tiny"]
        assert q.latency.calibrated and q.latency.z == 3.5 and q.hosted.ready
        text = (await client.get("/metrics")).text
        assert 'evit_queue_depth{model="tiny"} 0.0' in text and 'evit_admitted_requests{model="tiny"} 0.0' in text
