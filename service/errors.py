"""The HTTP edge's errors: ``ApiError``, the one mapping of the core's exceptions (``service.exceptions``) to
HTTP status, error code and Retry-After, and the handlers that turn every failure into an ErrorResponse."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from service import exceptions as core
from service.schemas import ErrorResponse

log = logging.getLogger("service.errors")

_TYPES = {
    400: "bad_request", 401: "unauthorized", 404: "not_found", 405: "method_not_allowed", 408: "body_timeout",
    413: "payload_too_large", 415: "unsupported_media_type", 422: "invalid_parameter", 499: "client_closed_request",
    500: "internal_error", 503: "unavailable", 504: "timeout",
}
CLIENT_GONE = 499  # nginx's convention; only logs and metrics ever see it


class ApiError(Exception):
    """An answer other than 200: HTTP status, stable type, human message, optional headers."""

    def __init__(
        self, status: int, message: str, error: str | None = None, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.error = error or _TYPES.get(status, "error")
        self.headers = headers or {}


# core exception -> (HTTP status, error code); Retry-After comes from the exception when it has one
_CORE: list[tuple[type[core.ServiceError], int, str]] = [
    (core.NotReady, 503, "not_ready"),
    (core.Draining, 503, "draining"),
    (core.Overloaded, 503, "overloaded"),
    (core.OutOfMemory, 503, "out_of_memory"),
    (core.QueueTimeout, 504, "timeout"),
    (core.UnknownModel, 404, "unknown_model"),
    (core.InvalidRequest, 422, "invalid_parameter"),
    (core.InferenceFailed, 500, "inference_failed"),
    (core.ClientGone, CLIENT_GONE, "client_closed_request"),
]


def api_error(e: core.ServiceError) -> ApiError:
    """The HTTP answer to a core exception (the only place the core's failures become status codes)."""
    retry = getattr(e, "retry_after_s", None)
    headers = {"Retry-After": str(retry)} if retry is not None else None
    if isinstance(e, core.DeadlineUnreachable):  # retryable: the load is the reason; else only a longer deadline
        return ApiError(503 if retry is not None else 504, e.message, "deadline_unreachable", headers)
    for kind, status, code in _CORE:
        if isinstance(e, kind):
            return ApiError(status, e.message, code, headers)
    return ApiError(500, e.message, "internal_error")


def error_response(
    request: Request, status: int, error: str, message: str,
    headers: dict[str, str] | None = None, details: list[dict[str, Any]] | None = None,
) -> JSONResponse:
    request_id = getattr(request.state, "request_id", None)
    body = ErrorResponse(status=status, error=error, message=message, request_id=request_id, details=details)
    return JSONResponse(body.model_dump(exclude_none=True), status_code=status, headers=headers)


async def _api_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ApiError)
    return error_response(request, exc.status, exc.error, exc.message, exc.headers)


async def _core_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, core.ServiceError)
    return await _api_error(request, api_error(exc))


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    details = [{"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "input": _short(e.get("input"))}
               for e in exc.errors()]
    summary = "; ".join(f"{'.'.join(map(str, d['loc'][1:])) or 'request'}: {d['msg']}" for d in details)
    return error_response(request, 422, "invalid_parameter", summary, details=details)


def _short(value: Any) -> str | None:
    return None if value is None else str(value)[:100]


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    return error_response(request, exc.status_code, _TYPES.get(exc.status_code, "error"), str(exc.detail),
                          dict(exc.headers or {}))


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.error("unhandled error", exc_info=exc, extra={"request_id": getattr(request.state, "request_id", None)})
    return error_response(request, 500, "internal_error", "internal error; see the server log for this request id")


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(core.ServiceError, _core_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected)
