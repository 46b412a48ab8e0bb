"""One error tree for the whole gateway, rendered in OpenAI's error envelope."""

from __future__ import annotations

import logging
from contextvars import ContextVar
from typing import Any


class GatewayError(Exception):
    status_code: int = 500
    type: str = "server_error"
    code: str | None = None

    def __init__(self, message: str, *, param: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.headers = headers


class InvalidRequest(GatewayError):
    status_code, type = 400, "invalid_request_error"


class InvalidApiKey(GatewayError):
    status_code, type, code = 401, "invalid_request_error", "invalid_api_key"


class PermissionDenied(GatewayError):
    status_code, type, code = 403, "invalid_request_error", "permission_denied"


class NotFound(GatewayError):
    status_code, type, code = 404, "invalid_request_error", "not_found"


class ModelNotFound(GatewayError):
    status_code, type, code = 404, "invalid_request_error", "model_not_found"


class Conflict(GatewayError):
    status_code, type, code = 409, "invalid_request_error", "conflict"


class PayloadTooLarge(GatewayError):
    status_code, type, code = 413, "invalid_request_error", "payload_too_large"


class RateLimited(GatewayError):
    status_code, type, code = 429, "rate_limit_exceeded", "rate_limit_exceeded"
    limit = "waiters"  # which limit refused it (gateway_rate_limited_total{limit})


class ServiceUnavailable(GatewayError):
    status_code, type, code = 503, "server_error", "service_unavailable"


# The request being served (set by the outermost ASGI layer, app.api.openai.fastpath.FastPath): every
# response carries it as x-request-id, every error message ends with it, and the gateway's log lines
# written while serving it carry it (`request_id`), so support can find the line behind a tenant's error.
REQUEST_ID: ContextVar[str | None] = ContextVar("request_id", default=None)


def error_body(
    message: str, type_: str, param: str | None = None, code: str | None = None
) -> dict[str, object]:
    rid = REQUEST_ID.get()
    if rid is not None:
        message = f"{message} (request id: {rid})"
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def log_request_ids() -> None:
    """Give the gateway's own log records written while serving a request its id, as `request_id`
    (once per process; records of other libraries are left alone)."""
    base = logging.getLogRecordFactory()
    if getattr(base, "lgw_request_ids", False):
        return

    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = base(*args, **kwargs)
        rid = REQUEST_ID.get()
        if rid is not None and (record.name or "").startswith("app."):
            record.request_id = rid  # a field of its JSON line (app.logs)
        return record

    factory.lgw_request_ids = True  # type: ignore[attr-defined]
    logging.setLogRecordFactory(factory)
