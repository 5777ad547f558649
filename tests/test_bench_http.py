"""The HTTP benchmark's pieces: its multipart bodies parse as the form field ``file``, and the LitServe peer
answers a batch as it answers each image alone."""

from __future__ import annotations

import asyncio
import io

import numpy as np
from _hostile import encode, noise
from starlette.datastructures import UploadFile
from starlette.requests import Request

from benchmarks.servers import request_body


def jpeg(seed: int) -> bytes:
    return encode(noise((64, 48), seed), "JPEG")


async def parse_form(kind: str, body: bytes) -> bytes:
    async def receive() -> dict:
        return {"type": "http.request", "body": body, "more_body": False}

    scope = {"type": "http", "method": "POST", "headers": [(b"content-type", kind.encode())]}
    async with Request(scope, receive).form() as form:
        return await form["file"].read()


def test_multipart_body_carries_the_jpeg_as_field_file() -> None:
    image = jpeg(0)
    kind, body = request_body(image, form=True)
    assert asyncio.run(parse_form(kind, body)) == image
    assert request_body(image, form=False) == ("image/jpeg", image)


def test_litserve_peer_batch_answers_each_image_as_alone() -> None:
    from benchmarks.litserve_peer import EViTLitAPI  # litserve: a dev dependency

    api = EViTLitAPI("vit_tiny_patch16_224", None, keep_rate=0.5, max_batch_size=4)
    api.setup("cpu")
    tensors = [api.decode_request({"file": UploadFile(io.BytesIO(jpeg(seed)))}) for seed in (1, 2, 3)]
    assert tensors[0].shape == (3, 224, 224)
    batched = [api.encode_response(o) for o in api.unbatch(api.predict(api.batch(tensors)))]
    alone = [api.encode_response(api.unbatch(api.predict(api.batch([t])))[0]) for t in tensors]
    for b, a in zip(batched, alone, strict=True):
        assert b["keep_rate"] == 0.5 and len(b["classes"]) == 5
        assert b["classes"] == a["classes"]
        assert np.allclose(b["probabilities"], a["probabilities"], atol=1e-5)
