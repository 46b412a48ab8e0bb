"""Renders every error (typed, validation, HTTP, unexpected) in OpenAI's envelope."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from sqlalchemy.exc import DBAPIError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.errors import GatewayError, error_body
from app.outages import OUTAGES

log = logging.getLogger(__name__)


def render(exc: GatewayError) -> JSONResponse:
    return JSONResponse(
        error_body(exc.message, exc.type, exc.param, exc.code),
        status_code=exc.status_code,
        headers=exc.headers,
    )


_HTTP_TYPES = {401: ("invalid_request_error", "invalid_api_key"), 404: ("invalid_request_error", "not_found")}


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(GatewayError)
    async def _gateway_error(_: Request, exc: GatewayError) -> JSONResponse:
        return render(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        loc = [str(p) for p in first.get("loc", ()) if p not in ("body", "query", "path", "header")]
        param = ".".join(loc) or None
        message = f"{param}: {first.get('msg', 'invalid request')}" if param else str(first.get("msg"))
        return JSONResponse(error_body(message, "invalid_request_error", param), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        type_, code = _HTTP_TYPES.get(exc.status_code, ("invalid_request_error", None))
        if exc.status_code >= 500:
            type_ = "server_error"
        return JSONResponse(
            error_body(str(exc.detail), type_, None, code), status_code=exc.status_code, headers=exc.headers
        )

    async def _dependency_down(_: Request, exc: Exception) -> JSONResponse:
        # Registered per class so that Starlette's ExceptionMiddleware answers (the catch-all below
        # re-raises into the server's log: one traceback per request during an outage).
        answer = OUTAGES.answer(exc)
        if answer is not None:
            return render(answer)
        log.exception("unhandled error", exc_info=exc)
        return JSONResponse(error_body("internal server error", "server_error"), status_code=500)

    for cls in (
        DBAPIError,
        PoolTimeoutError,
        RedisConnectionError,
        RedisTimeoutError,
        ConnectionError,
        TimeoutError,
    ):
        app.add_exception_handler(cls, _dependency_down)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error", exc_info=exc)
        return JSONResponse(error_body("internal server error", "server_error"), status_code=500)
