"""One contract, two limit stores: in-process and Redis (a real server) admit, refuse and settle alike;
and the window arithmetic they share, on a clock of the test's own."""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import uuid
from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis

from app.errors import RateLimited
from app.limits.memory import MemoryLimits
from app.limits.redis_store import RedisLimits
from app.limits.state import Limits, LimitStore, Scope, duration, reset_in, wait_for

REDIS_URL = os.environ.get("GATEWAY_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


def scope(tenant: str = "t1", key: str = "tenant", **limits: int) -> Scope:
    return Scope(f"{tenant}:{key}", tenant, Limits(**limits))


@pytest.fixture(params=["memory", "redis"])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[LimitStore]:
    if request.param == "memory":
        yield MemoryLimits(lease_s=1.0)
        return
    redis = Redis.from_url(REDIS_URL)
    prefix = f"lgw-lim-test-{uuid.uuid4().hex[:8]}"
    limits = RedisLimits(redis, prefix=prefix, lease_s=1.0)
    yield limits
    await limits.close()
    keys = [k async for k in redis.scan_iter(match=f"{prefix}:*")]
    if keys:
        await redis.delete(*keys)
    await redis.aclose()


def rid() -> str:
    return uuid.uuid4().hex


@pytest.fixture
async def on_redis() -> AsyncIterator[tuple[Redis, str]]:
    """A Redis client and a key prefix of the test's own; its keys are deleted afterwards."""
    redis = Redis.from_url(REDIS_URL)
    prefix = f"lgw-lim-test-{uuid.uuid4().hex[:8]}"
    yield redis, prefix
    keys = [k async for k in redis.scan_iter(match=f"{prefix}:*")]
    if keys:
        await redis.delete(*keys)
    await redis.aclose()


async def test_requests_per_minute(store: LimitStore) -> None:
    s = [scope(requests_per_minute=5)]
    remaining = []
    for _ in range(5):
        a = await store.admit(s, rid(), 0)
        assert a.ok and a.requests is not None
        remaining.append(a.requests.remaining)
    assert remaining == [4, 3, 2, 1, 0]
    refused = await store.admit(s, rid(), 0)
    assert not refused.ok and refused.refused == "requests"
    assert 0 < refused.retry_after_s <= 120
    assert refused.requests is not None and refused.requests.remaining == 0 and refused.requests.limit == 5
    assert refused.tokens is None  # no token limit: no token window


async def test_tokens_are_reserved_then_settled_to_the_real_usage(store: LimitStore) -> None:
    s = [scope(tokens_per_minute=100)]
    first = await store.admit(s, "r1", 60)
    assert first.ok and first.tokens is not None and first.tokens.remaining == 40
    second = await store.admit(s, "r2", 50)
    assert not second.ok and second.refused == "tokens"  # 60 reserved + 50 > 100
    await store.settle(s, "r1", first.window, 20 - 60)  # it used 20 of its 60
    third = await store.admit(s, "r3", 50)
    assert third.ok and third.tokens is not None and third.tokens.remaining == 30
    too_large = await store.admit(s, "r4", 101)
    assert not too_large.ok and too_large.refused == "tokens_too_large"


async def test_concurrency_places_are_freed_at_the_end_or_after_a_lease(store: LimitStore) -> None:
    s = [scope(concurrent_requests=2)]
    a, b = await store.admit(s, "a", 0), await store.admit(s, "b", 0)
    assert a.ok and b.ok
    c = await store.admit(s, "c", 0)
    assert not c.ok and c.refused == "concurrency"
    await store.settle(s, "a", a.window, 0)
    assert (await store.admit(s, "c", 0)).ok
    # "b" is renewed, "c" is not: after one lease (1 s) only "c"'s place is free again.
    await asyncio.sleep(0.6)
    await store.renew([(s, "b")])
    await asyncio.sleep(0.6)
    assert (await store.admit(s, "d", 0)).ok
    assert not (await store.admit(s, "e", 0)).ok  # b and d hold both places


async def test_admission_is_all_or_nothing_over_the_scopes(store: LimitStore) -> None:
    tenant = scope(key="tenant", requests_per_minute=10, tokens_per_minute=1000)
    key = scope(key="key-1", requests_per_minute=2)
    for _ in range(2):
        assert (await store.admit([tenant, key], rid(), 10)).ok
    refused = await store.admit([tenant, key], rid(), 10)
    assert not refused.ok and refused.refused == "requests"
    assert refused.requests is not None and refused.requests.limit == 2  # the tightest scope's window
    assert refused.tokens is not None and refused.tokens.remaining == 1000 - 20  # nothing counted
    other_key = scope(key="key-2", requests_per_minute=2)
    a = await store.admit([tenant, other_key], rid(), 10)
    assert a.ok and a.requests is not None and a.requests.remaining == 1  # key-2's: 2 - 1
    alone = await store.admit([tenant], rid(), 10)
    assert alone.ok and alone.requests is not None and alone.requests.remaining == 10 - 4


async def test_tenants_do_not_share_counters(store: LimitStore) -> None:
    assert (await store.admit([scope("t1", requests_per_minute=1)], rid(), 0)).ok
    assert not (await store.admit([scope("t1", requests_per_minute=1)], rid(), 0)).ok
    assert (await store.admit([scope("t2", requests_per_minute=1)], rid(), 0)).ok


async def test_replicas_on_one_redis_admit_exactly_the_limit_together() -> None:
    """Four replicas (each its own client, as gateway processes have), 200 requests at once."""
    clients = [Redis.from_url(REDIS_URL) for _ in range(4)]
    prefix = f"lgw-lim-test-{uuid.uuid4().hex[:8]}"
    replicas = [RedisLimits(c, prefix=prefix) for c in clients]
    s = [scope(requests_per_minute=37, concurrent_requests=1000)]
    try:
        results = await asyncio.gather(*(replicas[i % 4].admit(s, rid(), 0) for i in range(200)))
    finally:
        keys = [k async for k in clients[0].scan_iter(match=f"{prefix}:*")]
        await clients[0].delete(*keys)
        for c in clients:
            await c.aclose()
    assert sum(a.ok for a in results) == 37


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


async def test_the_window_slides() -> None:
    """30 s into a window: ten requests fill an rpm of 10. 30 s later (a new window) the ten still
    count in full; 60 s later half of them have slid out, so five more fit."""
    clock = Clock(1_000_020.0)  # 1_000_020 // 60 = 16667 windows, 0 s in: start 30 s in
    clock.now = 16667 * 60 + 30.0
    store = MemoryLimits(clock=clock)
    s = [scope(requests_per_minute=10)]
    assert all([(await store.admit(s, rid(), 0)).ok for _ in range(10)])
    clock.now += 30.0
    refused = await store.admit(s, rid(), 0)
    assert not refused.ok and refused.retry_after_s == pytest.approx(6.0)  # 10 * (1 - f) <= 9: f = 0.1
    clock.now += 30.0
    assert [(await store.admit(s, rid(), 0)).ok for _ in range(6)] == [True] * 5 + [False]


def test_window_arithmetic() -> None:
    assert wait_for(0, 0, 0.5, 1, 10) == 0
    assert math.isinf(wait_for(0, 0, 0.0, 11, 10))
    # All ten in the current window, half-way through: the first place frees when the next window's
    # estimate 10 * (1 - f) drops to 9, at f = 0.1: 30 s + 6 s.
    assert wait_for(10, 0, 0.5, 1, 10) == pytest.approx(36.0)
    assert reset_in(10, 0, 0.5) == pytest.approx(90.0) and reset_in(0, 4, 0.25) == pytest.approx(45.0)
    assert reset_in(0, 0, 0.3) == 0
    assert [duration(x) for x in (0.02, 1.0, 59.2, 360.0, 61.0)] == ["20ms", "1s", "1m0s", "6m0s", "1m1s"]


async def test_a_burst_larger_than_the_connection_pool_waits_for_connections() -> None:
    """The gateway's Redis client blocks for a free connection (bounded by its timeout) instead of
    failing with "Too many connections" (redis-py's default pool raises at once at 100: a 503 for every
    request of a burst; bench/overhead.py with limits on hit it)."""
    from app.main import redis_client

    client = redis_client(REDIS_URL, 2.0, max_connections=8)
    prefix = f"lgw-lim-test-{uuid.uuid4().hex[:8]}"
    store = RedisLimits(client, prefix=prefix)
    s = [scope(requests_per_minute=10_000)]
    try:
        results = await asyncio.gather(*(store.admit(s, rid(), 0) for _ in range(300)))
    finally:
        keys = [k async for k in client.scan_iter(match=f"{prefix}:*")]
        await client.delete(*keys)
        await client.aclose()
    assert all(a.ok for a in results)


async def test_an_admission_whose_caller_left_is_given_back() -> None:
    """The caller is cancelled (its client left) while its admission is on its way to Redis: whatever
    the script did for it is undone, so neither its place nor its tokens stay taken. (The in-process
    store admits without yielding: no caller can leave half-way.)"""
    redis = Redis.from_url(REDIS_URL)
    prefix = f"lgw-lim-test-{uuid.uuid4().hex[:8]}"
    store = RedisLimits(redis, prefix=prefix)
    s = [scope(concurrent_requests=1, tokens_per_minute=100)]
    task = asyncio.create_task(store.admit(s, "gone", 80))
    await asyncio.sleep(0)  # queued (Redis: in the batch on its way)
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    for _ in range(50):
        a = await store.admit(s, "next", 80)
        if a.ok:
            break
        await asyncio.sleep(0.02)
    keys = [k async for k in redis.scan_iter(match=f"{prefix}:*")]
    await redis.delete(*keys)
    await redis.aclose()
    assert a.ok and a.tokens is not None and a.tokens.remaining == 20


async def test_the_gate_renews_places_of_requests_still_running_in_either_store(store: LimitStore) -> None:
    """A request that runs longer than a lease keeps its place: the gate renews it (the in-process store
    too), and frees it when the response ends."""
    from app.limits.gate import LimitGate, Ticket

    gate = LimitGate(store, renew_s=0.3)  # the stores' lease here: 1 s
    s = [scope(concurrent_requests=1)]
    long = Ticket(s, rid(), 0)
    await gate.admit_soon(long)
    await asyncio.sleep(1.5)  # past one lease: only the renewals keep it
    with pytest.raises(RateLimited):
        await gate.admit_soon(Ticket(s, rid(), 0))
    gate.settle(long, 0)
    await asyncio.sleep(0.05)
    await gate.admit_soon(Ticket(s, rid(), 0))
    await gate.close()


async def test_an_admission_answered_after_its_caller_left_is_given_back() -> None:
    """The store's answer arrives, and the caller is cancelled before the gate reads it (the gap between
    Redis answering and the admission's callback): the gate undoes the admission itself."""
    from app.limits.gate import LimitGate, Ticket

    redis = Redis.from_url(REDIS_URL)
    prefix = f"lgw-lim-test-{uuid.uuid4().hex[:8]}"
    store = RedisLimits(redis, prefix=prefix)
    gate = LimitGate(store)
    held: dict[str, asyncio.Future[None]] = {}
    start = store.admit_raw

    def racing(*args: object) -> asyncio.Future[object]:
        raw = start(*args)  # type: ignore[arg-type]
        raw.add_done_callback(lambda _: held["out"].cancel())  # runs before the gate's own callback
        return raw

    store.admit_raw = racing  # type: ignore[method-assign]
    s = [scope(concurrent_requests=1, tokens_per_minute=100)]
    try:
        held["out"] = gate.admit_soon(Ticket(s, "gone", 80))
        with contextlib.suppress(asyncio.CancelledError):
            await held["out"]
        store.admit_raw = start  # type: ignore[method-assign]
        for _ in range(50):
            try:
                await gate.admit_soon(Ticket(s, rid(), 80))
                break
            except RateLimited:
                await asyncio.sleep(0.02)
        else:
            raise AssertionError("the cancelled admission kept its place")
    finally:
        await gate.close()
        keys = [k async for k in redis.scan_iter(match=f"{prefix}:*")]
        if keys:
            await redis.delete(*keys)
        await redis.aclose()


async def test_a_settlement_rides_on_the_next_admission_or_goes_out_by_itself(
    monkeypatch: pytest.MonkeyPatch, on_redis: tuple[Redis, str]
) -> None:
    """Redis: a settlement nobody waits for goes out with the next call of its scopes (before the
    admissions queued after it), or on its own within SETTLE_DELAY_S when no call comes."""
    from app.limits import redis_store

    monkeypatch.setattr(redis_store, "SETTLE_DELAY_S", 0.2)  # long enough to see it wait on a busy box
    redis, prefix = on_redis
    store = RedisLimits(redis, prefix=prefix)
    s = (scope(concurrent_requests=1),)
    in_flight = f"{prefix}:lim:{{t1}}:f:t1:tenant"
    try:
        first = await store.admit(s, "first", 0)
        assert first.ok and await redis.zcard(in_flight) == 1
        store.settle_nowait(s, "first", first.window, 0)
        assert (await store.admit(s, "second", 0)).ok  # the place was freed in the same call, first
        store.settle_nowait(s, "second", first.window, 0)
        await asyncio.sleep(0.02)
        assert await redis.zcard(in_flight) == 1  # still waiting for a call to ride on
        for _ in range(100):
            await asyncio.sleep(0.05)
            if await redis.zcard(in_flight) == 0:
                break  # it went on its own
        else:
            raise AssertionError("the settlement never went out")
    finally:
        await store.close()


async def test_an_admission_that_timed_out_after_it_ran_gives_its_place_back(on_redis: tuple[Redis, str]) -> None:
    """Redis ran the admission, but the answer came too late (the client's timeout): the request is
    refused (fail closed) and its place is freed at once, not one lease later. A fake injects the late
    answer (the real script runs, then the call raises TimeoutError): a real server cannot be made to
    time out exactly after running a script."""
    from app.limits.gate import LimitGate, Ticket

    redis, prefix = on_redis
    store = RedisLimits(redis, prefix=prefix, lease_s=60.0)
    gate = LimitGate(store)
    real = store._batch_script
    late = {"on": True}

    async def ran_then_timed_out(*, keys: object, args: object) -> object:
        answer = await real(keys=keys, args=args)  # type: ignore[arg-type]
        if late["on"] and any(str(a).startswith("A ") for a in args):  # type: ignore[attr-defined]
            late["on"] = False
            raise TimeoutError("Timeout reading from socket")
        return answer

    store._batch_script = ran_then_timed_out  # type: ignore[assignment]
    s = (scope(concurrent_requests=1),)
    in_flight = f"{prefix}:lim:{{t1}}:f:t1:tenant"
    try:
        with pytest.raises(TimeoutError):
            await gate.admit_soon(Ticket(s, "timed-out", 0))
        for _ in range(100):
            if await redis.zcard(in_flight) == 0:
                break
            await asyncio.sleep(0.01)
        else:
            raise AssertionError("the place the timed-out admission took is still held")
        await gate.admit_soon(Ticket(s, rid(), 0))  # admitted at once: no lease to wait out
    finally:
        store._batch_script = real
        await gate.close()


async def test_a_settlement_comes_before_the_next_admission_through_another_key(store: LimitStore) -> None:
    """One tenant place, two API keys with limits of their own: the place one key's request gives back
    (not waited for) is free for the other key's next request, at once."""
    tenant = scope(concurrent_requests=1)
    via_a = (tenant, scope(key="key-a", requests_per_minute=100))
    via_b = (tenant, scope(key="key-b", requests_per_minute=100))
    first = await store.admit(via_a, "first", 0)
    assert first.ok
    store.settle_nowait(via_a, "first", first.window, 0)
    second = await store.admit(via_b, "second", 0)
    assert second.ok, second.refused
    store.settle_nowait(via_b, "second", second.window, 0)
    assert (await store.admit((tenant,), "third", 0)).ok  # and through the tenant alone
