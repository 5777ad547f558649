"""The image bytes of a request: the raw body (image/*, application/octet-stream) or multipart field ``file``.

The byte limit is enforced from ``Content-Length`` before reading and again while streaming (chunked
uploads carry no length), so an oversized body is never held in memory whole. :class:`BodyTimeout` bounds
the time a client may take to send its body (slow-loris uploads get 408), on every route.
"""

from __future__ import annotations

import asyncio

from fastapi import Request
from starlette.datastructures import UploadFile
from starlette.requests import ClientDisconnect
from starlette.requests import Request as StarletteRequest
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import CLIENT_GONE, ApiError

RAW_TYPES = ("application/octet-stream",)
UNSUPPORTED_IMAGE_TYPES = ("image/svg+xml",)  # vector images: nothing to decode into pixels

REQUEST_BODY_DOC = {
    "requestBody": {
        "required": True,
        "description": "The image: the raw body (JPEG, PNG, WebP, GIF, BMP, TIFF, AVIF) or a multipart field 'file'.",
        "content": {
            "image/*": {"schema": {"type": "string", "format": "binary"}},
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
            "multipart/form-data": {
                "schema": {"type": "object", "properties": {"file": {"type": "string", "format": "binary"}},
                           "required": ["file"]}
            },
        },
    }
}


def media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";", 1)[0].strip().lower()


class UploadBudget:
    """Bytes of request bodies being received at once, across requests: a body that would take the total
    over ``limit`` gets 503 (before reading when its ``Content-Length`` says so). Counted as received, so
    slow uploads hold only what they have sent, never a share of the queue."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0

    def check(self, size: int) -> None:
        if self.used + size > self.limit:
            raise ApiError(503, f"too many uploads in progress ({self.used} bytes being received); retry later",
                           "uploads_full", {"Retry-After": "1"})

    def take(self, size: int) -> None:
        self.check(size)
        self.used += size


async def read_body(request: Request, max_bytes: int, budget: UploadBudget | None = None) -> bytes:
    """The whole body, refusing (413) as soon as it is known to exceed ``max_bytes``, and (503) when it
    does not fit in ``budget``."""
    budget = budget or UploadBudget(max_bytes)
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit():
        if int(declared) > max_bytes:
            raise ApiError(413, f"body of {declared} bytes is over the limit of {max_bytes}", "body_too_large")
        budget.check(int(declared))  # refused before reading
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            budget.take(len(chunk))
            size += len(chunk)
            if size > max_bytes:
                raise ApiError(413, f"body is over the limit of {max_bytes} bytes", "body_too_large")
            chunks.append(chunk)
    except ClientDisconnect as e:  # an aborted upload is the client's doing, not a server error
        raise ApiError(CLIENT_GONE, "client closed the connection while sending the body",
                       "client_closed_request") from e
    finally:
        budget.used -= size
    return b"".join(chunks)


async def read_image_bytes(request: Request, max_bytes: int, budget: UploadBudget | None = None) -> bytes:
    """The uploaded image's bytes; 415 for a body that is declared as something other than an image."""
    kind = media_type(request)
    if kind and kind != "multipart/form-data" and (
        kind in UNSUPPORTED_IMAGE_TYPES or not (kind.startswith("image/") or kind in RAW_TYPES)
    ):
        raise ApiError(
            415, f"Content-Type {kind} is not accepted; send the image as the raw body (image/*) or as "
            "multipart/form-data field 'file'", "unsupported_media_type",
        )
    body = await read_body(request, max_bytes, budget)
    if kind != "multipart/form-data":
        return body
    return await _multipart_file(request, body)


async def _multipart_file(request: Request, body: bytes) -> bytes:
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    form_request = StarletteRequest(request.scope, replay)
    try:
        async with form_request.form(max_files=1, max_fields=16) as form:
            field = form.get("file")
            if not isinstance(field, UploadFile):
                raise ApiError(422, "multipart body has no file field 'file'", "missing_file")
            return await field.read()
    except ApiError:
        raise
    except Exception as e:  # malformed multipart framing
        raise ApiError(400, f"malformed multipart body: {e}", "bad_multipart") from e


class BodyTimeout:
    """Pure ASGI: a request whose body has not fully arrived ``seconds`` after its headers gets 408.

    Wraps ``receive`` so every route that reads a body is covered; the ``ApiError`` raised inside the
    route becomes the usual JSON error. Once the body is complete, ``receive`` is passed through
    untimed (the service waits on it to notice clients that go away).
    """

    def __init__(self, app: ASGIApp, seconds: float) -> None:
        self.app = app
        self.seconds = seconds

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.seconds
        complete = False

        async def timed_receive() -> Message:
            nonlocal complete
            if complete:
                return await receive()
            try:
                async with asyncio.timeout_at(deadline):
                    message = await receive()
            except TimeoutError:
                raise ApiError(408, f"the request body did not arrive within {self.seconds:g} s",
                               "body_timeout") from None
            complete = message["type"] != "http.request" or not message.get("more_body", False)
            return message

        await self.app(scope, timed_receive, send)
