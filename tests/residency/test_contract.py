"""One contract, two stores: the in-process store and the Redis store (a real server) behave the same."""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis

from app.residency.memory import MemoryResidency
from app.residency.redis_store import RedisResidency
from app.residency.state import BackendSlots, Outcome, ResidencyStore

REDIS_URL = os.environ.get("GATEWAY_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
POOL = "tiny"
B1 = BackendSlots("b1", slots=2, capacity=3)
B2 = BackendSlots("b2", slots=2, capacity=3)


async def _stores(kind: str, lease_ttl_s: float) -> AsyncIterator[ResidencyStore]:
    if kind == "memory":
        yield MemoryResidency(lock_ttl_s=0.3, lease_ttl_s=lease_ttl_s)
        return
    redis = Redis.from_url(REDIS_URL)
    prefix = f"lgw-test-{uuid.uuid4().hex[:8]}"
    yield RedisResidency(redis, prefix=prefix, lock_ttl_s=0.3, lease_ttl_s=lease_ttl_s)
    keys = [k async for k in redis.scan_iter(match=f"{prefix}:*")]
    if keys:
        await redis.delete(*keys)
    await redis.aclose()


@pytest.fixture(params=["memory", "redis"])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[ResidencyStore]:
    async for s in _stores(request.param, lease_ttl_s=60):
        yield s


async def load(
    store: ResidencyStore,
    backend: BackendSlots,
    adapter: str,
    tenant: str = "t1",
    victim: str | None = None,
    lease: str | None = None,
) -> str:
    """Reserve + commit, as the data path does after a successful vLLM load; returns the lease."""
    r = await store.reserve(POOL, backend, adapter, tenant, victim=victim, tenant_cap=None)
    assert r.outcome is Outcome.OK, r
    lease = lease or uuid.uuid4().hex
    assert await store.commit(POOL, backend.id, adapter, r.token, lease)
    return lease


async def state(store: ResidencyStore, backend: BackendSlots = B1):  # type: ignore[no-untyped-def]
    return (await store.snapshot(POOL, [backend]))[0]


class TestHotPath:
    async def test_touch_misses_until_loaded(self, store: ResidencyStore) -> None:
        assert await store.touch(POOL, "a", "l1", [B1, B2]) is None
        lease = await load(store, B1, "a")
        await store.release(POOL, "b1", "a", lease)
        assert await store.touch(POOL, "a", "l2", [B1, B2]) == "b1"
        assert (await state(store)).inflight == {"a": 1}

    async def test_touch_spreads_over_holders_by_inflight(self, store: ResidencyStore) -> None:
        await load(store, B1, "a")
        await load(store, B2, "a")
        # b1 and b2 each have one request in flight; the next two go one to each.
        got = [await store.touch(POOL, "a", f"x{i}", [B1, B2]) for i in range(2)]
        assert sorted(got) == ["b1", "b2"]  # type: ignore[type-var]

    async def test_touch_joins_the_least_busy_active_holder(self, store: ResidencyStore) -> None:
        # Busy counts every request on the backend, not only this adapter's.
        await load(store, B1, "a")
        await load(store, B1, "b")
        assert await store.acquire(POOL, "b1", "b", "b2nd")
        await load(store, B2, "a")
        assert await store.acquire(POOL, "b2", "a", "a2nd")
        assert await store.touch(POOL, "a", "l", [B1, B2]) == "b2"  # 2 requests there, 3 on b1

    async def test_touch_prefers_an_active_holder_to_an_idle_one(self, store: ResidencyStore) -> None:
        await store.release(POOL, "b1", "a", await load(store, B1, "a"))
        await load(store, B2, "a")
        assert await store.acquire(POOL, "b2", "a", "second")
        # Idle on b1 (a free slot there, no request), active on b2 with two: joining costs no slot.
        assert await store.touch(POOL, "a", "l", [B1, B2]) == "b2"

    async def test_touch_respects_seats(self, store: ResidencyStore) -> None:
        b1 = BackendSlots("b1", slots=2, capacity=3, seats=2)
        await load(store, b1, "a")
        lb = await load(store, b1, "b")
        # Two requests in flight fill both seats: not even the active adapter takes one more.
        assert await store.touch(POOL, "a", "l", [b1]) is None
        assert await store.touch(POOL, "b", "l", [b1]) is None
        await store.release(POOL, "b1", "b", lb)
        assert await store.touch(POOL, "a", "l", [b1]) == "b1"
        # Unknown seats (None): no seat limit.
        assert await store.touch(POOL, "a", "l2", [B1]) == "b1"

    async def test_touch_activates_an_idle_adapter_only_below_the_target(self, store: ResidencyStore) -> None:
        b1 = BackendSlots("b1", slots=2, capacity=3, seats=8, target=1)
        la = await load(store, b1, "a")
        await store.release(POOL, "b1", "c", await load(store, b1, "c"))
        # One active adapter is the target: idle c waits though a GPU slot is free; active a joins.
        assert await store.touch(POOL, "c", "l", [b1]) is None
        assert await store.touch(POOL, "a", "l", [b1]) == "b1"
        await store.release(POOL, "b1", "a", la)
        await store.release(POOL, "b1", "a", "l")
        # A load under way counts against the target too.
        assert (await store.reserve(POOL, b1, "d", "t1", victim=None, tenant_cap=None)).outcome is Outcome.OK
        assert await store.touch(POOL, "c", "l", [b1]) is None

    async def test_touch_respects_gpu_slots(self, store: ResidencyStore) -> None:
        # Two slots: with two other adapters active, a third (registered, idle) adapter has no room.
        la = await load(store, B1, "a")
        lb = await load(store, B1, "b")
        lc = await load(store, B1, "c")
        await store.release(POOL, "b1", "c", lc)
        assert await store.touch(POOL, "c", "l", [B1]) is None
        await store.release(POOL, "b1", "a", la)
        assert await store.touch(POOL, "c", "l", [B1]) == "b1"
        del lb

    async def test_touch_counts_loads_under_way_as_taken_slots(self, store: ResidencyStore) -> None:
        la = await load(store, B1, "a")
        await store.release(POOL, "b1", "c", await load(store, B1, "c"))
        assert (await store.reserve(POOL, B1, "d", "t1", victim=None, tenant_cap=None)).outcome is Outcome.OK
        # Slot 1: a (in flight); slot 2: claimed by d's load. Idle c has no room.
        assert await store.touch(POOL, "c", "l", [B1]) is None
        await store.release(POOL, "b1", "a", la)
        assert await store.touch(POOL, "c", "l", [B1]) == "b1"

    async def test_release_is_idempotent_and_counts_per_lease(self, store: ResidencyStore) -> None:
        lease = await load(store, B1, "a")
        assert await store.acquire(POOL, "b1", "a", "second")
        assert (await state(store)).inflight == {"a": 2}
        await store.release(POOL, "b1", "a", lease)
        await store.release(POOL, "b1", "a", lease)
        assert (await state(store)).inflight == {"a": 1}
        await store.release(POOL, "b1", "a", "second")
        assert (await state(store)).inflight == {}

    async def test_release_nowait_is_seen_by_the_next_touch(self, store: ResidencyStore) -> None:
        la = await load(store, B1, "a")
        await load(store, B1, "b")
        await store.release(POOL, "b1", "c", await load(store, B1, "c"))
        assert await store.touch(POOL, "c", "l", [B1]) is None  # both GPU slots active
        store.release_nowait(POOL, "b1", "a", la)  # the end of a response: nobody waits for it
        assert await store.touch(POOL, "c", "l", [B1]) == "b1"
        assert (await state(store)).inflight == {"b": 1, "c": 1}

    async def test_acquire_needs_registration(self, store: ResidencyStore) -> None:
        assert not await store.acquire(POOL, "b1", "nope", "l")


class TestLruAndEviction:
    async def test_lru_order(self, store: ResidencyStore) -> None:
        for a in ("a", "b", "c"):
            await store.release(POOL, "b1", a, await load(store, B1, a))
            await asyncio.sleep(0.005)
        await store.release(POOL, "b1", "a", "x") if await store.touch(POOL, "a", "x", [B1]) else None
        s = await state(store)
        assert sorted(s.registered, key=s.registered.__getitem__) == ["b", "c", "a"]

    async def test_full_backend_needs_a_victim(self, store: ResidencyStore) -> None:
        for a in ("a", "b", "c"):
            await store.release(POOL, "b1", a, await load(store, B1, a))
        r = await store.reserve(POOL, B1, "d", "t1", victim=None, tenant_cap=None)
        assert r.outcome is Outcome.FULL
        r = await store.reserve(POOL, B1, "d", "t1", victim="a", tenant_cap=None)
        assert r.outcome is Outcome.OK
        s = await state(store)
        assert "a" not in s.registered and s.evicting == {"a"} and s.loading == {"d"}
        # While a is being evicted and d loaded, neither can be reserved again.
        assert (
            await store.reserve(POOL, B1, "a", "t1", victim=None, tenant_cap=None)
        ).outcome is Outcome.BUSY
        assert (
            await store.reserve(POOL, B1, "d", "t1", victim=None, tenant_cap=None)
        ).outcome is Outcome.BUSY
        await store.evicted(POOL, "b1", "a")
        assert (await state(store)).evicting == set()

    async def test_swap_allowed_above_capacity(self, store: ResidencyStore) -> None:
        # Rebuilt from a backend that holds more than its capacity (say, after Redis lost everything).
        await store.reconcile(POOL, "b1", {"a", "b", "c", "d"}, known_before=set())
        assert (
            await store.reserve(POOL, B1, "e", "t1", victim=None, tenant_cap=None)
        ).outcome is Outcome.FULL
        assert (await store.reserve(POOL, B1, "e", "t1", victim="a", tenant_cap=None)).outcome is Outcome.OK

    async def test_inflight_adapter_is_never_evicted(self, store: ResidencyStore) -> None:
        busy = await load(store, B1, "a")
        for a in ("b", "c"):
            await store.release(POOL, "b1", a, await load(store, B1, a))
        r = await store.reserve(POOL, B1, "d", "t1", victim="a", tenant_cap=None)
        assert r.outcome is Outcome.FULL
        assert "a" in (await state(store)).registered
        await store.release(POOL, "b1", "a", busy)
        assert (await store.reserve(POOL, B1, "d", "t1", victim="a", tenant_cap=None)).outcome is Outcome.OK

    async def test_victim_gone_meanwhile_is_a_conflict(self, store: ResidencyStore) -> None:
        for a in ("a", "b", "c"):
            await store.release(POOL, "b1", a, await load(store, B1, a))
        await store.forget(POOL, "b1", "a")
        # The decision was made on an older snapshot: the store refuses it, the caller decides again.
        r = await store.reserve(POOL, B1, "d", "t1", victim="a", tenant_cap=None)
        assert r.outcome is Outcome.FULL
        assert (await state(store)).evicting == set()
        assert (await store.reserve(POOL, B1, "d", "t1", victim=None, tenant_cap=None)).outcome is Outcome.OK

    async def test_already_live_is_reported(self, store: ResidencyStore) -> None:
        await load(store, B1, "a")
        assert (
            await store.reserve(POOL, B1, "a", "t1", victim=None, tenant_cap=None)
        ).outcome is Outcome.LIVE


class TestTenantCaps:
    async def test_cap_per_backend(self, store: ResidencyStore) -> None:
        await store.release(POOL, "b1", "a", await load(store, B1, "a", tenant="t1"))
        r = await store.reserve(POOL, B1, "b", "t1", victim=None, tenant_cap=1)
        assert r.outcome is Outcome.TENANT_CAP
        # Other tenants are not limited by t1's cap; t1 may replace one of its own.
        other = await store.reserve(POOL, B1, "x", "t2", victim=None, tenant_cap=1)
        assert other.outcome is Outcome.OK
        await store.abort(POOL, "b1", "x", other.token)  # one load at a time per backend
        assert (await store.reserve(POOL, B1, "b", "t1", victim="a", tenant_cap=1)).outcome is Outcome.OK
        # The cap is per backend.
        assert (await store.reserve(POOL, B2, "c", "t1", victim=None, tenant_cap=1)).outcome is Outcome.OK


class TestLocks:
    async def test_fencing_token_and_expiry(self, store: ResidencyStore) -> None:
        first = await store.reserve(POOL, B1, "a", "t1", victim=None, tenant_cap=None)
        assert first.outcome is Outcome.OK
        assert (
            await store.reserve(POOL, B1, "a", "t1", victim=None, tenant_cap=None)
        ).outcome is Outcome.BUSY
        await asyncio.sleep(0.4)  # the 0.3 s lock expires: its holder died mid-load
        second = await store.reserve(POOL, B1, "a", "t1", victim=None, tenant_cap=None)
        assert second.outcome is Outcome.OK
        assert second.token > first.token
        # The first holder comes back late: fenced out; the new holder commits.
        assert not await store.commit(POOL, "b1", "a", first.token, "l1")
        assert await store.commit(POOL, "b1", "a", second.token, "l2")

    async def test_expired_loads_free_capacity(self, store: ResidencyStore) -> None:
        for a in ("a", "b"):
            await store.release(POOL, "b1", a, await load(store, B1, a))
        assert (await store.reserve(POOL, B1, "c", "t1", victim=None, tenant_cap=None)).outcome is Outcome.OK
        assert (await store.commit(POOL, "b1", "c", 0, "l")) is False  # not the holder's token
        # Full with c's load: d waits for it (one load at a time), and after c's holder died mid-load
        # (its lock expired) d takes c's place.
        assert (
            await store.reserve(POOL, B1, "d", "t1", victim=None, tenant_cap=None)
        ).outcome is Outcome.BUSY
        await asyncio.sleep(0.4)
        assert (await store.reserve(POOL, B1, "d", "t1", victim=None, tenant_cap=None)).outcome is Outcome.OK

    async def test_abort_releases_the_reservation(self, store: ResidencyStore) -> None:
        r = await store.reserve(POOL, B1, "a", "t1", victim=None, tenant_cap=None)
        await store.abort(POOL, "b1", "a", r.token + 1)  # not the holder: no effect
        assert (await state(store)).loading == {"a"}
        await store.abort(POOL, "b1", "a", r.token)
        s = await state(store)
        assert s.loading == set() and s.tenants == {}

    async def test_concurrent_reservations_one_winner(self, store: ResidencyStore) -> None:
        results = await asyncio.gather(
            *(store.reserve(POOL, B1, "a", "t1", victim=None, tenant_cap=None) for _ in range(50))
        )
        assert [r.outcome for r in results].count(Outcome.OK) == 1
        assert {r.outcome for r in results} == {Outcome.OK, Outcome.BUSY}

    async def test_concurrent_loads_of_many_adapters_never_overfill(self, store: ResidencyStore) -> None:
        # 20 callers race for a backend of capacity 3: loads go one at a time (BUSY: try again), and
        # exactly capacity of them get in.
        loading, most = 0, 0

        async def one(i: int) -> Outcome:
            nonlocal loading, most
            while True:
                r = await store.reserve(POOL, B1, f"a{i}", "t1", victim=None, tenant_cap=None)
                if r.outcome is not Outcome.BUSY:
                    break
                await asyncio.sleep(0.002)
            if r.outcome is Outcome.OK:
                loading += 1
                most = max(most, loading)
                await asyncio.sleep(0.01)
                loading -= 1
                assert await store.commit(POOL, "b1", f"a{i}", r.token, f"l{i}")
            return r.outcome

        outcomes = await asyncio.gather(*(one(i) for i in range(20)))
        assert outcomes.count(Outcome.OK) == B1.capacity
        assert len((await state(store)).registered) == B1.capacity
        assert most == 1


class TestOneLoadAtATime:
    """vLLM decodes nothing while it loads: a backend takes one load at a time, and a pool with a cap
    (GATEWAY_PLACEMENT_POOL_LOADS) at most that many across the backends named."""

    async def test_a_second_adapter_waits_for_the_load_under_way(self, store: ResidencyStore) -> None:
        first = await store.reserve(POOL, B1, "a", "t1", victim=None, tenant_cap=None)
        assert first.outcome is Outcome.OK
        busy = await store.reserve(POOL, B1, "b", "t1", victim=None, tenant_cap=None)
        assert busy.outcome is Outcome.BUSY
        assert (await state(store)).loading == {"a"}  # nothing of b was written
        # Another backend is not held up by it (no pool cap) ...
        assert (await store.reserve(POOL, B2, "b", "t1", victim=None, tenant_cap=None)).outcome is Outcome.OK
        # ... and once a is in, b may load on b1 too.
        assert await store.commit(POOL, "b1", "a", first.token, "l")
        assert (await store.reserve(POOL, B1, "c", "t1", victim=None, tenant_cap=None)).outcome is Outcome.OK

    async def test_the_pool_cap_counts_every_backend_named(self, store: ResidencyStore) -> None:
        both = ("b1", "b2")
        first = await store.reserve(
            POOL, B1, "a", "t1", victim=None, tenant_cap=None, pool_loads=1, pool_backends=both
        )
        assert first.outcome is Outcome.OK
        capped = await store.reserve(
            POOL, B2, "b", "t1", victim=None, tenant_cap=None, pool_loads=1, pool_backends=both
        )
        assert capped.outcome is Outcome.BUSY
        assert (await state(store, B2)).loading == set()
        roomier = await store.reserve(
            POOL, B2, "b", "t1", victim=None, tenant_cap=None, pool_loads=2, pool_backends=both
        )
        assert roomier.outcome is Outcome.OK
        await store.abort(POOL, "b2", "b", roomier.token)
        await store.abort(POOL, "b1", "a", first.token)
        again = await store.reserve(
            POOL, B2, "b", "t1", victim=None, tenant_cap=None, pool_loads=1, pool_backends=both
        )
        assert again.outcome is Outcome.OK

    async def test_an_expired_load_elsewhere_does_not_count(self, store: ResidencyStore) -> None:
        both = ("b1", "b2")
        r = await store.reserve(
            POOL, B1, "a", "t1", victim=None, tenant_cap=None, pool_loads=1, pool_backends=both
        )
        assert r.outcome is Outcome.OK
        await asyncio.sleep(0.4)  # the 0.3 s lock expires: its holder died mid-load
        late = await store.reserve(
            POOL, B2, "b", "t1", victim=None, tenant_cap=None, pool_loads=1, pool_backends=both
        )
        assert late.outcome is Outcome.OK


class TestRepair:
    async def test_reconcile_adds_and_removes_but_leaves_loads_alone(self, store: ResidencyStore) -> None:
        await store.release(POOL, "b1", "a", await load(store, B1, "a"))
        r = await store.reserve(POOL, B1, "loading", "t1", victim=None, tenant_cap=None)
        assert r.outcome is Outcome.OK
        added, removed = await store.reconcile(POOL, "b1", {"b"}, known_before={"a"})
        assert (added, removed) == ({"b"}, {"a"})
        s = await state(store)
        assert set(s.registered) == {"b"} and s.loading == {"loading"}

    async def test_reconcile_tolerates_a_stale_listing(self, store: ResidencyStore) -> None:
        # The listing was read before "fresh" was loaded and while "old" was still there (it has been
        # evicted since): neither may be undone by it.
        await store.release(POOL, "b1", "old", await load(store, B1, "old"))
        r = await store.reserve(POOL, B1, "fresh", "t1", victim="old", tenant_cap=None)
        assert r.outcome is Outcome.OK
        await store.evicted(POOL, "b1", "old")
        assert await store.commit(POOL, "b1", "fresh", r.token, "l")
        added, removed = await store.reconcile(POOL, "b1", {"old"}, known_before={"old"})
        assert (added, removed) == (set(), set())
        assert set((await state(store)).registered) == {"fresh"}

    async def test_trim_takes_the_lru_idle_unpinned_beyond_capacity(self, store: ResidencyStore) -> None:
        # State rebuilt from a backend that holds more than its capacity (3): 1 in flight, 4 listed.
        busy = await load(store, B1, "busy")
        await store.reconcile(POOL, "b1", {"busy", "a", "b", "c", "pin"}, known_before=set())
        assert await store.trim(POOL, B1, frozenset({"pin", "a"})) == ["b", "c"]
        s = await state(store)
        assert set(s.registered) == {"busy", "a", "pin"} and s.evicting == {"b", "c"}
        assert await store.trim(POOL, B1, frozenset()) == []  # at capacity now
        # A load under way counts against the capacity but is never taken; "busy", idle now, is the
        # least recently used ("a" is used after it).
        await store.release(POOL, "b1", "busy", busy)
        await asyncio.sleep(0.01)
        assert await store.acquire(POOL, "b1", "a", "la")
        await store.release(POOL, "b1", "a", "la")
        r = await store.reserve(POOL, B1, "new", "t1", victim="pin", tenant_cap=None)
        assert r.outcome is Outcome.OK  # a swap: busy, a and loading new
        await store.reconcile(POOL, "b1", {"a", "busy", "d"}, known_before={"a", "busy"})
        assert await store.trim(POOL, B1, frozenset()) == ["busy"]
        s = await state(store)
        assert set(s.registered) == {"a", "d"} and s.loading == {"new"}

    async def test_trim_within_capacity_or_all_busy_takes_nothing(self, store: ResidencyStore) -> None:
        assert await store.trim(POOL, B1, frozenset()) == []
        await store.reconcile(POOL, "b1", {"a", "b", "c", "d"}, known_before=set())
        leases = [await store.acquire(POOL, "b1", a, f"l{a}") for a in "abcd"]
        assert all(leases)
        assert await store.trim(POOL, B1, frozenset()) == []  # every one has a request in flight
        assert len((await state(store)).registered) == 4

    async def test_forget_and_drop(self, store: ResidencyStore) -> None:
        await load(store, B1, "a")
        await store.forget(POOL, "b1", "a")
        assert (await state(store)).registered == {}
        await load(store, B1, "b")
        await store.drop_backend(POOL, "b1")
        s = await state(store)
        assert s.registered == {} and s.inflight == {}


class TestWaiting:
    """Each gateway process publishes its waiting requests; every one reads the fleet's sums."""

    async def test_sums_over_replicas_replace_and_expire(self, store: ResidencyStore) -> None:
        assert await store.waiting(POOL, "r1", {"a": 3, "b": 1}, ttl_s=0.5) == {"a": 3, "b": 1}
        assert await store.waiting(POOL, "r2", {"a": 2, "c": 0}, ttl_s=60) == {"a": 5, "b": 1}
        # A new publish replaces the replica's last one; an empty one withdraws it.
        assert await store.waiting(POOL, "r1", {"b": 4}, ttl_s=0.5) == {"a": 2, "b": 4}
        assert await store.waiting(POOL, "r2", {}, ttl_s=60) == {"b": 4}
        assert await store.waiting("other-pool", "r2", {"z": 1}, ttl_s=60) == {"z": 1}
        # r1 stops publishing (it died): its counts are gone after its ttl.
        await asyncio.sleep(0.6)
        assert await store.waiting(POOL, "r3", {}, ttl_s=60) == {}


@pytest.fixture(params=["memory", "redis"])
async def short_leases(request: pytest.FixtureRequest) -> AsyncIterator[ResidencyStore]:
    async for s in _stores(request.param, lease_ttl_s=0.6):
        yield s


class TestLeaseRenewal:
    async def test_renewed_leases_live_on_the_others_expire(self, short_leases: ResidencyStore) -> None:
        store = short_leases
        kept = await load(store, B1, "a")
        assert await store.acquire(POOL, "b1", "a", "not-renewed")
        assert await store.acquire(POOL, "b1", "a", "released")
        await store.release(POOL, "b1", "a", "released")
        for _ in range(5):  # 1.25 s: twice the TTL
            await asyncio.sleep(0.25)
            # A released lease is not brought back by a renewal that crossed its release.
            assert await store.renew(POOL, [("b1", "a", kept), ("b1", "a", "released")]) == 1
        assert (await state(store)).inflight == {"a": 1}  # only the renewed one
        assert await store.renew(POOL, [("b1", "a", "not-renewed")]) == 0  # expired stays expired
        assert (await state(store)).inflight == {"a": 1}
        await store.release(POOL, "b1", "a", kept)
        assert (await state(store)).inflight == {}
