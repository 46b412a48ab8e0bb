"""VllmClient against a raw TCP server that drops connections on purpose: the keep-alive reuse race
(the server closes an idle connection just as the client sends on it) cannot be caused on demand with
vLLM, so this server injects its outcome: a connection closed after the request, with no response."""

from __future__ import annotations

import asyncio

import pytest

from app.backends.vllm import BackendUnavailable, VllmClient

OK = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"


async def _server(drop_first: int) -> tuple[asyncio.Server, str, list[int]]:
    """Answers every request with 200 {}, except the first `drop_first` connections: each reads its
    request and closes without a byte of response."""
    seen = [0]

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen[0] += 1
        mine = seen[0]
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            length = next(
                (
                    int(line.split(b":")[1])
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length")
                ),
                0,
            )
            await reader.readexactly(length)
            if mine > drop_first:
                writer.write(OK)
                await writer.drain()
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    return server, f"http://127.0.0.1:{port}", seen


async def test_a_connection_dropped_before_any_response_is_sent_again_once() -> None:
    server, url, seen = await _server(drop_first=1)
    client = VllmClient.create()
    try:
        resp = await client.post(url + "/v1/completions", b"{}", backend="b")
        assert resp.status == 200
        resp.release()
        assert seen[0] == 2  # the dropped one, then a new connection
    finally:
        await client.close()
        server.close()


async def test_a_backend_that_keeps_dropping_is_unavailable_after_the_second_try() -> None:
    server, url, seen = await _server(drop_first=10)
    client = VllmClient.create()
    try:
        with pytest.raises(BackendUnavailable) as err:
            await client.post(url + "/v1/completions", b"{}", backend="b")
        assert not err.value.never_reached  # it was reached: not to be sent elsewhere blindly
        assert seen[0] == 2
    finally:
        await client.close()
        server.close()
