"""Every residency script declares every key it touches, and the store leaves no key behind once its
leases and waiters are gone. Watched on a real Redis through MONITOR: each command a script runs is
checked against the KEYS of the EVALSHA that ran it (what Redis Cluster and key-pattern ACLs need)."""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
from redis.asyncio import Redis

from app.residency.redis_store import RedisResidency
from app.residency.state import BackendSlots, Outcome

REDIS_URL = os.environ.get("GATEWAY_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
POOL = "tiny"
B1 = BackendSlots("b1", slots=1, capacity=2)
B2 = BackendSlots("b2", slots=2, capacity=3)
# Commands the scripts run that name no key.
_KEYLESS = {"TIME"}


@pytest.fixture
async def redis() -> AsyncIterator[Redis]:
    r = Redis.from_url(REDIS_URL)
    yield r
    await r.aclose()


async def _exercise(store: RedisResidency) -> None:
    """Runs every script at least once, through the paths that touch the most keys."""
    assert await store.touch(POOL, "a", "l0", [B1, B2]) is None
    r = await store.reserve(
        POOL, B1, "a", "t1", victim=None, tenant_cap=1, pool_loads=2, pool_backends=["b1", "b2"]
    )
    assert r.outcome is Outcome.OK
    assert await store.commit(POOL, "b1", "a", r.token, "l1")
    r = await store.reserve(POOL, B2, "b", "t1", victim=None, tenant_cap=None)
    await store.abort(POOL, "b2", "b", r.token)
    r = await store.reserve(POOL, B2, "b", "t2", victim=None, tenant_cap=None)
    assert await store.commit(POOL, "b2", "b", r.token, "l2")
    assert await store.touch(POOL, "a", "l3", [B1, B2]) == "b1"
    assert await store.acquire(POOL, "b2", "b", "l4")
    assert await store.renew(POOL, [("b1", "a", "l1"), ("b2", "b", "l2"), ("b2", "b", "gone")]) == 2
    await store.release(POOL, "b1", "a", "l1")
    store.release_nowait(POOL, "b1", "a", "l3")
    for lease in ("l2", "l4"):
        await store.release(POOL, "b2", "b", lease)
    # b1 is full (capacity 2): a swap evicts "a", then trim and reconcile run over what is left.
    r = await store.reserve(POOL, B1, "c", "t1", victim=None, tenant_cap=None)
    assert await store.commit(POOL, "b1", "c", r.token, "l5")
    await store.release(POOL, "b1", "c", "l5")
    r = await store.reserve(POOL, B1, "d", "t1", victim="a", tenant_cap=None)
    assert r.outcome is Outcome.OK
    await store.evicted(POOL, "b1", "a")
    assert await store.commit(POOL, "b1", "d", r.token, "l6")
    await store.release(POOL, "b1", "d", "l6")
    assert await store.trim(POOL, BackendSlots("b1", slots=1, capacity=1), frozenset()) == ["c"]
    await store.evicted(POOL, "b1", "c")
    await store.forget(POOL, "b1", "d")
    await store.reconcile(POOL, "b2", {"b", "e"}, {"b"})
    await store.snapshot(POOL, [B1, B2])
    await store.waiting(POOL, "r1", {"a": 2}, 5)
    await store.waiting(POOL, "r2", {"a": 1, "b": 1}, 5)
    assert await store.waiting(POOL, "r1", {}, 5) == {"a": 1, "b": 1}
    await store.waiting(POOL, "r2", {}, 5)


async def test_every_script_declares_every_key_it_touches(redis: Redis) -> None:
    prefix = f"lgw-keys-{uuid.uuid4().hex[:8]}"
    store = RedisResidency(Redis.from_url(REDIS_URL), prefix=prefix, lock_ttl_s=5, lease_ttl_s=30)
    watcher = Redis.from_url(REDIS_URL)
    seen: list[dict[str, Any]] = []
    try:
        async with watcher.monitor() as monitor:

            async def listen() -> None:
                async for event in monitor.listen():
                    seen.append(event)

            task = asyncio.create_task(listen())
            await asyncio.sleep(0.2)
            await _exercise(store)
            await asyncio.sleep(0.5)  # MONITOR's stream trails the replies
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    finally:
        await store.redis.aclose()
        await watcher.aclose()
        keys = [k async for k in redis.scan_iter(match=f"{prefix}:*")]
        if keys:
            await redis.delete(*keys)

    declared: set[str] | None = None
    shas, checked = set(), 0
    for event in seen:
        words = event["command"].split(" ")
        if event.get("client_type") != "lua":
            if words[0] == "EVALSHA" and prefix in event["command"]:
                n = int(words[2])
                declared = set(words[3 : 3 + n])
                shas.add(words[1])
            elif words[0] in {"EVALSHA", "EVAL"}:
                declared = None  # another test's script: not ours to check
            continue
        if declared is None or words[0].upper() in _KEYLESS:
            continue
        assert words[1] in declared, f"{event['command']} touches an undeclared key"
        checked += 1
    store_shas = {s.sha for s in vars(store).values() if hasattr(s, "sha")}
    assert store_shas and store_shas <= shas, "every script ran under the watch"
    assert checked > 100


async def test_no_key_outlives_its_leases_and_waiters(redis: Redis) -> None:
    """After a burst, once the leases are released (or expire) and the waiters are gone, the only keys
    left are the residency itself (what is loaded where, and the fencing counter)."""
    prefix = f"lgw-idle-{uuid.uuid4().hex[:8]}"
    store = RedisResidency(Redis.from_url(REDIS_URL), prefix=prefix, lock_ttl_s=5, lease_ttl_s=0.5)
    try:
        await _exercise(store)
        r = await store.reserve(POOL, B2, "f", "t1", victim=None, tenant_cap=None)
        assert await store.commit(POOL, "b2", "f", r.token, "expires")  # never released
        await store.waiting(POOL, "dead-replica", {"f": 3}, 0.5)  # never withdrawn
        await asyncio.sleep(0.7)
        found = [k.decode() async for k in redis.scan_iter(match=f"{prefix}:*")]
        keys = sorted(k.removeprefix(f"{prefix}:{{{POOL}}}:") for k in found)
        assert keys == ["fence", "gone:b1", "reg:b2", "ten:b2"]
    finally:
        await store.redis.aclose()
        keys = [k async for k in redis.scan_iter(match=f"{prefix}:*")]
        if keys:
            await redis.delete(*keys)
