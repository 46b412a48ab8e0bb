"""The hot path's script calls on connections of their own (app/scriptcall.py), against a real Redis:
answers as redis-py's scripts give them, connections reused and bounded, and what a restart leaves
behind (scripts flushed, connections closed by the server) costs no failed call."""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from app import scriptcall
from app.main import redis_client
from app.scriptcall import ScriptCall

REDIS_URL = os.environ.get("GATEWAY_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
# A script of its own per test run (its sha unknown to the server until this run loads it).
SCRIPT = f"-- {uuid.uuid4().hex}\nreturn {{KEYS[1], ARGV[1]}}"


@pytest.fixture
async def redis() -> AsyncIterator[Redis]:
    client = redis_client(REDIS_URL, 5.0)
    yield client
    await client.aclose()


async def test_answers_as_the_client_does_on_one_reused_connection(redis: Redis) -> None:
    call = ScriptCall(redis, SCRIPT)
    try:
        first = await call(keys=["k"], args=["a b"])
        assert first == [b"k", b"a b"]
        assert first == await redis.register_script(SCRIPT)(keys=["k"], args=["a b"])
        (conn,) = call._idle
        for i in range(20):
            assert await call(keys=["k"], args=[i]) == [b"k", str(i).encode()]
        assert call._idle == [conn]  # calls one at a time never open another connection
    finally:
        await call.close()


async def _client_id(call: ScriptCall) -> int:
    (conn,) = call._idle
    await conn.send_command("CLIENT", "ID")
    return int(await conn.read_response())


async def test_a_flushed_script_is_loaded_again(redis: Redis) -> None:
    call = ScriptCall(redis, SCRIPT)
    try:
        await call(keys=["k"], args=["1"])
        await redis.script_flush()
        assert (await call(keys=["k"], args=["2"]))[1] == b"2"
        assert (await redis.script_exists(call._script.sha)) == [True]
    finally:
        await call.close()


async def test_a_connection_the_server_closed_is_replaced_without_a_failed_call(redis: Redis) -> None:
    call = ScriptCall(redis, SCRIPT)
    try:
        await call(keys=["k"], args=["1"])
        own = await _client_id(call)
        assert await redis.client_kill_filter(_id=own) == 1
        await asyncio.sleep(0.1)  # the close reaches this process
        assert await call(keys=["k"], args=["2"]) == [b"k", b"2"]
        assert await _client_id(call) != own
    finally:
        await call.close()


async def test_connections_are_bounded_and_the_rest_go_through_the_pool(
    redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(scriptcall, "MAX_OWN", 3)
    slow = "local t = redis.call('TIME'); local s = t[1] * 1e6 + t[2]\n"
    slow += "repeat t = redis.call('TIME') until t[1] * 1e6 + t[2] > s + 20000\nreturn ARGV[1]"
    call = ScriptCall(redis, slow)
    try:
        answers = await asyncio.gather(*(call(keys=["k"], args=[str(i)]) for i in range(10)))
        assert answers == [str(i).encode() for i in range(10)]
        assert call._busy == 0 and len(call._idle) == 3
    finally:
        await call.close()
    assert call._idle == []


async def test_an_error_reply_is_raised_and_the_next_call_works(redis: Redis) -> None:
    call = ScriptCall(redis, "if ARGV[1] == 'boom' then return redis.error_reply('boom') end return 1")
    try:
        with pytest.raises(ResponseError, match="boom"):
            await call(keys=["k"], args=["boom"])
        assert call._busy == 0
        assert await call(keys=["k"], args=["fine"]) == 1
    finally:
        await call.close()
