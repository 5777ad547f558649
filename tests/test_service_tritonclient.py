"""NVIDIA's ``tritonclient[http]`` against a real uvicorn server (a thread of this process, 127.0.0.1): health,
metadata, Triton's model configuration, binary and JSON inference (the classes ``/classify`` gives), and a bad
image whose message reaches the client's exception."""

from __future__ import annotations

import base64
from collections.abc import Iterator

import httpx
import numpy as np
import pytest
import tritonclient.http as httpclient
from _live import thread_server
from conftest import TINY_MODEL
from fastapi import FastAPI
from tritonclient.utils import InferenceServerException

from service.app import create_app
from service.settings import Settings

TOP_K = 3


@pytest.fixture(scope="module")
def server() -> Iterator[tuple[str, httpclient.InferenceServerClient, FastAPI]]:
    settings = Settings(models=[TINY_MODEL], device="cpu", torch_threads=1, max_batch_size=8, max_wait_ms=3.0)
    app = create_app(settings)
    with thread_server(app) as url:
        client = httpclient.InferenceServerClient(url.removeprefix("http://"))
        yield url, client, app
        client.close()


def images_input(images: list[bytes], binary: bool) -> httpclient.InferInput:
    """Raw bytes with the binary data extension; base64 strings in JSON (the service's JSON form of BYTES)."""
    tensor = httpclient.InferInput("image", [len(images)], "BYTES")
    data = images if binary else [base64.b64encode(i).decode() for i in images]
    tensor.set_data_from_numpy(np.array(data, dtype=np.object_), binary_data=binary)
    return tensor


def classify(url: str, image: bytes, keep_rate: float) -> list[int]:
    return [p["class_index"] for p in predictions(url, image, keep_rate)]


def predictions(url: str, image: bytes, keep_rate: float) -> list[dict]:
    r = httpx.post(f"{url}/classify", params={"keep_rate": keep_rate, "top_k": TOP_K}, content=image, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()["predictions"]


def test_health_metadata_and_config(server) -> None:
    _, client, _ = server
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("tiny")
    assert "binary_tensor_data" in client.get_server_metadata()["extensions"]
    meta = client.get_model_metadata("tiny")
    assert meta["inputs"] == [{"name": "image", "datatype": "BYTES", "shape": [-1]}]
    config = client.get_model_config("tiny")
    assert (config["name"], config["max_batch_size"]) == ("tiny", 8)
    assert config["input"] == [{"name": "image", "data_type": "TYPE_STRING", "dims": [1]}]
    types = {o["name"]: (o["data_type"], o["dims"]) for o in config["output"]}
    assert types == {"probabilities": ("TYPE_FP32", [-1]), "classes": ("TYPE_INT64", [-1]),
                     "labels": ("TYPE_STRING", [-1]), "tokens": ("TYPE_INT64", [1])}
    assert config["dynamic_batching"] == {"preferred_batch_size": [8], "max_queue_delay_microseconds": 3000,
                                          "priority_levels": 3, "default_priority_level": 2}
    assert config["instance_group"][0]["kind"] == "KIND_CPU"
    with pytest.raises(InferenceServerException) as e:
        client.get_model_config("nope")
    assert e.value.status() == "404" and "nope" in e.value.message()


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_infer_matches_classify(server, image_bytes, binary: bool) -> None:
    url, client, _ = server
    images = [image_bytes(seed=11), image_bytes("PNG", seed=12)]
    outputs = [httpclient.InferRequestedOutput(n, binary_data=binary) for n in ("classes", "probabilities", "labels")]
    result = client.infer("tiny", [images_input(images, binary)], outputs=outputs, priority=1 if binary else 3,
                          parameters={"keep_rate": 0.6, "top_k": TOP_K})  # Triton's priority levels
    body = result.get_response()
    for name in ("classes", "probabilities", "labels"):
        out = result.get_output(name)
        assert ("binary_data_size" in (out.get("parameters") or {})) is binary and ("data" in out) is not binary
    classes, probs = result.as_numpy("classes"), result.as_numpy("probabilities")
    assert classes.shape == probs.shape == (2, TOP_K) and probs.dtype == np.float32
    assert np.all(np.diff(probs, axis=1) <= 0) and body["parameters"]["keep_rates"] == [0.6, 0.6]
    assert result.as_numpy("labels").shape == (2, TOP_K)
    for n, image in enumerate(images):
        ref = predictions(url, image, 0.6)
        assert classes[n].tolist() == [p["class_index"] for p in ref]
        assert probs[n] == pytest.approx([p["probability"] for p in ref], abs=1e-6)  # float32 both ways


def test_infer_without_outputs_is_all_binary(server, image_bytes) -> None:
    """tritonclient names no outputs -> ``binary_data_output: true``: every output comes back as raw bytes."""
    url, client, app = server
    image = image_bytes(seed=13)
    result = client.infer("tiny", [images_input([image], True)], parameters={"keep_rate": 1.0, "top_k": TOP_K})
    assert all("binary_data_size" in o["parameters"] for o in result.get_response()["outputs"])
    assert result.as_numpy("classes")[0].tolist() == classify(url, image, 1.0)
    assert result.as_numpy("tokens").tolist() == [app.state.service.registry.get("tiny").model.cost(1.0).total_tokens]
    labels = app.state.service.registry.get("tiny").labels
    assert [b.decode() for b in result.as_numpy("labels")[0]] == [labels[c] for c in result.as_numpy("classes")[0]]


def test_bad_image_message_reaches_the_client(server) -> None:
    _, client, _ = server
    with pytest.raises(InferenceServerException) as e:
        client.infer("tiny", [images_input([b"not an image at all"], True)])
    assert e.value.status() == "400"
    message = e.value.message()
    assert "not a decodable image" in message and "undecodable_image" not in message, message
    with pytest.raises(InferenceServerException) as e:
        client.infer("tiny", [images_input([b"x"], False)], parameters={"keep_rate": 1.5})
    assert e.value.status() == "422" and "keep_rate" in e.value.message()
    with pytest.raises(InferenceServerException) as e:
        client.infer("tiny", [images_input([b"x"], False)], priority=4)  # 3 levels in the model config
    assert e.value.status() == "422" and "priority" in e.value.message()
