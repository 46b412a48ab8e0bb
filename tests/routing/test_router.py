"""The router's waiting requests: counted for LruPolicy's draining, and placed by one dispatcher per pool
(in-process store)."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import uuid
from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis
from redis.exceptions import RedisError

from app.backends.vllm import VllmClient
from app.errors import RateLimited, ServiceUnavailable
from app.main import redis_client
from app.registry.snapshots import AdapterView, BackendView, BaseModelView
from app.residency.memory import MemoryResidency
from app.residency.redis_store import RedisResidency
from app.residency.state import BackendSlots, Outcome
from app.routing.policy import LruPolicy, PackPolicy
from app.routing.router import Router
from tests.fixtures.faulty_upstream import Script, serve
from tests.fixtures.services import PrivateRedis

REDIS_URL = os.environ.get("GATEWAY_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
MODEL = BaseModelView(uuid.uuid4(), "m", (), True)
POOL = str(MODEL.id)
# One GPU slot, so the target is one active adapter.
BACKEND = BackendView(uuid.uuid4(), "b", "http://127.0.0.1:9", MODEL.id, gpu_slots=1, capacity=2)


def adapter(name: str) -> AdapterView:
    return AdapterView(uuid.uuid4(), uuid.uuid4(), name, 1, MODEL, "0" * 64, name, 0.0)


async def register(store: MemoryResidency | RedisResidency, a: AdapterView) -> None:
    slots = BackendSlots(str(BACKEND.id), 1, 2)
    r = await store.reserve(POOL, slots, a.served_name, str(a.tenant_id), victim=None, tenant_cap=None)
    assert r.outcome is Outcome.OK
    assert await store.commit(POOL, str(BACKEND.id), a.served_name, r.token, "setup")
    await store.release(POOL, str(BACKEND.id), a.served_name, "setup")


async def test_waiters_are_counted_drain_the_active_adapter_and_are_forgotten() -> None:
    store = MemoryResidency()
    client = VllmClient.create()  # never called: both adapters are registered already
    router = Router(
        store=store, policy=LruPolicy(drain_min=2), client=client, adapter_root="/adapters", patience_s=30
    )
    hot, cold = adapter("hot"), adapter("cold")
    for a in (hot, cold):
        await register(store, a)
    fleet = (BACKEND,)
    try:
        first = await router.route(fleet, hot)  # the hot path: it takes the one slot
        assert not router._waiting.get(POOL)
        colds = [asyncio.create_task(router.route(fleet, cold)) for _ in range(4)]
        await asyncio.sleep(0.05)
        assert dict(router._waiting[POOL]) == {cold.served_name: 4}
        # 4 waiting >= max(2, 2 x (1 in flight + 1 waiting)): hot takes no new request; its slot frees.
        late_hot = asyncio.create_task(router.route(fleet, hot))
        await asyncio.sleep(0.05)
        assert not late_hot.done()
        assert dict(router._waiting[POOL]) == {cold.served_name: 4, hot.served_name: 1}
        await router.release(first)
        leases = await asyncio.wait_for(asyncio.gather(*colds), 2)
        assert {lease.adapter for lease in leases} == {cold.served_name}
        await asyncio.sleep(0.3)
        assert not late_hot.done()  # cold holds the only slot now
        assert dict(router._waiting[POOL]) == {hot.served_name: 1}
        late_hot.cancel()
        await asyncio.gather(late_hot, return_exceptions=True)
        assert not router._waiting.get(POOL)  # a request that leaves is no longer counted
    finally:
        await client.session.close()


class CountingStore(MemoryResidency):
    """The real in-process store, counting snapshots (how often waiters look) and, when told to, failing
    them: a fault injected on purpose, as a Redis outage would raise."""

    def __init__(self) -> None:
        super().__init__()
        self.snapshots = 0
        self.fail: Exception | None = None

    async def snapshot(self, pool, backends):  # type: ignore[no-untyped-def]
        self.snapshots += 1
        if self.fail is not None:
            raise self.fail
        return await super().snapshot(pool, backends)


SEATED = BackendView(
    uuid.uuid4(), "s", "http://127.0.0.1:9", MODEL.id, gpu_slots=2, capacity=2, max_num_seqs=2
)


async def seated_router(store: MemoryResidency, tick_s: float) -> tuple[Router, VllmClient, AdapterView]:
    client = VllmClient.create()  # never called: the adapter is registered already
    router = Router(store=store, policy=LruPolicy(), client=client, adapter_root="/a", tick_s=tick_s)
    a = adapter("a")
    slots = BackendSlots(str(SEATED.id), 2, 2)
    r = await store.reserve(POOL, slots, a.served_name, str(a.tenant_id), victim=None, tenant_cap=None)
    assert await store.commit(POOL, str(SEATED.id), a.served_name, r.token, "setup")
    await store.release(POOL, str(SEATED.id), a.served_name, "setup")
    return router, client, a


async def test_a_release_hands_its_seat_to_one_waiter_at_once_without_polling() -> None:
    store = CountingStore()
    # A tick of 60 s: only this process's own release can wake the dispatcher within the test.
    router, client, a = await seated_router(store, tick_s=60)
    fleet = (SEATED,)
    try:
        held = [await router.route(fleet, a) for _ in range(2)]  # both seats (max_num_seqs 2)
        waiters = [asyncio.create_task(router.route(fleet, a)) for _ in range(20)]
        await asyncio.sleep(0.3)
        assert not any(w.done() for w in waiters)
        assert dict(router._waiting[POOL]) == {a.served_name: 20}
        # 20 waiters, 0.3 s: each polling (as before) would have looked ~60 times; the dispatcher looked
        # once per pass (the first one) after their own first look.
        assert store.snapshots <= 20 + 2, store.snapshots
        router.release_nowait(held[0])
        done, _ = await asyncio.wait(waiters, timeout=0.5, return_when=asyncio.FIRST_COMPLETED)
        assert len(done) == 1  # well before the tick; and one seat freed, so one waiter went
        await asyncio.sleep(0.1)
        assert sum(w.done() for w in waiters) == 1  # the pass counted the seat it handed out
        assert router._waiting[POOL][a.served_name] == 19
        for w in waiters:
            w.cancel()
        await asyncio.gather(*waiters, return_exceptions=True)
        assert not router._waiting.get(POOL)
    finally:
        await client.session.close()


async def test_waiters_time_out_with_a_503_and_get_the_stores_failure() -> None:
    store = CountingStore()
    router, client, a = await seated_router(store, tick_s=0.02)
    router.wait_timeout_s = 0.2
    fleet = (SEATED,)
    try:
        held = [await router.route(fleet, a) for _ in range(2)]
        with pytest.raises(ServiceUnavailable, match="within"):
            await router.route(fleet, a)
        assert not router._waiting.get(POOL)
        router.wait_timeout_s = 30
        waiter = asyncio.create_task(router.route(fleet, a))
        await asyncio.sleep(0.05)
        store.fail = ConnectionError("residency store down")
        with pytest.raises(ConnectionError):
            await asyncio.wait_for(waiter, 1)
        assert not router._waiting.get(POOL)
        store.fail = None
        for lease in held:
            await router.release(lease)
    finally:
        await client.session.close()


async def test_draining_is_fleet_wide_with_a_shared_store() -> None:
    """Two gateway processes on one Redis: the one with no waiters of its own stops feeding an adapter
    that the other's waiters outrank (before, it kept routing it through `touch`)."""
    redis = Redis.from_url(REDIS_URL)
    prefix = f"lgw-test-{uuid.uuid4().hex[:8]}"
    store = RedisResidency(redis, prefix=prefix, lock_ttl_s=5, lease_ttl_s=60)
    client = VllmClient.create()  # never called: both adapters are registered already

    def router() -> Router:
        r = Router(store=store, policy=LruPolicy(drain_min=2), client=client, adapter_root="/a", tick_s=0.02)
        r.idle_tick_s = 0.02
        return r

    a, b = router(), router()
    hot, cold = adapter("hot"), adapter("cold")
    for x in (hot, cold):
        await register(store, x)
    fleet = (BACKEND,)
    try:
        first = await a.route(fleet, hot)  # the one slot
        colds = [asyncio.create_task(b.route(fleet, cold)) for _ in range(4)]
        for _ in range(100):  # a learns of b's waiters within a few ticks
            await asyncio.sleep(0.02)
            if a._others.get(POOL) == {cold.served_name: 4}:
                break
        assert a._others.get(POOL) == {cold.served_name: 4}
        # 4 waiting (on b) >= max(2, 2 x 1 in flight): a takes no new request for hot.
        late_hot = asyncio.create_task(a.route(fleet, hot))
        await asyncio.sleep(0.2)
        assert not late_hot.done()
        await a.release(first)  # the slot frees: b's waiters take it
        leases = await asyncio.wait_for(asyncio.gather(*colds), 2)
        assert {lease.adapter for lease in leases} == {cold.served_name}
        assert not late_hot.done()
        late_hot.cancel()
        await asyncio.gather(late_hot, return_exceptions=True)
        for _ in range(100):
            await asyncio.sleep(0.02)
            if not a._others.get(POOL) and not b._others.get(POOL):
                break
        assert not a._others.get(POOL) and not b._others.get(POOL)  # nothing waits anywhere any more
        for lease in leases:
            await b.release(lease)
    finally:
        await a.close()
        await b.close()
        await client.session.close()
        keys = [k async for k in redis.scan_iter(match=f"{prefix}:*")]
        if keys:
            await redis.delete(*keys)
        await redis.aclose()


async def test_a_waiter_that_must_wait_does_not_hold_back_one_with_other_backends() -> None:
    """A request retried away from backend A (avoid) waits for B; a later request for the same adapter
    that may use A must not queue behind it (one WAIT holds only for the same backends)."""
    store = MemoryResidency()
    client = VllmClient.create()  # never called: every adapter is registered already
    router = Router(store=store, policy=LruPolicy(), client=client, adapter_root="/a", tick_s=60)
    a_view = BackendView(uuid.uuid4(), "a", "http://127.0.0.1:9", MODEL.id, gpu_slots=1, capacity=2)
    b_view = BackendView(uuid.uuid4(), "b", "http://127.0.0.1:9", MODEL.id, gpu_slots=1, capacity=2)
    x, y, z = adapter("x"), adapter("y"), adapter("z")
    for backend, ads in ((a_view, (x, y)), (b_view, (z,))):
        slots = BackendSlots(str(backend.id), 1, 2)
        for ad in ads:
            r = await store.reserve(POOL, slots, ad.served_name, "t", victim=None, tenant_cap=None)
            assert await store.commit(POOL, str(backend.id), ad.served_name, r.token, "setup")
            await store.release(POOL, str(backend.id), ad.served_name, "setup")
    fleet = (a_view, b_view)
    try:
        on_a = await router.route(fleet, y)  # A's one slot
        on_b = await router.route(fleet, z)  # B's one slot
        avoiding_a = asyncio.create_task(router.route(fleet, x, avoid=frozenset({str(a_view.id)})))
        await asyncio.sleep(0.05)
        anywhere = asyncio.create_task(router.route(fleet, x))
        await asyncio.sleep(0.05)
        assert not avoiding_a.done() and not anywhere.done()
        router.release_nowait(on_a)  # A's slot frees: x may take it, but only for the second request
        lease = await asyncio.wait_for(anywhere, 0.5)
        assert lease.backend == a_view
        assert not avoiding_a.done()
        avoiding_a.cancel()
        await asyncio.gather(avoiding_a, return_exceptions=True)
        await router.release(lease)
        await router.release(on_b)
    finally:
        await client.session.close()


async def _slow_loads(delay_s: float) -> tuple[Script, AsyncIterator[str], str]:
    script = Script(load_delay_s=delay_s)
    upstream = serve(script, "m")
    return script, upstream, await anext(upstream)


async def test_one_load_at_a_time_per_backend_oldest_waiter_first() -> None:
    # Loads as slow as on an H200 (0.2 s; injected: vLLM CPU loads a tiny adapter in milliseconds).
    script, upstream, url = await _slow_loads(0.2)
    backend = BackendView(uuid.uuid4(), "b", url, MODEL.id, gpu_slots=4, capacity=8, max_num_seqs=64)
    client = VllmClient.create()
    router = Router(store=MemoryResidency(), policy=PackPolicy(), client=client, adapter_root="/a")
    colds = [adapter(f"c{i}") for i in range(4)]
    try:
        first = [asyncio.create_task(router.route((backend,), a)) for a in colds[:3]]
        await asyncio.sleep(0.05)  # c0 is loading; c1 and c2 wait for their turn in the gateway
        late = asyncio.create_task(router.route((backend,), colds[3]))
        leases = await asyncio.wait_for(asyncio.gather(*first, late), 5)
        assert {lease.adapter for lease in leases} == {a.served_name for a in colds}
        assert script.most_loading == 1  # never two loads at once on one backend
        # The request that came while others waited for a load slot did not jump the queue.
        assert script.loads == [a.served_name for a in colds]
    finally:
        await client.session.close()
        await upstream.aclose()


async def test_the_pool_cap_serialises_loads_across_backends() -> None:
    script, upstream, url = await _slow_loads(0.2)
    fleet = tuple(
        BackendView(uuid.uuid4(), f"b{i}", url, MODEL.id, gpu_slots=4, capacity=8, max_num_seqs=64)
        for i in range(2)
    )
    client = VllmClient.create()
    for cap, most in ((None, 2), (1, 1)):
        script.most_loading, script.loads = 0, []
        policy = PackPolicy()
        policy.pool_loads = cap
        router = Router(store=MemoryResidency(), policy=policy, client=client, adapter_root="/a")
        colds = [adapter(f"p{i}") for i in range(4)]
        leases = await asyncio.wait_for(asyncio.gather(*(router.route(fleet, a) for a in colds)), 5)
        assert len({lease.adapter for lease in leases}) == 4
        assert script.most_loading == most, (cap, script.most_loading)
    await client.session.close()
    await upstream.aclose()


class ReserveCountingStore(MemoryResidency):
    """The real in-process store, counting load reservations (each is one load call to a backend)."""

    def __init__(self) -> None:
        super().__init__()
        self.reserves = 0

    async def reserve(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        self.reserves += 1
        return await super().reserve(*args, **kwargs)


def _closed_port() -> int:
    """A port nothing listens on (bound, then released): connections to it are refused, for real."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _refusing_fleet(name: str, gpu_slots: int, capacity: int) -> tuple[BackendView, ...]:
    """Two backends on ports nothing listens on."""
    return tuple(
        BackendView(
            uuid.uuid4(),
            f"{name}{i}",
            f"http://127.0.0.1:{_closed_port()}",
            MODEL.id,
            gpu_slots,
            capacity=capacity,
        )
        for i in range(2)
    )


async def _held_elsewhere(store: MemoryResidency, slots: BackendSlots, a: AdapterView, lease: str) -> None:
    """The adapter registered on `slots` with another gateway's request in flight."""
    r = await store.reserve(POOL, slots, a.served_name, str(a.tenant_id), victim=None, tenant_cap=None)
    assert await store.commit(POOL, slots.id, a.served_name, r.token, lease)


async def test_every_backend_refusing_gives_a_503_at_once_not_a_spin() -> None:
    fleet = _refusing_fleet("down", 4, 8)
    store = ReserveCountingStore()
    client = VllmClient.create()
    router = Router(store=store, policy=PackPolicy(), client=client, adapter_root="/a", wait_timeout_s=5)
    try:
        t = asyncio.get_running_loop().time()
        with pytest.raises(ServiceUnavailable) as err:
            await asyncio.wait_for(router.route(fleet, adapter("cold")), 10)
        assert asyncio.get_running_loop().time() - t < 2  # well within the wait limit
        assert err.value.headers is not None and "Retry-After" in err.value.headers
        assert "down" not in str(err.value) and "127.0.0.1" not in str(err.value)  # no backend named
        # One load attempt per backend, not one per event-loop turn.
        assert store.reserves <= len(fleet), store.reserves
        assert router.unhealthy == {str(b.id) for b in fleet}
    finally:
        await client.session.close()


async def test_a_backend_that_refused_a_load_is_not_handed_out_again_while_waiting() -> None:
    """Both backends refuse connections and are known to be down; one (b1) is full with another
    gateway's request in flight. The load on b0 is refused, so the request waits for b1; its turns
    must never send it back to b0, which spun reserve -> refused -> wait -> b0 again until the deadline (thousands of Redis calls a second in
    the rolling-restart drill)."""
    fleet = _refusing_fleet("down", 1, 1)
    store = ReserveCountingStore()
    busy = adapter("busy")
    await _held_elsewhere(store, BackendSlots(str(fleet[1].id), 1, 1), busy, "another-gateways-request")
    store.reserves = 0
    client = VllmClient.create()
    router = Router(
        store=store, policy=PackPolicy(), client=client, adapter_root="/a", wait_timeout_s=1, patience_s=60
    )
    try:
        for b in fleet:
            await router.mark_down(b)
        with pytest.raises(ServiceUnavailable):
            await asyncio.wait_for(router.route(fleet, adapter("cold")), 5)
        assert store.reserves == 1, store.reserves  # b0 once; b1 never had room
    finally:
        await client.session.close()


async def test_marking_a_backend_down_keeps_the_fleets_state_of_it() -> None:
    """One process's failed connection proves nothing about what the backend holds, nor about other
    gateways' requests there: mark_down is a local flag, the store's state of the backend stays."""
    fleet = _refusing_fleet("b", 4, 8)
    store = MemoryResidency()
    a = adapter("kept")
    slots = BackendSlots(str(fleet[0].id), 4, 8)
    await _held_elsewhere(store, slots, a, "another-gateways-lease")
    client = VllmClient.create()
    router = Router(store=store, policy=PackPolicy(), client=client, adapter_root="/a")
    try:
        await router.mark_down(fleet[0])
        assert router.unhealthy == {str(fleet[0].id)}
        (state,) = await store.snapshot(POOL, [slots])
        assert a.served_name in state.registered
        assert state.inflight == {a.served_name: 1}  # the other gateway's lease is still there
    finally:
        await client.session.close()


async def test_a_slow_load_is_bounded_by_the_requests_deadline_and_still_lands() -> None:
    # A load slower than the request may wait (1 s against 0.3 s; injected: vLLM CPU loads in ms).
    script, upstream, url = await _slow_loads(1.0)
    backend = BackendView(uuid.uuid4(), "b", url, MODEL.id, gpu_slots=4, capacity=8, max_num_seqs=64)
    store = MemoryResidency()
    client = VllmClient.create()
    router = Router(store=store, policy=PackPolicy(), client=client, adapter_root="/a", wait_timeout_s=0.3)
    slow = adapter("slow")
    slots = BackendSlots(str(backend.id), 4, 8, 64)
    try:
        t = asyncio.get_running_loop().time()
        with pytest.raises(ServiceUnavailable) as err:
            await router.route((backend,), slow)
        assert asyncio.get_running_loop().time() - t < 0.6  # the deadline, not the load's 1 s
        assert err.value.headers is not None and "Retry-After" in err.value.headers
        # The load was not cut short: it ends, registers the adapter, and gives back the lease it
        # took for the request that left.
        await asyncio.sleep(1.2)
        (state,) = await store.snapshot(POOL, [slots])
        assert slow.served_name in state.registered and not state.loading
        assert state.inflight == {}
        assert script.loads == [slow.served_name]
        lease = await asyncio.wait_for(router.route((backend,), slow), 1)  # live now: no second load
        assert lease.backend.id == backend.id and script.loads == [slow.served_name]
    finally:
        await client.session.close()
        await upstream.aclose()


async def test_a_load_ends_within_its_lock_so_no_second_gateway_loads_it_too() -> None:
    _, upstream, url = await _slow_loads(3.0)  # a load that hangs (injected)
    backend = BackendView(uuid.uuid4(), "b", url, MODEL.id, gpu_slots=4, capacity=8, max_num_seqs=64)
    store = MemoryResidency(lock_ttl_s=1.0)
    client = VllmClient.create()
    with pytest.raises(ValueError, match="shorter than the load lock"):
        Router(store=store, policy=PackPolicy(), client=client, adapter_root="/a", load_timeout_s=1.0)
    router = Router(store=store, policy=PackPolicy(), client=client, adapter_root="/a", wait_timeout_s=10)
    assert router.load_timeout_s == 0.75  # derived from the lock's TTL
    stuck = adapter("stuck")
    slots = BackendSlots(str(backend.id), 4, 8, 64)
    try:
        t = asyncio.get_running_loop().time()
        with pytest.raises(ServiceUnavailable):
            await router.route((backend,), stuck)
        assert asyncio.get_running_loop().time() - t < 1.0  # ended by the load timeout, inside the lock
        (state,) = await store.snapshot(POOL, [slots])
        assert not state.loading and stuck.served_name not in state.registered  # aborted, not left locked
    finally:
        await client.session.close()
        await upstream.aclose()


async def test_an_adapter_whose_files_are_missing_is_never_sent_to_a_backend(tmp_path) -> None:  # type: ignore[no-untyped-def]
    script, upstream, url = await _slow_loads(0.0)
    backend = BackendView(uuid.uuid4(), "b", url, MODEL.id, gpu_slots=4, capacity=8, max_num_seqs=64)
    client = VllmClient.create()
    router = Router(
        store=MemoryResidency(),
        policy=PackPolicy(),
        client=client,
        adapter_root=str(tmp_path),
        local_store=tmp_path,
    )
    gone, there = adapter("gone"), adapter("there")
    (tmp_path / there.storage_path).mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (tmp_path / there.storage_path / name).write_bytes(b"{}")
    try:
        with pytest.raises(ServiceUnavailable) as err:
            await router.route((backend,), gone)
        assert "files are missing" in err.value.message
        assert str(tmp_path) not in err.value.message  # no path in the answer
        assert script.loads == []
        lease = await router.route((backend,), there)
        assert lease.adapter == there.served_name and script.loads == [there.served_name]
    finally:
        await client.session.close()
        await upstream.aclose()


async def test_a_long_request_keeps_its_lease_a_killed_gateways_expires() -> None:
    """Two gateway processes on one Redis, leases of 0.6 s: each renews its own every 0.2 s. The one
    that stops (its heartbeat cancelled, as when the process is killed) loses its lease within the TTL;
    the other's request, running for four TTLs, keeps its own."""
    redis = Redis.from_url(REDIS_URL)
    prefix = f"lgw-test-{uuid.uuid4().hex[:8]}"
    stores = [RedisResidency(redis, prefix=prefix, lease_ttl_s=0.6, lock_ttl_s=5) for _ in range(2)]
    client = VllmClient.create()  # never called: the adapter is registered already
    alive, killed = (
        Router(store=s, policy=PackPolicy(), client=client, adapter_root="/a", load_timeout_s=1)
        for s in stores
    )
    a = adapter("long")
    await register(stores[0], a)
    slots = BackendSlots(str(BACKEND.id), 1, 2)
    try:
        assert alive.heartbeat_s == pytest.approx(0.2)
        mine = await alive.route((BACKEND,), a)
        await killed.route((BACKEND,), a)
        (state,) = await stores[0].snapshot(POOL, [slots])
        assert state.inflight == {a.served_name: 2}
        await killed.close()  # no release: its leases are simply no longer renewed
        await asyncio.sleep(2.4)
        (state,) = await stores[0].snapshot(POOL, [slots])
        assert state.inflight == {a.served_name: 1}
        await alive.release(mine)
        (state,) = await stores[0].snapshot(POOL, [slots])
        assert state.inflight == {}
    finally:
        await alive.close()
        await client.session.close()
        keys = [k async for k in redis.scan_iter(match=f"{prefix}:*")]
        if keys:
            await redis.delete(*keys)
        await redis.aclose()


async def test_the_waiting_queue_is_bounded_with_a_tenant_share() -> None:
    """Four may wait per pool, two per tenant: a tenant's third waiter gets a 429 at once, the pool's
    fifth a 503 at once, and those admitted still get their adapter. The waits come from a load slower
    than on a GPU (1 s; injected: vLLM CPU loads a tiny adapter in milliseconds)."""
    _, upstream, url = await _slow_loads(1.0)
    backend = BackendView(uuid.uuid4(), "b", url, MODEL.id, gpu_slots=4, capacity=8, max_num_seqs=64)
    client = VllmClient.create()
    router = Router(
        store=MemoryResidency(), policy=PackPolicy(), client=client, adapter_root="/a", max_waiters=4
    )
    a = adapter("a")
    b = dataclasses.replace(a, id=uuid.uuid4(), tenant_id=uuid.uuid4(), name="b")
    try:
        loading = asyncio.create_task(router.route((backend,), a))  # a's load: its next requests wait
        await asyncio.sleep(0.1)
        waiting = [asyncio.create_task(router.route((backend,), a)) for _ in range(2)]
        await asyncio.sleep(0.1)
        t = asyncio.get_running_loop().time()
        with pytest.raises(RateLimited):
            await router.route((backend,), a)  # tenant a holds its two places
        # b's load must wait for the backend's load turn (one at a time): b queues too.
        waiting += [asyncio.create_task(router.route((backend,), b)) for _ in range(2)]
        await asyncio.sleep(0.1)
        with pytest.raises(ServiceUnavailable) as full:
            await router.route((backend,), dataclasses.replace(b, tenant_id=uuid.uuid4()))
        assert "too many requests are waiting" in full.value.message
        assert asyncio.get_running_loop().time() - t < 0.5  # both refused at once, not after a wait
        leases = await asyncio.wait_for(asyncio.gather(loading, *waiting), 10)
        assert sorted(lease.adapter or "" for lease in leases) == sorted(
            [a.served_name] * 3 + [b.served_name] * 2
        )
    finally:
        await client.session.close()
        await upstream.aclose()


async def test_redis_down_warm_mode_keeps_placed_adapters_on_their_backend() -> None:
    """GATEWAY_REDIS_OUTAGE=warm: with Redis stopped (a server of the test's own), an adapter this
    process placed keeps going to that backend (its lease has nothing to give back there); one it never
    placed fails as in the closed mode, which fails for both. Redis back: the store places again."""
    private = PrivateRedis()
    private.start()
    redis = redis_client(private.url, 1.0)
    store = RedisResidency(redis, prefix="lgw-warm")
    client = VllmClient.create()
    warm = Router(store=store, policy=PackPolicy(), client=client, adapter_root="/a", redis_outage="warm")
    closed = Router(store=store, policy=PackPolicy(), client=client, adapter_root="/a")
    hot, cold = adapter("hot"), adapter("cold")
    await register(store, hot)
    try:
        for router in (warm, closed):
            await router.release(await router.route((BACKEND,), hot))
        private.stop()
        lease = await warm.route((BACKEND,), hot)
        assert lease.local and lease.backend is BACKEND
        await warm.release(lease)  # nothing to give back: no Redis call
        with pytest.raises(RedisError):
            await warm.route((BACKEND,), cold)  # never placed by this process: the 503 upstream
        with pytest.raises(RedisError):
            await closed.route((BACKEND,), hot)
        private.start()  # back, and empty (no persistence)
        await register(store, hot)
        lease = await warm.route((BACKEND,), hot)
        assert not lease.local
        await warm.release(lease)
    finally:
        await warm.close()
        await closed.close()
        await client.session.close()
        await redis.aclose()
        private.stop()


async def test_the_touch_goes_out_beside_the_admission_and_a_refusal_gives_its_lease_back() -> None:
    store = MemoryResidency()
    client = VllmClient.create()  # never called: the adapter is registered already
    router = Router(store=store, policy=LruPolicy(), client=client, adapter_root="/a")
    a = adapter("warm")
    await register(store, a)
    slots = BackendSlots(str(BACKEND.id), 1, 2)
    loop = asyncio.get_running_loop()
    try:
        for refused in (True, False):
            admission: asyncio.Future[None] = loop.create_future()
            placing = asyncio.create_task(router.route((BACKEND,), a, admission=admission))
            await asyncio.sleep(0.05)
            # The touch did not wait for the admission: the lease is taken while it is still under way.
            assert not placing.done()
            (state,) = await store.snapshot(POOL, [slots])
            assert state.inflight == {a.served_name: 1}
            if refused:
                admission.set_exception(RateLimited("rate limit reached for requests per minute"))
                with pytest.raises(RateLimited):
                    await placing
                (state,) = await store.snapshot(POOL, [slots])
                assert state.inflight == {}  # given back at once, not left to expire
            else:
                admission.set_result(None)
                lease = await placing
                assert lease.backend is BACKEND and lease.adapter == a.served_name
                await router.release(lease)
    finally:
        await client.session.close()


async def test_nothing_is_loaded_for_a_request_before_it_is_admitted() -> None:
    script, upstream, url = await _slow_loads(0.0)
    backend = BackendView(uuid.uuid4(), "b", url, MODEL.id, gpu_slots=4, capacity=8, max_num_seqs=64)
    client = VllmClient.create()
    router = Router(store=MemoryResidency(), policy=LruPolicy(), client=client, adapter_root="/a")
    cold, other = adapter("cold"), adapter("other")
    loop = asyncio.get_running_loop()
    try:
        refused: asyncio.Future[None] = loop.create_future()
        placing = asyncio.create_task(router.route((backend,), other, admission=refused))
        admission: asyncio.Future[None] = loop.create_future()
        waiting = asyncio.create_task(router.route((backend,), cold, admission=admission))
        await asyncio.sleep(0.2)
        assert script.loads == [] and not waiting.done() and not placing.done()
        refused.set_exception(RateLimited("too many concurrent requests"))
        with pytest.raises(RateLimited):
            await placing
        admission.set_result(None)
        lease = await asyncio.wait_for(waiting, 5)
        assert script.loads == [cold.served_name]  # the refused request's adapter was never loaded
        await router.release(lease)
    finally:
        await client.session.close()
        await upstream.aclose()
