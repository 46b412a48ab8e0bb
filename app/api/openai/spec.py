"""The tenant API as the OpenAPI document tells it: the request bodies of the two generation routes
(exactly the fields app.api.openai.surface lets through; anything else is a 400), the bearer key, and
the error answers each route gives, in OpenAI's error envelope. Clients and fuzzers read this; the
data path itself never does (it validates in surface.py and leaves the sampling fields to vLLM)."""

from __future__ import annotations

from typing import Any

from app.api.openai.surface import FIELDS
from app.routing.resolve import MAX_MODEL_CHARS

_NUMBER = {"type": "number"}
_INT = {"type": "integer"}
_STRINGS = {"type": "array", "items": {"type": "string"}}
_TEXT_PART = {
    "type": "object",
    "properties": {"type": {"type": "string", "enum": ["text"]}, "text": {"type": "string"}},
    "required": ["type", "text"],
}
_MESSAGE = {
    "type": "object",
    "properties": {
        "role": {"type": "string", "enum": ["system", "developer", "user", "assistant", "tool"]},
        "content": {"anyOf": [{"type": "string"}, {"type": "array", "items": _TEXT_PART}, {"type": "null"}]},
        "name": {"type": "string"},
    },
    "required": ["role", "content"],
}
# The fields a client is most likely to send, typed; the other allowed fields are documented as
# accepted (any JSON) and validated by vLLM.
_TYPED: dict[str, dict[str, Any]] = {
    "model": {"type": "string", "minLength": 1, "maxLength": MAX_MODEL_CHARS},
    "messages": {"type": "array", "items": _MESSAGE, "minItems": 1},
    "prompt": {"anyOf": [{"type": "string"}, _STRINGS]},
    "max_tokens": {"type": "integer", "minimum": 1},
    "max_completion_tokens": {"type": "integer", "minimum": 1},
    "n": {"type": "integer", "minimum": 1, "maximum": 8},
    "temperature": {"type": "number", "minimum": 0, "maximum": 2},
    "top_p": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
    "frequency_penalty": {"type": "number", "minimum": -2, "maximum": 2},
    "presence_penalty": {"type": "number", "minimum": -2, "maximum": 2},
    "seed": _INT,
    "stop": {"anyOf": [{"type": "string"}, {**_STRINGS, "maxItems": 4}]},
    "stream": {"type": "boolean"},
    "stream_options": {
        "type": "object",
        "properties": {"include_usage": {"type": "boolean"}},
        "additionalProperties": False,
    },
    "user": {"type": "string"},
    "top_k": _INT,
    "min_p": {"type": "number", "minimum": 0, "maximum": 1},
    "min_tokens": {"type": "integer", "minimum": 0},
    "ignore_eos": {"type": "boolean"},
    "repetition_penalty": {"type": "number", "exclusiveMinimum": 0},
    "cache_salt": {"type": "string", "description": "accepted and always replaced with the tenant's own"},
}
_REQUIRED = {"/v1/chat/completions": ["model", "messages"], "/v1/completions": ["model", "prompt"]}

ERROR_SCHEMA = {
    "type": "object",
    "properties": {
        "error": {
            "type": "object",
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"type": ["string", "null"]},
                "code": {"type": ["string", "integer", "null"]},
            },
            "required": ["message", "type"],
        }
    },
    "required": ["error"],
}
_WHY = {
    400: "the request is malformed, or names a field this gateway does not forward",
    401: "no key, or not a valid one",
    404: "not found (for a model: another tenant's adapter is unknown in the same words)",
    409: "it conflicts with what exists (a name taken, an object in use)",
    413: "the body is larger than the gateway takes",
    429: "too many of this tenant's requests wait for this model",
    502: "the model backend failed",
    503: "no backend can serve it now (down, busy past the placement wait, a store outage); see Retry-After",
}


def errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """FastAPI `responses=` for these error statuses, each in the error envelope."""
    return {
        s: {"description": _WHY[s], "content": {"application/json": {"schema": ERROR_SCHEMA}}}
        for s in statuses
    }


def request_body(route: str) -> dict[str, Any]:
    """FastAPI `openapi_extra=` documenting the route's JSON body and its bearer key."""
    properties = {name: _TYPED.get(name, {}) for name in sorted(FIELDS[route])}
    schema = {
        "type": "object",
        "properties": properties,
        "required": _REQUIRED[route],
        "additionalProperties": False,
    }
    return {
        "requestBody": {"required": True, "content": {"application/json": {"schema": schema}}},
        "security": [{"TenantKey": []}],
        "responses": {
            "200": {
                "description": "the completion; with `stream`, server-sent events ending in `data: [DONE]`",
                "content": {"application/json": {"schema": {"type": "object"}}, "text/event-stream": {}},
            }
        },
    }


TENANT_KEY: dict[str, Any] = {"security": [{"TenantKey": []}]}
SECURITY_SCHEMES = {"TenantKey": {"type": "http", "scheme": "bearer", "description": "the tenant's API key"}}


def document_errors(schema: dict[str, Any]) -> dict[str, Any]:
    """The error answers as they are: FastAPI documents a 422 for failed validation, the gateway answers
    400 in the envelope; and every admin operation can be refused (401), find nothing (404 where the
    path or body names something), conflict (409 on writes), or meet an outage (503)."""
    for path, operations in schema.get("paths", {}).items():
        for method, operation in operations.items():
            responses = operation.setdefault("responses", {})
            responses.pop("422", None)
            statuses = [400, 401, 503]
            if "{" in path or method in ("post", "patch", "put"):
                statuses.append(404)  # what the path or the body names is not there
            if method in ("post", "patch", "put"):
                statuses.append(409)
            if "requestBody" in operation and "multipart/form-data" in operation["requestBody"].get(
                "content", {}
            ):
                statuses.append(413)
            for status, doc in errors(*statuses).items():
                responses.setdefault(str(status), doc)
    schema.get("components", {}).get("schemas", {}).pop("HTTPValidationError", None)
    schema.get("components", {}).get("schemas", {}).pop("ValidationError", None)
    return schema
