"""app.logs: one JSON object per line for the gateway's own records, uvicorn's and other libraries',
with the request id of the request being served; request lines carry the request's facts and never a
key or prompt text. Through the real app: tests/api/test_proxy.py; in a real gateway process:
tests/integration/test_metrics.py."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest

from app import logs
from app.errors import REQUEST_ID, log_request_ids
from app.metrics import RequestFacts


@pytest.fixture
def stream() -> Iterator[io.StringIO]:
    out = io.StringIO()
    root = logging.getLogger()
    level = root.level
    handler = logs.configure("INFO", "json", out)
    log_request_ids()
    try:
        yield out
    finally:
        for h in [handler, *(h for h in root.handlers if getattr(h, "lgw_logs", False))]:
            root.removeHandler(h)  # this one, and any a test configured after it
        root.setLevel(level)


def lines(out: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in out.getvalue().splitlines() if line.strip()]


def test_gateway_records_are_json_with_their_fields_and_request_id(stream: io.StringIO) -> None:
    log = logging.getLogger("app.routing.router")
    log.info("adapter loaded", extra={"adapter": "lgw-1", "backend": "gpu-1", "load_s": 0.21})
    token = REQUEST_ID.set("trace-9")
    try:
        log.warning("backend %s answered %s; retrying elsewhere", "gpu-1", 503)
    finally:
        REQUEST_ID.reset(token)
    logging.getLogger("uvicorn.error").info("Started server process [%d]", 42)
    logging.getLogger("app.x").debug("not at INFO")
    first, second, third = lines(stream)
    assert first["event"] == "adapter loaded" and first["level"] == "info"
    assert first["logger"] == "app.routing.router"
    assert (first["adapter"], first["backend"], first["load_s"]) == ("lgw-1", "gpu-1", 0.21)
    assert str(first["timestamp"]).endswith("Z") and "request_id" not in first
    assert second["event"] == "backend gpu-1 answered 503; retrying elsewhere"
    assert second["request_id"] == "trace-9" and second["level"] == "warning"
    assert third["logger"] == "uvicorn.error" and third["event"] == "Started server process [42]"


def test_an_exception_is_one_json_line_with_its_traceback(stream: io.StringIO) -> None:
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        logging.getLogger("app.worker").exception("job failed")
    (line,) = lines(stream)
    assert line["event"] == "job failed" and line["level"] == "error"
    assert "Traceback" in str(line["exception"]) and "RuntimeError: boom" in str(line["exception"])


def facts(**kw: object) -> RequestFacts:
    f = RequestFacts("chat", 10.0, tenant="acme", model="support", backend="gpu-1", placement_s=0.25)
    f.upstream_started, f.upstream_ended, f.first_token = 10.3, 11.0, 10.5
    f.prompt_tokens, f.completion_tokens = 12, 30
    for k, v in kw.items():
        setattr(f, k, v)
    return f


def test_request_lines_by_mode(stream: io.StringIO) -> None:
    logs.RequestLog("errors")(facts(), 200, 11.0)  # a success: no line in "errors" mode
    logs.RequestLog("errors")(facts(error_type="service_unavailable"), 503, 11.0)
    logs.RequestLog("all")(facts(), 200, 11.5)
    logs.RequestLog("off")(facts(error_type="x"), 500, 11.0)
    failed, ok = lines(stream)
    assert failed["status"] == 503 and failed["error_type"] == "service_unavailable"
    assert failed["logger"] == "app.access" and failed["event"] == "request"
    assert ok["status"] == 200 and "error_type" not in ok
    assert (ok["tenant"], ok["model"], ok["backend"], ok["operation"]) == ("acme", "support", "gpu-1", "chat")
    assert ok["duration_s"] == 1.5 and ok["placement_s"] == 0.25
    assert ok["upstream_s"] == pytest.approx(0.7) and ok["ttft_s"] == 0.5
    assert (ok["prompt_tokens"], ok["completion_tokens"]) == (12, 30)
    with pytest.raises(ValueError, match="log mode"):
        logs.RequestLog("verbose")


def test_console_format_is_readable(stream: io.StringIO) -> None:
    out = io.StringIO()
    handler = logs.configure("INFO", "console", out)
    try:
        logging.getLogger("app.routing.router").info("adapter evicted", extra={"adapter": "lgw-2"})
    finally:
        logging.getLogger().removeHandler(handler)
    text = out.getvalue()
    assert "adapter evicted" in text and "adapter=lgw-2" in text and not text.lstrip().startswith("{")
    assert stream.getvalue() == ""  # the JSON handler was replaced, not doubled


def test_uvicorns_access_log_stays_off_when_serve_turned_it_off(stream: io.StringIO) -> None:
    """`serve` runs uvicorn with access_log=False: no handler on uvicorn.access, not propagating (a line
    per request costs CPU). Configuring the logs must not turn it back on."""
    access_log = logging.getLogger("uvicorn.access")
    access_log.handlers.clear()
    access_log.propagate = False
    try:
        logs.configure("INFO", "json", stream)
        access_log.info('127.0.0.1:1 - "POST /v1/chat/completions HTTP/1.1" 200')
        assert stream.getvalue() == ""
        access_log.addHandler(logging.NullHandler())  # turned on (`serve --access-log`): ours takes it
        logs.configure("INFO", "json", stream)
        access_log.info('127.0.0.1:1 - "GET /healthz HTTP/1.1" 200', extra={"color_message": "\x1b[36m"})
        (line,) = lines(stream)
        assert line["logger"] == "uvicorn.access" and "color_message" not in line
    finally:
        access_log.handlers.clear()
        access_log.propagate = True


def test_request_lines_go_through_logging_once_the_json_handler_is_gone(stream: io.StringIO) -> None:
    out = io.StringIO()
    root = logging.getLogger()
    handler = logs.configure("INFO", "json", out)
    root.removeHandler(handler)  # someone else's logging setup replaced ours
    seen: list[logging.LogRecord] = []
    catcher = logging.Handler()
    catcher.emit = seen.append  # type: ignore[method-assign]
    root.addHandler(catcher)
    try:
        logs.RequestLog("all")(facts(), 200, 11.0)
    finally:
        root.removeHandler(catcher)
    assert out.getvalue() == "" and [r.name for r in seen] == ["app.access"]
