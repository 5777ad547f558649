"""V2 request parsing (``service.v2_request``) without a server: the binary extension's header split and
sizes, the BYTES elements, and the parameters, each at its boundaries (the status code and error code a
client gets). The routes themselves are tested in test_service_v2.py."""

from __future__ import annotations

import base64
import json
import struct

import pytest

from service.errors import ApiError
from service.job import Priority
from service.v2_request import ask_of, images_of, int_param, keep_rate_of, parse


def fails(status: int, code: str, call, *args) -> ApiError:
    with pytest.raises(ApiError) as e:
        call(*args)
    assert (e.value.status, e.value.error) == (status, code), e.value
    return e.value


def elements(*images: bytes) -> bytes:
    """Triton's binary BYTES serialisation: each element's 4-byte little-endian length, then its bytes."""
    return b"".join(struct.pack("<I", len(i)) + i for i in images)


def request(inputs: list[dict], raw: bytes = b"") -> tuple[bytes, str]:
    header = json.dumps({"inputs": inputs}).encode()
    return header + raw, str(len(header))


def test_header_length_splits_the_body() -> None:
    body = json.dumps({"inputs": []}).encode()
    assert parse(body, None)[1] == b"" and parse(body, str(len(body)))[1] == b""  # all of it may be header
    assert parse(body + b"xyz", str(len(body)))[1] == b"xyz"
    fails(400, "bad_header_length", parse, body, str(len(body) + 1))
    assert "not valid JSON" in fails(400, "bad_request", parse, b"{not json", None).message
    e = fails(422, "invalid_parameter", parse, b'{"inputs": "nope"}', None)
    assert "inputs" in e.message


def test_images_json_and_binary() -> None:
    png, jpeg = b"\x89PNG-a", b"\xff\xd8-bb"
    tensor = {"name": "image", "shape": [2], "datatype": "BYTES"}
    req, raw = parse(json.dumps({"inputs": [{**tensor, "data": [base64.b64encode(i).decode() for i in (png, jpeg)]}]})
                     .encode(), None)
    assert images_of(req, raw) == [png, jpeg]
    # binary: empty elements (the last one, too) are whole elements
    raw = elements(b"", jpeg, b"")
    body, length = request([{**tensor, "shape": [3], "parameters": {"binary_data_size": len(raw)}}], raw)
    assert images_of(*parse(body, length)) == [b"", jpeg, b""]
    # another input's binary data comes first: the images start after it
    fp32 = struct.pack("<2f", 0.5, 0.25)
    raw = fp32 + elements(png, jpeg)
    body, length = request([{"name": "x", "shape": [2], "datatype": "FP32", "parameters": {"binary_data_size": 8}},
                            {**tensor, "parameters": {"binary_data_size": len(raw) - 8}}], raw)
    assert images_of(*parse(body, length)) == [png, jpeg]
    # a JSON BYTES input next to a binary input of size 0
    body, length = request([{"name": "x", "shape": [0], "datatype": "FP32", "parameters": {"binary_data_size": 0}},
                            {**tensor, "shape": [1], "data": [base64.b64encode(png).decode()]}])
    assert images_of(*parse(body, length)) == [png]
    body, length = request([{"name": "x", "shape": [1], "datatype": "FP32", "data": [0.5]}])
    assert "needs one BYTES input" in fails(422, "invalid_parameter", images_of, *parse(body, length)).message


@pytest.mark.parametrize(("raw", "error"), [(b"\x05\x00\x00", "element length"), (elements(b"abc")[:-1], "element in")])
def test_truncated_binary_elements_400(raw: bytes, error: str) -> None:
    body, length = request([{"name": "image", "shape": [1], "datatype": "BYTES",
                             "parameters": {"binary_data_size": len(raw)}}], raw)
    assert f"truncated BYTES {error}" in fails(400, "bad_request", images_of, *parse(body, length)).message


@pytest.mark.parametrize(("data", "status", "code", "says"), [
    ([0.5], 422, "invalid_parameter", "must be base64 strings"),
    (["aG!k="], 400, "bad_request", "not valid base64"),  # refused, not decoded leniently (as "aGk=")
    (["aGk=", "aGk="], 422, "invalid_parameter", "has shape [1] but 2 elements"),
])
def test_bad_json_elements(data: list, status: int, code: str, says: str) -> None:
    req, raw = parse(json.dumps({"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": data}]})
                     .encode(), None)
    assert says in fails(status, code, images_of, req, raw).message


def test_int_param_bounds() -> None:
    assert int_param(1, "top_k", 1, 10) == 1 and int_param(10, "top_k", 1, 10) == 10
    for bad in (0, 11, True, 2.0, "3"):
        assert "top_k" in fails(422, "invalid_parameter", int_param, bad, "top_k", 1, 10).message


def test_keep_rate_of() -> None:
    assert keep_rate_of(None, "keep_rate") is None and keep_rate_of(0.5, "keep_rate") == 0.5
    e = fails(422, "invalid_parameter", keep_rate_of, "high", "keep_rate", True)
    assert e.message == "parameter keep_rate must be a number in (0, 1] or \"auto\", got 'high'"
    e = fails(422, "invalid_parameter", keep_rate_of, 2, "min_keep_rate")
    assert e.message == "parameter min_keep_rate must be a number in (0, 1], got 2"


def test_ask_of_deadlines_and_priorities() -> None:
    ask = ask_of({"deadline_ms": 250, "priority": 1}, "100")
    assert ask.deadline_ms == 100.0 and ask.priority == Priority.HIGH and not ask.auto
    assert ask_of({"deadline_ms": 50}, "100").deadline_ms == 50.0 and ask_of({"keep_rate": "auto"}, None).auto
    assert ask_of({"deadline_ms": 0.5}, "0.75").deadline_ms == 0.5  # any positive number of milliseconds
    assert ask_of({}, None) == ask_of({"priority": "normal"}, None) == ask_of({"priority": 0}, None)
    assert ask_of({"priority": 3}, None).priority == Priority.LOW
    assert ask_of({"keep_rate": "auto", "min_keep_rate": 0.5}, None).min_keep_rate == 0.5
    for params, header in [({"deadline_ms": "5000"}, None), ({"deadline_ms": True}, None),
                           ({"deadline_ms": 0}, None), ({}, "inf"), ({}, "0"), ({}, "-5")]:
        fails(422, "invalid_parameter", ask_of, params, header)
    for priority in (4, -1, True, "urgent"):
        fails(422, "invalid_parameter", ask_of, {"priority": priority}, None)
