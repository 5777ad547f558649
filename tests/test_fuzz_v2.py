"""Property-based fuzzing of ``POST /v2/models/{name}/infer`` (in process, the tiny model).

Bodies in the JSON and the binary-extension forms, built from: any JSON token as ``binary_data_size``
(strings, floats, 1e400, lists, objects, negatives, 10^12), any ``Inference-Header-Content-Length``
(non-ASCII digits, signs, past the body), shapes with negative or huge dimensions, datatypes, one or two
inputs, BYTES elements whose length prefixes lie, trailing bytes, images that are valid, undecodable or
thin strips. Every answer is 200 or a 4xx JSON error with a message (503/504 only under load): 0 x 500.
"""

from __future__ import annotations

import json
import os
import struct

import pytest
from _hostile import encode, noise, png_declaring
from _reliability import LEAK, record
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

EXAMPLES = int(os.environ.get("EVIT_FUZZ_EXAMPLES", "300"))
ELEMENTS = [encode(noise((40, 30)), "PNG"), encode(noise((40, 30)), "JPEG"), b"not an image", b"",
            png_declaring(1, 100_000), png_declaring(100_000, 100_000)]
SIZE_TOKENS = ['"abc"', '"1e3"', "[1]", '{"a": 1}', "1e400", "-1e400", "-1", "1.5", "1e3", "true", "null",
               "1000000000000", "0", '""', "[]"]
HEADER_TOKENS = ["²", "-1", "+1", " 1", "0x1", "1e3", "", "٣", "99999999999999999999"]
STATS: dict[str, object] = {"examples": 0, "codes": {}}
CLIENT: dict[str, object] = {}


@st.composite
def request(draw: st.DrawFn) -> tuple[bytes, dict[str, bytes]]:
    elements = draw(st.lists(st.sampled_from(ELEMENTS), max_size=3))
    raw = bytearray(b"".join(struct.pack("<I", len(e)) + e for e in elements))
    if raw and draw(st.booleans()):  # a length prefix that lies
        struct.pack_into("<I", raw, 0, draw(st.integers(0, 2**32 - 1)))
    true_size = str(len(raw))
    size = draw(st.just(true_size) | st.sampled_from([None, *SIZE_TOKENS]) | st.integers(-10, 10**13).map(str))
    shape = draw(st.just([len(elements)]) | st.lists(st.integers(-2, 10**6) | st.just(len(elements)), max_size=3))
    dtype = draw(st.just("BYTES") | st.sampled_from(["FP32", "bytes", ""]))
    tensor = {"name": "image", "shape": shape, "datatype": dtype}
    if size is not None:
        tensor["parameters"] = {"binary_data_size": "@SIZE@"}  # replaced by the raw JSON token below
    params = draw(st.sampled_from(["{}", '{"top_k": 1}', '{"keep_rate": 1e400}']))
    request = {"inputs": [tensor] * draw(st.just(1) | st.just(2)), "parameters": "@PARAMS@"}
    header = json.dumps(request).replace('"@SIZE@"', str(size)).replace('"@PARAMS@"', params).encode()
    trailer = draw(st.just(b"") | st.sampled_from([b"x", bytes(64)]))
    body = header + bytes(raw) + trailer
    length = draw(st.just(str(len(header))) | st.sampled_from([None, str(len(body) + 1), *HEADER_TOKENS]))
    return body, {} if length is None else {"inference-header-content-length": length.encode()}


@settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(request())
def fuzz_one(case: tuple[bytes, dict[str, bytes]]) -> None:
    body, headers = case
    r = CLIENT["client"].post("/v2/models/tiny/infer", content=body, headers=headers)  # type: ignore[union-attr]
    codes: dict[int, int] = STATS["codes"]  # type: ignore[assignment]
    codes[r.status_code] = codes.get(r.status_code, 0) + 1
    STATS["examples"] = int(STATS["examples"]) + 1  # type: ignore[call-overload]
    assert r.status_code == 200 or 400 <= r.status_code < 500 or r.status_code in (503, 504), r.text
    if r.status_code != 200:
        error = r.json()
        assert error["status"] == r.status_code and error["error"] and not LEAK.search(error["error"])


@pytest.mark.timeout(240)
def test_v2_fuzz_never_500(tiny_settings) -> None:
    from starlette.testclient import TestClient

    from service.app import create_app

    with TestClient(create_app(tiny_settings(queue_size=8))) as client:
        for _ in range(200):
            if client.get("/readyz").status_code == 200:
                break
        CLIENT["client"] = client
        fuzz_one()
        assert client.get("/healthz").status_code == 200
    codes = dict(sorted(STATS["codes"].items()))  # type: ignore[attr-defined]
    assert int(STATS["examples"]) >= min(EXAMPLES, 100)  # type: ignore[call-overload]
    assert 500 not in codes
    record("v2_fuzz", {
        "what": f"hypothesis: {STATS['examples']} V2 infer requests with malformed binary_data_size, "
                "Inference-Header-Content-Length, shapes, datatypes, lying element lengths and trailing bytes",
        "sent": STATS["examples"], "accepted": codes.get(200, 0),
        "rejected": sum(n for c, n in codes.items() if c != 200), "answered": sum(codes.values()),
        "crashes": sum(n for c, n in codes.items() if c >= 500 and c not in (503, 504)),
        "memory_growth_mb": "-", "notes": f"by status: {', '.join(f'{c}: {n}' for c, n in codes.items())}",
    })
