"""Serves the two hot routes (/v1/chat/completions, /v1/completions) as plain ASGI, in front of the
FastAPI app: its middleware stack (error, telemetry and body-limit wrappers), routing and dependency
solving cost more CPU per request than the gateway's own work (bench/overhead.py with --profile).
Everything else, lifespan included, goes on to FastAPI; the same DataPath and the same error envelope
serve both ways."""

from __future__ import annotations

import logging
import os
import re
import time

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.api.openai.proxy import ClientGone, DataPath
from app.errors import REQUEST_ID, GatewayError, RateLimited, error_body
from app.metrics import OPERATIONS, RequestFacts
from app.outages import OUTAGES

log = logging.getLogger(__name__)

HOT_ROUTES = {"/v1/chat/completions": "/v1/chat/completions", "/v1/completions": "/v1/completions"}


async def proxy(request: Request, data_path: DataPath, route: str, facts: RequestFacts | None = None) -> Response:
    """One request through the data path, as a response whatever happens; `facts` notes what it did."""
    if facts is None:
        facts = RequestFacts(OPERATIONS[route], time.monotonic())
    try:
        return await data_path.handle(request, route, facts)
    except ClientGone:
        facts.error_type = "client_closed"
        return Response(status_code=499)  # nobody reads it; ends the request without an error log
    except GatewayError as exc:
        facts.error_type = exc.code or exc.type
        if isinstance(exc, RateLimited):
            facts.limit = exc.limit
        body = error_body(exc.message, exc.type, exc.param, exc.code)
        headers = exc.headers
        if facts.limit_headers:  # admitted, then failed: the client still learns where its limits stand
            headers = {**facts.limit_headers, **(headers or {})}
        return JSONResponse(body, status_code=exc.status_code, headers=headers)
    except Exception as exc:  # outside FastAPI: the last place to keep the envelope
        answer = OUTAGES.answer(exc)  # Postgres or Redis down: a 503, logged once per outage
        if answer is not None:
            facts.error_type = answer.code or answer.type
            body = error_body(answer.message, answer.type, answer.param, answer.code)
            return JSONResponse(body, status_code=answer.status_code, headers=answer.headers)
        log.exception("unhandled error")
        facts.error_type = "internal_error"
        return JSONResponse(error_body("internal server error", "server_error"), status_code=500)


class FastPath:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = _request_id(scope)
        token = REQUEST_ID.set(rid)
        header = (b"x-request-id", rid.encode())
        status = 0

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", ()), header]
                status = message["status"]
            await send(message)

        try:
            route = HOT_ROUTES.get(scope.get("path", ""))
            if route is None or scope["method"] != "POST":
                await self.app(scope, receive, send_with_id)
                return
            data_path: DataPath = scope["state"]["data_path"]
            facts = RequestFacts(OPERATIONS[route], time.monotonic())
            try:
                response = await proxy(Request(scope, receive), data_path, route, facts)
                await response(scope, receive, send_with_id)
            finally:
                # A status the client never got (it left first) is the one the response would have had.
                ended = time.monotonic()
                data_path.metrics.observe(facts, status or 499, ended)
                if data_path.request_log is not None:
                    data_path.request_log(facts, status or 499, ended)
        finally:
            REQUEST_ID.reset(token)


_CLIENT_ID = re.compile(rb"[A-Za-z0-9._:-]{1,128}")


def _request_id(scope: Scope) -> str:
    """The client's x-request-id when it is well-formed (so its own logs and ours share it), else ours."""
    for name, value in scope.get("headers", ()):
        if name == b"x-request-id":
            if _CLIENT_ID.fullmatch(value):
                return str(value.decode())
            break
    return os.urandom(12).hex()
