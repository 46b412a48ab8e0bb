"""The leak scan itself (tests/leakscan.py): it sees answers over real HTTP, in bodies and in stream
error events, learns backend names from admin calls, and lets a client's own words come back."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import httpx
import pytest
from aiohttp import web

from tests import leakscan


@pytest.fixture
async def server() -> AsyncIterator[str]:
    canned = {"name": "backend gpu-east-7 failed", "host": "at 127.0.0.1:8001"}

    async def error(request: web.Request) -> web.Response:
        body = await request.read()  # echoed when no canned message is asked for
        message = canned.get(request.query.get("say", ""), body.decode())
        return web.json_response({"error": {"message": message}}, status=404, headers={"x-request-id": "r1"})

    async def stream(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"content-type": "text/event-stream", "x-request-id": "r2"})
        await resp.prepare(request)
        await resp.write(b'data: {"choices": []}\n\ndata: {"error": {"message": "at /tmp/x')
        await resp.write(b'"}}\n\ndata: [DONE]\n\n')
        return resp

    async def admin(_: web.Request) -> web.Response:
        return web.json_response({}, status=201)

    app = web.Application()
    app.router.add_post("/v1/error", error)
    app.router.add_get("/v1/error", error)
    app.router.add_get("/v1/stream", stream)
    app.router.add_post("/admin/v1/backends", admin)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    yield f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"  # type: ignore[union-attr]
    await runner.cleanup()


async def test_the_scan_sees_leaks_and_forgives_echoes(server: str) -> None:
    found = leakscan.SCAN.found
    try:
        async with httpx.AsyncClient(base_url=server) as c:
            await c.post("/admin/v1/backends", json={"name": "gpu-east-7", "url": "http://10.1.2.3:8000"})
            await c.get("/v1/error", params={"say": "name"})
            assert len(found) == 1 and "gpu-east-7" in found[0]
            async with c.stream("GET", "/v1/stream") as r:
                async for _ in r.aiter_lines():
                    pass
            assert len(found) == 2 and "/tmp/" in found[1]
            # The client named it itself: echoed back, not leaked.
            await c.post("/v1/error", content=b"model lgw-0123456789abcdef0123456789abcdef-x")
            assert len(found) == 2

        def sync_call() -> None:  # the synchronous transport too (off the loop that serves it)
            with httpx.Client(base_url=server) as sync:
                sync.get("/v1/error", params={"say": "host"}).read()

        await asyncio.to_thread(sync_call)
        assert len(found) == 3 and "127.0.0.1:8001" in found[2]
    finally:
        found.clear()  # what this test provoked on purpose is not a leak of the gateway's
        leakscan.SCAN.secrets.discard(b"gpu-east-7")
        leakscan.SCAN.secrets.discard(b"http://10.1.2.3:8000")
