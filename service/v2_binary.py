"""Binary tensor outputs of the Open Inference Protocol (Triton's binary data extension).

An output is sent as raw bytes when the request asks for it: ``{"name": ..., "parameters": {"binary_data":
true}}`` on the output, or the request parameter ``binary_data_output: true`` for every output that does not
say otherwise (what tritonclient sends when it names no outputs). The answer is then the JSON header (such
outputs carry ``parameters.binary_data_size`` instead of ``data``), followed by their bytes in output order,
with the header's length in ``Inference-Header-Content-Length``. Element encoding: little-endian FP32 / INT64;
BYTES as a 4-byte little-endian length, then the bytes.
"""

from __future__ import annotations

import json
import struct
from typing import Any

import numpy as np
from fastapi.responses import JSONResponse, Response

from service.schemas import V2InferRequest, V2InferResponse, V2Tensor

_DTYPES = {"FP32": "<f4", "INT64": "<i8", "INT32": "<i4", "FP64": "<f8"}
BINARY_ANSWER_DOC: dict[int | str, dict[str, Any]] = {200: {
    "description": "JSON; or, with binary outputs asked for, the JSON header (its length in "
    "Inference-Header-Content-Length) followed by their bytes",
    "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
}}


def binary_outputs(req: V2InferRequest, names: list[str]) -> set[str]:
    """The outputs among ``names`` the request wants as binary data."""
    default = (req.parameters or {}).get("binary_data_output") is True
    asked = {o.name: (o.parameters or {}).get("binary_data") for o in req.outputs or []}
    return {n for n in names if asked.get(n) is True or (asked.get(n) is None and default)}


def tensor_bytes(t: V2Tensor) -> bytes:
    """A tensor's elements in the binary data extension's layout."""
    data: list[Any] = t.data or []
    if t.datatype == "BYTES":
        raw = [v if isinstance(v, bytes) else str(v).encode() for v in data]
        return b"".join(struct.pack("<I", len(v)) + v for v in raw)
    return np.asarray(data, dtype=_DTYPES[t.datatype]).tobytes()


def respond(resp: V2InferResponse, binary: set[str]) -> Response:
    """JSON when no output is binary; else the JSON header, then the binary outputs' bytes."""
    if not binary:
        return JSONResponse(resp.model_dump(exclude_none=True))
    chunks = []
    for t in resp.outputs:
        if t.name in binary:
            raw = tensor_bytes(t)
            chunks.append(raw)
            t.data = None
            t.parameters = {**(t.parameters or {}), "binary_data_size": len(raw)}
    header = json.dumps(resp.model_dump(exclude_none=True), separators=(",", ":")).encode()
    return Response(header + b"".join(chunks), media_type="application/octet-stream",
                    headers={"Inference-Header-Content-Length": str(len(header))})
