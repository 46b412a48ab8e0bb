"""The gateway's logs: one JSON object per line (structlog), or readable lines at a terminal.

Every record goes through one root handler, the gateway's own (`app.*`, written with the standard
`logging` calls and their `extra=` fields), uvicorn's and other libraries' alike, so an operator gets one
format from one stream. A record written while a request is served carries its `request_id` (the
x-request-id the client got back). Request lines (`GATEWAY_LOG_REQUESTS`) name the tenant, the public
model, the backend, the status and the timings; never a key, a prompt or a completion.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from datetime import UTC, datetime
from typing import Any, TextIO

import orjson
import structlog
from structlog.typing import EventDict, WrappedLogger

from app.errors import REQUEST_ID
from app.metrics import RequestFacts

_CONFIGURED = "lgw_logs"
access = logging.getLogger("app.access")
# The JSON handler configure() installed: request lines are written to it directly (below).
_json_handler: logging.StreamHandler[TextIO] | None = None
_root = logging.getLogger()


def _request_id(_: WrappedLogger, __: str, event: EventDict) -> EventDict:
    rid = REQUEST_ID.get()
    if rid is not None:
        event.setdefault("request_id", rid)
    return event


def _drop_color(_: WrappedLogger, __: str, event: EventDict) -> EventDict:
    event.pop("color_message", None)  # uvicorn's copy of the message with terminal colours
    return event


def _dumps(obj: Any, **_: Any) -> str:
    return orjson.dumps(obj, default=str).decode()


def configure(level: str = "INFO", fmt: str = "auto", stream: TextIO | None = None) -> logging.Handler:
    """Route every logger to one handler on `stream` (stderr): JSON, or console lines when `fmt` is
    "console" (or "auto" at a terminal). Replaces a handler it installed before (so tests can
    reconfigure); other handlers on the root logger are left as they are. Returns the handler."""
    stream = stream if stream is not None else sys.stderr
    if fmt == "auto":
        fmt = "console" if stream.isatty() else "json"
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.stdlib.ExtraAdder(),
        _drop_color,
        _request_id,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer: Any = (
        structlog.dev.ConsoleRenderer(colors=False)
        if fmt == "console"
        else structlog.processors.JSONRenderer(serializer=_dumps)
    )
    tail: list[Any] = [structlog.stdlib.ProcessorFormatter.remove_processors_meta]
    if fmt != "console":
        tail.append(structlog.processors.format_exc_info)
    formatter = structlog.stdlib.ProcessorFormatter(foreign_pre_chain=shared, processors=[*tail, renderer])
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter)
    setattr(handler, _CONFIGURED, True)
    global _json_handler
    _json_handler = handler if fmt != "console" else None
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, _CONFIGURED, False)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        lib = logging.getLogger(name)
        # uvicorn's own handlers give way to ours. Its access log stays as uvicorn left it when it has
        # no handler: `serve` turns it off (no handler, not propagating), a line per request costs CPU.
        if lib.handlers or name != "uvicorn.access":
            lib.handlers.clear()
            lib.propagate = True
        lib.setLevel(logging.NOTSET)  # GATEWAY_LOG_LEVEL (the root's) decides, not uvicorn's --log-level
        lib.disabled = False
    for noisy in ("httpx", "httpcore", "aiohttp.access"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    return handler


class RequestLog:
    """One line per finished /v1 request: every request ("all"), those that failed ("errors": a status
    of 400 or more, the client leaving included), or none ("off")."""

    __slots__ = ("mode",)

    def __init__(self, mode: str = "errors") -> None:
        if mode not in ("all", "errors", "off"):
            raise ValueError(f"log mode must be all, errors or off, not {mode!r}")
        self.mode = mode

    def __call__(self, facts: RequestFacts, status: int, ended: float) -> None:
        mode = self.mode
        if mode == "off" or (mode == "errors" and status < 400):
            return
        if not access.isEnabledFor(logging.INFO):
            return
        fields: dict[str, Any] = {
            "operation": facts.operation,
            "tenant": facts.tenant,
            "model": facts.model,
            "backend": facts.backend,
            "status": status,
            "duration_s": round(ended - facts.started, 6),
            "placement_s": round(facts.placement_s, 6),
        }
        if facts.error_type:
            fields["error_type"] = facts.error_type
        if facts.upstream_started is not None:
            fields["upstream_s"] = round((facts.upstream_ended or ended) - facts.upstream_started, 6)
        if facts.first_token is not None:
            fields["ttft_s"] = round(facts.first_token - facts.started, 6)
        if facts.prompt_tokens or facts.completion_tokens:
            fields["prompt_tokens"] = facts.prompt_tokens
            fields["completion_tokens"] = facts.completion_tokens
        handler = _json_handler
        if handler is None or access.handlers or not access.propagate or handler not in _root.handlers:
            access.info("request", extra=fields)  # through logging (console lines, or handlers of one's own)
            return
        # The same JSON line the formatter would write, without a LogRecord and the processor chain:
        # about a tenth of the CPU, which matters at one line per request (bench/overhead.py).
        fields["event"], fields["level"], fields["logger"] = "request", "info", "app.access"
        rid = REQUEST_ID.get()
        if rid is not None:
            fields["request_id"] = rid
        fields["timestamp"] = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        line = orjson.dumps(fields).decode() + "\n"
        with handler.lock or contextlib.nullcontext():
            handler.stream.write(line)
