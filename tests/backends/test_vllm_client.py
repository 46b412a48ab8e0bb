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


async def test_a_connect_timeout_counts_as_never_reached() -> None:
    """A real connect timeout, not a fake one: a listener whose accept backlog is full (nobody
    accepts) leaves further SYNs unanswered, as a pod being replaced does."""
    import socket

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    for _ in range(8):
        s = socket.socket()
        s.setblocking(False)
        try:
            s.connect(("127.0.0.1", port))
        except BlockingIOError:
            pass
        fillers.append(s)
    client = VllmClient.create(connect_timeout=0.3)
    try:
        for call in (
            lambda: client.post(f"http://127.0.0.1:{port}/v1/completions", b"{}", backend="gpu-pod-7"),
            lambda: client.list_models(f"http://127.0.0.1:{port}", backend="gpu-pod-7"),
        ):
            t = asyncio.get_running_loop().time()
            with pytest.raises(BackendUnavailable) as err:
                await asyncio.wait_for(call(), 5)
            assert err.value.never_reached  # nothing was sent: safe to place elsewhere at once
            # What a tenant would read names no backend and no address.
            assert "gpu-pod-7" not in err.value.message and "127.0.0.1" not in err.value.message
            assert asyncio.get_running_loop().time() - t < 2
    finally:
        await client.close()
        for s in fillers:
            s.close()
        listener.close()
