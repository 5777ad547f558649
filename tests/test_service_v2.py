"""Open Inference Protocol (KServe V2) routes with payloads in the protocol's JSON and binary forms."""

from __future__ import annotations

import base64
import json
import struct

import pytest

pytestmark = pytest.mark.anyio


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


async def test_health_and_metadata(serve, tiny_settings) -> None:
    async with serve(tiny_settings()) as (_, client):
        assert (await client.get("/v2/health/live")).json() == {"live": True}
        assert (await client.get("/v2/health/ready")).json() == {"ready": True}
        assert "binary_tensor_data" in (await client.get("/v2")).json()["extensions"]
        meta = (await client.get("/v2/models/tiny")).json()
        assert meta["name"] == "tiny" and meta["versions"] == ["1"]
        assert meta["inputs"] == [{"name": "image", "datatype": "BYTES", "shape": [-1]}]
        assert {o["name"] for o in meta["outputs"]} == {"probabilities", "classes", "labels", "tokens"}
        assert (await client.get("/v2/models/tiny/ready")).json() == {"name": "tiny", "ready": True}
        r = await client.get("/v2/models/nope")
        assert r.status_code == 404 and r.json()["code"] == "unknown_model" and "nope" in r.json()["error"]
        # outside /v2 the service's own error body stays
        assert (await client.post("/classify?model=nope", content=b"x")).json()["error"] == "unknown_model"
        assert (await client.get("/v2/no-such-route")).json()["code"] == "not_found"
        assert (await client.get("/v2/models/nope/ready")).status_code == 404
        r = await client.get("/v2/models/tiny/versions/7")
        assert r.status_code == 404 and r.json()["code"] == "unknown_version" and "version 1" in r.json()["error"]


async def test_infer_json_matches_classify(serve, tiny_settings, image_bytes) -> None:
    images = [image_bytes(seed=1), image_bytes("PNG", seed=2)]
    payload = {
        "id": "req-7",
        "parameters": {"keep_rate": 0.6, "top_k": 3},
        "inputs": [{"name": "image", "shape": [2], "datatype": "BYTES", "data": [b64(i) for i in images]}],
    }
    async with serve(tiny_settings()) as (app, client):
        r = await client.post("/v2/models/tiny/infer", json=payload)
        assert r.status_code == 200, r.text
        body = r.json()
        assert (body["model_name"], body["model_version"], body["id"]) == ("tiny", "1", "req-7")
        out = {o["name"]: o for o in body["outputs"]}
        assert out["probabilities"]["shape"] == [2, 3] and out["probabilities"]["datatype"] == "FP32"
        assert out["classes"]["datatype"] == "INT64" and out["labels"]["datatype"] == "BYTES"
        tokens = app.state.service.registry.get("tiny").model.cost(0.6).total_tokens
        assert out["tokens"] == {"name": "tokens", "datatype": "INT64", "shape": [2], "data": [tokens, tokens]}
        for n, img in enumerate(images):
            ref = (await client.post("/classify?keep_rate=0.6&top_k=3", content=img)).json()["predictions"]
            assert out["classes"]["data"][3 * n : 3 * n + 3] == [p["class_index"] for p in ref]
            assert out["labels"]["data"][3 * n : 3 * n + 3] == [p["label"] for p in ref]
            assert out["probabilities"]["data"][3 * n : 3 * n + 3] == pytest.approx(
                [p["probability"] for p in ref], abs=1e-5)
        # the requested outputs only; the default keep rate when none is given; nested [1, 1] data
        payload = {"inputs": [{"name": "x", "shape": [1, 1], "datatype": "BYTES", "data": [[b64(images[0])]]}],
                   "outputs": [{"name": "tokens"}]}
        body = (await client.post("/v2/models/tiny/infer", json=payload)).json()
        assert [o["name"] for o in body["outputs"]] == ["tokens"] and body["parameters"]["keep_rate"] == 1.0


async def test_infer_binary_tensor_extension(serve, tiny_settings, image_bytes) -> None:
    images = [image_bytes(seed=3), image_bytes(seed=4)]
    raw = b"".join(struct.pack("<I", len(i)) + i for i in images)  # Triton's BYTES serialisation
    header = json.dumps({
        "inputs": [{"name": "image", "shape": [2], "datatype": "BYTES", "parameters": {"binary_data_size": len(raw)}}],
        "parameters": {"keep_rate": 0.5, "top_k": 2},
        "outputs": [{"name": "classes", "parameters": {"binary_data": False}}],
    }).encode()
    async with serve(tiny_settings()) as (_, client):
        r = await client.post("/v2/models/tiny/infer", content=header + raw, headers={
            "content-type": "application/octet-stream", "inference-header-content-length": str(len(header))})
        assert r.status_code == 200, r.text
        (out,) = r.json()["outputs"]
        for n, img in enumerate(images):
            ref = (await client.post("/classify?keep_rate=0.5&top_k=2", content=img)).json()["predictions"]
            assert out["data"][2 * n : 2 * n + 2] == [p["class_index"] for p in ref]


async def test_binary_outputs_layout(serve, tiny_settings, image_bytes) -> None:
    """``binary_data`` per output, ``binary_data_output`` for the rest: raw little-endian bytes after the header."""
    payload = infer_payload([image_bytes(seed=5)], top_k=2, binary_data_output=True)
    payload["outputs"] = [{"name": "probabilities"}, {"name": "labels"}, {"name": "classes", "parameters":
                                                                         {"binary_data": False}}]
    async with serve(tiny_settings()) as (_, client):
        ref = (await client.post("/v2/models/tiny/infer", json={**payload, "parameters": {"top_k": 2}})).json()
        r = await client.post("/v2/models/tiny/infer", json=payload)
        assert r.status_code == 200 and r.headers["content-type"] == "application/octet-stream"
        split = int(r.headers["inference-header-content-length"])
        header, raw = json.loads(r.content[:split]), r.content[split:]
        probs, labels, classes = header["outputs"]
        assert classes == ref["outputs"][2] and "data" not in probs and "data" not in labels
        n = probs["parameters"]["binary_data_size"]
        assert n == 2 * 4 and len(raw) == n + labels["parameters"]["binary_data_size"]
        assert list(struct.unpack("<2f", raw[:n])) == pytest.approx(ref["outputs"][0]["data"], abs=1e-7)
        names, i = [], n
        while i < len(raw):
            (size,) = struct.unpack("<I", raw[i : i + 4])
            names.append(raw[i + 4 : i + 4 + size].decode())
            i += 4 + size
        assert names == ref["outputs"][1]["data"]


@pytest.mark.parametrize(("payload", "code"), [
    ({"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": ["@@not base64@@"]}]}, 400),
    ({"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": [b64(b"not an image")]}]}, 400),
    ({"inputs": [{"name": "image", "shape": [2], "datatype": "BYTES", "data": ["aGk="]}]}, 422),
    ({"inputs": [{"name": "image", "shape": [1], "datatype": "FP32", "data": [0.5]}]}, 422),
    ({"inputs": "nope"}, 422),
    ({"parameters": {"keep_rate": 0}, "inputs": [{"name": "i", "shape": [1], "datatype": "BYTES", "data": ["aGk="]}]},
     422),
    ({"parameters": {"keep_rate": 1.5}, "inputs": [{"name": "i", "shape": [1], "datatype": "BYTES", "data": ["aGk="]}]},
     422),
    ({"parameters": {"keep_rate": "high"}, "inputs": [{"name": "i", "shape": [1], "datatype": "BYTES",
                                                       "data": ["aGk="]}]}, 422),
    ({"parameters": {"top_k": 99}, "inputs": [{"name": "i", "shape": [1], "datatype": "BYTES", "data": ["aGk="]}]},
     422),
])
async def test_infer_errors(serve, tiny_settings, payload, code) -> None:
    async with serve(tiny_settings()) as (_, client):
        r = await client.post("/v2/models/tiny/infer", json=payload)
        assert r.status_code == code, r.text
        assert r.json()["error"] and r.json()["code"] and r.json()["status"] == code
        r = await client.post("/v2/models/tiny/infer", content=b"{not json")
        assert r.status_code == 400


async def test_infer_counts_in_metrics(serve, tiny_settings, image_bytes) -> None:
    payload = {"parameters": {"keep_rate": 0.7},
               "inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": [b64(image_bytes())]}]}
    async with serve(tiny_settings()) as (_, client):
        for _ in range(2):
            assert (await client.post("/v2/models/tiny/infer", json=payload)).status_code == 200
        text = (await client.get("/metrics")).text
        assert 'evit_requests_total{code="200",keep_rate="0.70",model="tiny"} 2.0' in text


def infer_payload(images: list[bytes], **parameters) -> dict:
    data = [b64(i) for i in images]
    return {"parameters": parameters, "inputs": [{"name": "image", "shape": [len(images)], "datatype": "BYTES",
                                                  "data": data}]}


async def test_infer_takes_the_scheduling_parameters(serve, tiny_settings, image_bytes) -> None:
    from _gate import metric, until
    from test_scheduling_api import slow_model

    images = [image_bytes(seed=1), image_bytes(seed=2)]
    async with serve(tiny_settings(latency_target_ms=10.0)) as (app, client):
        model = app.state.service.registry.get("tiny").model
        r = await client.post("/v2/models/tiny/infer", json=infer_payload(images, keep_rate="auto", deadline_ms=5000))
        assert r.status_code == 200 and r.json()["parameters"]["keep_rates"] == [1.0, 1.0]  # idle: the full model
        await until(app.state.service.batcher.idle)  # every pass of that request learnt
        slow_model(app)  # 50 ms a pass: the 10 ms latency target is out of reach, so auto takes its floor
        r = await client.post("/v2/models/tiny/infer",
                              json=infer_payload(images, keep_rate="auto", min_keep_rate=0.5, priority="high"))
        body = r.json()
        assert r.status_code == 200 and body["parameters"]["keep_rates"] == [0.5, 0.5]
        tokens = next(o for o in body["outputs"] if o["name"] == "tokens")["data"]
        assert tokens == [model.cost(0.5).total_tokens] * 2
        await until(app.state.service.batcher.idle)  # every pass of that request learnt (fast ones): undo that
        slow_model(app)
        # even an idle model needs 50 ms: a 30 ms deadline is refused at once, by parameter or by header
        r = await client.post("/v2/models/tiny/infer", json=infer_payload(images[:1], deadline_ms=30))
        assert r.status_code == 504 and r.json()["code"] == "deadline_unreachable"
        r = await client.post("/v2/models/tiny/infer", json=infer_payload(images[:1], deadline_ms=5000),
                              headers={"X-Deadline-Ms": "30"})  # the smaller counts
        assert r.status_code == 504 and r.json()["code"] == "deadline_unreachable"
        metrics = (await client.get("/metrics")).text
        assert metric(metrics, "evit_auto_keep_rate_count", model="tiny", priority="high") == 2
        assert metric(metrics, "evit_auto_keep_rate_sum", model="tiny", priority="high") == 1.0


@pytest.mark.parametrize(("parameters", "headers", "field"), [
    ({"priority": "urgent"}, {}, "priority"), ({"deadline_ms": 0}, {}, "deadline_ms"),
    ({"deadline_ms": "soon"}, {}, "deadline_ms"), ({"keep_rate": "automatic"}, {}, "keep_rate"),
    ({"keep_rate": "auto", "min_keep_rate": 2}, {}, "min_keep_rate"), ({}, {"X-Deadline-Ms": "nan"}, "X-Deadline-Ms"),
])
async def test_bad_scheduling_parameters_422(serve, tiny_settings, image_bytes, parameters, headers, field) -> None:
    async with serve(tiny_settings()) as (_, client):
        r = await client.post("/v2/models/tiny/infer", json=infer_payload([image_bytes()], **parameters),
                              headers=headers)
        assert r.status_code == 422 and field in r.json()["error"], r.text


def binary_request(images: list[bytes], size_json: str | None = None, trailer: bytes = b"") -> tuple[bytes, str]:
    """A binary-extension body whose binary_data_size is the raw JSON text ``size_json`` (default: the truth)."""
    raw = b"".join(struct.pack("<I", len(i)) + i for i in images)
    size = str(len(raw)) if size_json is None else size_json
    tensor = {"name": "image", "shape": [len(images)], "datatype": "BYTES", "parameters": {"binary_data_size": "@"}}
    header = json.dumps({"inputs": [tensor]}).replace('"@"', size).encode()
    return header + raw + trailer, str(len(header))


@pytest.mark.parametrize("size", ['"abc"', '"1e3"', "[1]", '{"a": 1}', "1e400", "-1", "1.5", "true",
                                  "10000000000000", "1000000000000", "3"])
async def test_malformed_binary_data_size_400(serve, tiny_settings, image_bytes, size) -> None:
    body, length = binary_request([image_bytes()], size)
    async with serve(tiny_settings()) as (_, client):
        r = await client.post("/v2/models/tiny/infer", content=body,
                              headers={"inference-header-content-length": length})
        assert r.status_code == 400 and r.json()["code"] == "bad_binary_data_size", r.text
        assert "binary_data_size" in r.json()["error"]


async def test_binary_sizes_must_match_the_body(serve, tiny_settings, image_bytes) -> None:
    async with serve(tiny_settings()) as (_, client):
        for trailer in (b"x", b"\0" * 1000):  # bytes no input claims: refused, never ignored
            body, length = binary_request([image_bytes()], trailer=trailer)
            r = await client.post("/v2/models/tiny/infer", content=body,
                                  headers={"inference-header-content-length": length})
            assert r.status_code == 400 and f"add up to {len(body) - int(length) - len(trailer)}" in r.text
        body, length = binary_request([image_bytes()])
        for header in ("²", "-1", "+12", " 12", "0x10", str(len(body) + 1), "1" * 400, ""):
            r = await client.post("/v2/models/tiny/infer", content=body,
                                  headers={"inference-header-content-length": header.encode()})  # raw UTF-8
            assert r.status_code == 400 and r.json()["code"] == "bad_header_length", (header, r.text)
        r = await client.post("/v2/models/tiny/infer", content=body,
                              headers={"inference-header-content-length": length})
        assert r.status_code == 200, r.text


async def test_triton_priority_levels(serve, tiny_settings, image_bytes) -> None:
    """Triton's integer priority (what tritonclient's ``priority=`` sends): 1 high, 2 normal, 3 low, 0 default."""
    from _gate import metric

    async with serve(tiny_settings()) as (_, client):
        for level in (1, 3, 3, 0):
            r = await client.post("/v2/models/tiny/infer",
                                  json=infer_payload([image_bytes()], keep_rate="auto", priority=level))
            assert r.status_code == 200, r.text
        text = (await client.get("/metrics")).text
        classes = ("high", "low", "normal")
        runs = {p: metric(text, "evit_auto_keep_rate_count", model="tiny", priority=p) for p in classes}
        assert runs == {"high": 1, "low": 2, "normal": 1}
        for bad in (4, -1, True, 1.0):
            r = await client.post("/v2/models/tiny/infer", json=infer_payload([image_bytes()], priority=bad))
            assert r.status_code == 422 and "priority" in r.json()["error"], bad


async def test_failing_images_report_the_first_in_input_order(serve, tiny_settings, image_bytes) -> None:
    """Of several images that fail, the answer is the first one's error in input order, after every image is
    done: here image 0 (a truncated PNG, refused only once its pixels are decoded) fails well after image 1
    (empty, refused at once), and its error is the one reported."""
    big = image_bytes("PNG", size=(1600, 1600), seed=3)
    truncated = big[: len(big) * 3 // 5]
    payload = {"inputs": [{"name": "image", "shape": [2], "datatype": "BYTES", "data": [b64(truncated), ""]}]}
    async with serve(tiny_settings(decode_threads=2)) as (_, client):
        r = await client.post("/v2/models/tiny/infer", json=payload)
        assert r.status_code == 400 and r.json()["code"] == "undecodable_image", r.text
        r = await client.post("/v2/models/tiny/infer", json={**payload, "inputs": [
            {**payload["inputs"][0], "data": ["", b64(truncated)]}]})
        assert r.status_code == 400 and r.json()["code"] == "empty_body", r.text
