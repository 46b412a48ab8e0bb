"""The Redis store batches the hot path: touches and releases made together travel as one script call.
Runs against a private redis-server, so its command counters see this test's calls and nobody else's."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterator

import pytest
from redis.asyncio import Redis
from redis.exceptions import RedisError

from app.residency.redis_store import RedisResidency
from app.residency.state import BackendSlots, Outcome
from tests.fixtures.services import PrivateRedis

POOL = "tiny"
BIG = BackendSlots("b1", slots=64, capacity=64)


@pytest.fixture
def server() -> Iterator[PrivateRedis]:
    srv = PrivateRedis()
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture
async def store(server: PrivateRedis) -> AsyncIterator[RedisResidency]:
    redis = Redis(port=server.port, socket_timeout=2)
    yield RedisResidency(redis, prefix=f"lgw-{uuid.uuid4().hex[:6]}", lease_ttl_s=60)
    await redis.aclose()


async def _script_calls(store: RedisResidency) -> int:
    stats = await store.redis.info("commandstats")
    return sum(int(v["calls"]) for k, v in stats.items() if k in ("cmdstat_evalsha", "cmdstat_eval"))


async def _register(store: RedisResidency, adapter: str) -> None:
    r = await store.reserve(POOL, BIG, adapter, "t1", victim=None, tenant_cap=None)
    assert r.outcome is Outcome.OK
    assert await store.commit(POOL, BIG.id, adapter, r.token, "loader")
    await store.release(POOL, BIG.id, adapter, "loader")


async def test_concurrent_touches_and_releases_each_share_one_call(store: RedisResidency) -> None:
    await _register(store, "a")
    before = await _script_calls(store)
    got = await asyncio.gather(*(store.touch(POOL, "a", f"l{i}", [BIG]) for i in range(40)))
    assert got == ["b1"] * 40
    assert await _script_calls(store) - before == 1, "40 touches issued together: one script call"
    assert (await store.snapshot(POOL, [BIG]))[0].inflight == {"a": 40}
    before = await _script_calls(store)
    await asyncio.gather(*(store.release(POOL, "b1", "a", f"l{i}") for i in range(40)))
    assert await _script_calls(store) - before == 1
    assert (await store.snapshot(POOL, [BIG]))[0].inflight == {}


async def test_touches_queued_behind_a_batch_in_flight_go_in_the_next_one(store: RedisResidency) -> None:
    await _register(store, "a")
    before = await _script_calls(store)
    first = asyncio.ensure_future(store.touch(POOL, "a", "first", [BIG]))
    await asyncio.sleep(0)  # the first batch leaves with one touch ...
    await asyncio.sleep(0)
    rest = [asyncio.ensure_future(store.touch(POOL, "a", f"l{i}", [BIG])) for i in range(10)]
    assert await asyncio.gather(first, *rest) == ["b1"] * 11
    # ... and the ten queued while it was on its way share the second.
    assert await _script_calls(store) - before == 2
    assert (await store.snapshot(POOL, [BIG]))[0].inflight == {"a": 11}


async def test_a_caller_that_leaves_mid_touch_leaves_no_lease_behind(store: RedisResidency) -> None:
    await _register(store, "a")
    kept = asyncio.ensure_future(store.touch(POOL, "a", "kept", [BIG]))
    gone = asyncio.ensure_future(store.touch(POOL, "a", "gone", [BIG]))
    await asyncio.sleep(0)  # both are queued in the batch
    gone.cancel()  # the client disconnected while the batch was being sent
    assert await kept == "b1"
    with pytest.raises(asyncio.CancelledError):
        await gone
    for _ in range(50):  # the lease the batch took for it is given back by a follow-up call
        if (await store.snapshot(POOL, [BIG]))[0].inflight == {"a": 1}:
            break
        await asyncio.sleep(0.01)
    assert (await store.snapshot(POOL, [BIG]))[0].inflight == {"a": 1}


async def test_redis_down_fails_every_caller_and_recovers(
    store: RedisResidency, server: PrivateRedis
) -> None:
    await _register(store, "a")
    server.stop()
    results = await asyncio.wait_for(
        asyncio.gather(*(store.touch(POOL, "a", f"l{i}", [BIG]) for i in range(5)), return_exceptions=True),
        timeout=10,
    )
    assert all(isinstance(r, RedisError | OSError) for r in results), results
    server.start()  # an empty server: the state is gone, as after a Redis restart without persistence
    assert await store.touch(POOL, "a", "after", [BIG]) is None
    await _register(store, "a")
    assert await store.touch(POOL, "a", "after", [BIG]) == "b1"


async def test_a_release_nobody_waits_for_rides_with_a_touch_issued_with_it(store: RedisResidency) -> None:
    await _register(store, "a")
    assert await store.touch(POOL, "a", "first", [BIG]) == "b1"
    before = await _script_calls(store)
    store.release_nowait(POOL, "b1", "a", "first")
    assert await store.touch(POOL, "a", "second", [BIG]) == "b1"
    assert await _script_calls(store) - before == 1, "the release should have travelled with the touch"
    assert (await store.snapshot(POOL, [BIG]))[0].inflight == {"a": 1}


async def test_a_release_nobody_waits_for_leaves_on_its_own(store: RedisResidency) -> None:
    await _register(store, "a")
    assert await store.touch(POOL, "a", "only", [BIG]) == "b1"
    store.release_nowait(POOL, "b1", "a", "only")
    await asyncio.sleep(0.1)  # no other call comes: it goes by itself
    assert (await store.snapshot(POOL, [BIG]))[0].inflight == {}
