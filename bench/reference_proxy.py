"""The yardstick for the gateway's max req/s: the 40-line proxy of DESIGN.md's "Proxy overhead facts"
(uvicorn + uvloop + httptools serving, one pooled aiohttp client upstream), measured on the gateway's
core in the same run. It forwards the body untouched and does nothing else: no auth, no routing, no
rewriting. The issue's goal (>= 4,000 req/s per core) was set at half of what it reached (~8,700).

    UPSTREAM=http://127.0.0.1:8001 python -m uvicorn bench.reference_proxy:app --loop uvloop --http httptools
"""

from __future__ import annotations

import os
from typing import Any

import aiohttp

UPSTREAM = os.environ.get("UPSTREAM", "http://127.0.0.1:8001")
_session: aiohttp.ClientSession | None = None


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    global _session
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                _session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
                await send({"type": "lifespan.startup.complete"})
            else:
                if _session is not None:
                    await _session.close()
                await send({"type": "lifespan.shutdown.complete"})
                return
    if scope["path"] == "/health":
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})
        return
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    assert _session is not None
    headers = {"Content-Type": "application/json"}
    async with _session.post(UPSTREAM + scope["path"], data=body, headers=headers) as resp:
        data = await resp.read()
        content_type = resp.headers.get("Content-Type", "application/json").encode()
        await send(
            {
                "type": "http.response.start",
                "status": resp.status,
                "headers": [(b"content-type", content_type)],
            }
        )
        await send({"type": "http.response.body", "body": data})
