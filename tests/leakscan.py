"""The suite-wide leak scan: every error answer the gateway gives a tenant, in every test, is checked for
internals: a backend's name or URL, a served adapter name (lgw-<id>-<sha>), a filesystem path.

It watches at httpx's transports (the HTTP one and the ASGI one, which the OpenAI SDK and every test
client go through), so it sees the gateway's answers whether the gateway runs in-process or as its own
process. A gateway answer is one with an `x-request-id` header (vLLM and the fake upstreams send none)
on a tenant route (not /admin/); of those, it reads error bodies (status >= 400) and the error events
of event streams. What must not appear is learned from the admin calls the tests make (backend names
and URLs, base model paths) plus patterns no tenant answer may contain. tests/conftest.py fails any
test during which a leak was seen."""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx

_PATTERNS = [
    re.compile(rb"lgw-[0-9a-f]{32}"),  # a served adapter name
    re.compile(rb"\b(?:127\.0\.0\.1|localhost|0\.0\.0\.0):\d+"),  # a host and port
    re.compile(rb"(?<![\w/.])/(?:tmp|var|home|work|root|opt|srv|usr|etc|proc|data|mnt)/"),  # a path
]
_REQUEST_ID = re.compile(rb"\(request id: [^)]*\)")
_MAX_BODY = 256 << 10  # the part of an error body that is read


class Scan:
    def __init__(self) -> None:
        self.found: list[str] = []
        self.secrets: set[bytes] = set()  # learned: backend names and URLs, base model paths

    def learn(self, request: httpx.Request) -> None:
        path = request.url.path
        if request.method not in ("POST", "PATCH") or not path.startswith("/admin/v1/"):
            return
        if not (path.endswith(("/backends", "/base-models")) or "/backends/" in path):
            return
        try:
            body = json.loads(request.content or b"{}")
        except (ValueError, httpx.RequestNotRead):
            return
        if not isinstance(body, dict):
            return
        for field in ("name", "url", "path") if "backends" in path else ("path",):
            value = body.get(field)
            if isinstance(value, str) and len(value) >= 4:
                self.secrets.add(value.encode())
                if field == "url":  # also as a client library names it: host, or host:port
                    url = httpx.URL(value)
                    if len(url.host) >= 6:  # a short one ("x", "b3") would match ordinary words
                        self.secrets.add(url.host.encode())
                    if url.port:
                        self.secrets.add(f"{url.host}:{url.port}".encode())

    def check(self, request: httpx.Request, text: bytes, what: str) -> None:
        text = _REQUEST_ID.sub(b"", text)  # hex that short secrets could match by chance
        hits = [m.group(0) for p in _PATTERNS for m in p.finditer(text)]
        hits += [s for s in self.secrets if s in text]
        # What the client sent itself (a model it named) may be echoed back: that tells it nothing.
        sent = _sent(request)
        hits = [h.decode(errors="replace") for h in hits if h not in sent]
        if hits:
            self.found.append(f"{request.method} {request.url.path} {what} names {hits}: {text[:500]!r}")


SCAN = Scan()


def _sent(request: httpx.Request) -> bytes:
    try:
        body = request.content
    except httpx.RequestNotRead:
        body = b""
    return bytes(request.url.raw_path) + b"\n" + body


def _watched(request: httpx.Request, response: httpx.Response) -> bool:
    return "x-request-id" in response.headers and not request.url.path.startswith("/admin/")


class _Reader:
    """Sees the bytes of one answer as the test reads them: an error body whole, or the error events of
    a stream as they pass."""

    def __init__(self, request: httpx.Request, response: httpx.Response) -> None:
        self.request, self.error = request, response.status_code >= 400
        self.stream = not self.error and response.headers.get("content-type", "").startswith(
            "text/event-stream"
        )
        self.buffer = b""

    def feed(self, chunk: bytes) -> None:
        if self.error:
            if len(self.buffer) < _MAX_BODY:
                self.buffer += chunk
            return
        if not self.stream:
            return
        self.buffer += chunk
        *events, self.buffer = self.buffer.split(b"\n\n")
        for event in events:
            if b'"error"' in event:
                SCAN.check(self.request, event, "error event")

    def done(self) -> None:
        if self.error and self.buffer:
            SCAN.check(self.request, self.buffer, "error body")
        elif self.stream and b'"error"' in self.buffer:
            SCAN.check(self.request, self.buffer, "error event")
        self.buffer = b""


class _SyncStream(httpx.SyncByteStream):
    def __init__(self, inner: Any, reader: _Reader) -> None:
        self.inner, self.reader = inner, reader

    def __iter__(self) -> Iterator[bytes]:
        for chunk in self.inner:
            self.reader.feed(chunk)
            yield chunk
        self.reader.done()

    def close(self) -> None:
        self.inner.close()


class _AsyncStream(httpx.AsyncByteStream):
    def __init__(self, inner: Any, reader: _Reader) -> None:
        self.inner, self.reader = inner, reader

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for chunk in self.inner:
            self.reader.feed(chunk)
            yield chunk
        self.reader.done()

    async def aclose(self) -> None:
        await self.inner.aclose()


def install() -> None:
    """Wraps the transports' request handling, once per process."""
    if getattr(httpx.HTTPTransport, "_lgw_leakscan", False):
        return

    def sync(cls: Any) -> None:
        original = cls.handle_request

        def handle_request(self: Any, request: httpx.Request) -> httpx.Response:
            SCAN.learn(request)
            response: httpx.Response = original(self, request)
            if _watched(request, response):
                response.stream = _SyncStream(response.stream, _Reader(request, response))
            return response

        cls.handle_request = handle_request

    def asynchronous(cls: Any) -> None:
        original = cls.handle_async_request

        async def handle_async_request(self: Any, request: httpx.Request) -> httpx.Response:
            SCAN.learn(request)
            response: httpx.Response = await original(self, request)
            if _watched(request, response):
                response.stream = _AsyncStream(response.stream, _Reader(request, response))
            return response

        cls.handle_async_request = handle_async_request

    _requests()
    sync(httpx.HTTPTransport)
    asynchronous(httpx.AsyncHTTPTransport)
    asynchronous(httpx.ASGITransport)
    httpx.HTTPTransport._lgw_leakscan = True  # type: ignore[attr-defined]


def _requests() -> None:
    """schemathesis sends its requests with `requests`: its answers are read the same way."""
    import requests.adapters

    original = requests.adapters.HTTPAdapter.send

    def send(self: Any, request: Any, *args: Any, **kwargs: Any) -> Any:
        response = original(self, request, *args, **kwargs)
        if "x-request-id" in response.headers and not request.path_url.startswith("/admin/"):
            body = request.body.encode() if isinstance(request.body, str) else (request.body or b"")
            as_httpx = httpx.Request(request.method, request.url, content=body)
            if response.status_code >= 400:
                SCAN.check(as_httpx, response.content[:_MAX_BODY], "error body")
            elif response.headers.get("content-type", "").startswith("text/event-stream"):
                for event in response.content.split(b"\n\n"):
                    if b'"error"' in event:
                        SCAN.check(as_httpx, event, "error event")
        return response

    requests.adapters.HTTPAdapter.send = send  # type: ignore[method-assign]
