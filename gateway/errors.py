"""The one mapping from errors to HTTP: JSON `{"status_code", "detail"}` for every failure."""

from __future__ import annotations

import logging
from typing import Any

import msgspec
from litestar import MediaType, Request, Response
from litestar.exceptions import HTTPException, ValidationException
from litestar.status_codes import HTTP_422_UNPROCESSABLE_ENTITY, HTTP_500_INTERNAL_SERVER_ERROR
from litestar.types import ExceptionHandlersMap

from shared.dead_letters import describe_not_utf8
from shared.errors import StockpilotError

log = logging.getLogger("stockpilot.gateway")


class ErrorBody(msgspec.Struct, kw_only=True):
    """Every error answer: the HTTP status and what was wrong."""

    status_code: int
    detail: str
    extra: list[dict[str, Any]] | None = None


def _response(
    status: int,
    detail: str,
    extra: list[dict[str, Any]] | None = None,
    headers: dict[str, str] | None = None,
) -> Response[ErrorBody]:
    if status == 401:
        headers = (headers or {}) | {"WWW-Authenticate": "Bearer"}
    return Response(
        ErrorBody(status_code=status, detail=detail, extra=extra),
        status_code=status,
        media_type=MediaType.JSON,
        headers=headers,
    )


def _stockpilot_error(_: Request[Any, Any, Any], exc: StockpilotError) -> Response[ErrorBody]:
    return _response(exc.status, exc.detail)


def _validation_error(_: Request[Any, Any, Any], exc: ValidationException) -> Response[ErrorBody]:
    # Litestar lists each bad parameter in `extra`; name them in the detail itself.
    extra = exc.extra if isinstance(exc.extra, list) else None
    problems = []
    for item in extra or []:
        if isinstance(item, dict):
            key = item.get("key")
            message = item.get("message", "invalid")
            source = item.get("source")
            # Litestar gives the source as a ParamType enum: "query", not "ParamType.QUERY".
            source = getattr(source, "value", source)
            where = (
                f"{source} parameter {key!r}" if source and key else f"{key!r}" if key else "body"
            )
            problems.append(f"{where}: {message}")
    detail = "; ".join(problems) if problems else str(exc.detail)
    status = exc.status_code if exc.status_code != 400 else HTTP_422_UNPROCESSABLE_ENTITY
    return _response(status, detail, extra)


def _http_error(_: Request[Any, Any, Any], exc: HTTPException) -> Response[ErrorBody]:
    # Keep the exception's headers: a 405 must say which methods are allowed (`Allow`).
    return _response(exc.status_code, str(exc.detail), headers=exc.headers)


def _too_deep(_: Request[Any, Any, Any], exc: RecursionError) -> Response[ErrorBody]:
    # Only a body nested thousands of levels deep reaches the recursion limit: msgspec and
    # Litestar raise RecursionError for it, not a decode error.
    return _response(
        HTTP_422_UNPROCESSABLE_ENTITY,
        "body: JSON nested too deeply (arrays or objects thousands of levels deep); "
        "send a flat record",
    )


def _not_utf8(_: Request[Any, Any, Any], exc: UnicodeDecodeError) -> Response[ErrorBody]:
    # msgspec raises UnicodeDecodeError for invalid UTF-8 inside a JSON string.
    return _response(HTTP_422_UNPROCESSABLE_ENTITY, f"body: {describe_not_utf8(exc)}")


def _unexpected(request: Request[Any, Any, Any], exc: Exception) -> Response[ErrorBody]:
    log.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return _response(HTTP_500_INTERNAL_SERVER_ERROR, "internal error; see the gateway log")


def exception_handlers() -> ExceptionHandlersMap:
    """Handlers for the app: ours first, then Litestar's own, then anything else."""
    return {
        StockpilotError: _stockpilot_error,
        ValidationException: _validation_error,
        HTTPException: _http_error,
        RecursionError: _too_deep,
        UnicodeDecodeError: _not_utf8,
        Exception: _unexpected,
    }
