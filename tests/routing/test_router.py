"""The router's count of its waiting requests, which LruPolicy reads to drain adapters (in-process store)."""

from __future__ import annotations

import asyncio
import uuid

from app.backends.vllm import VllmClient
from app.registry.snapshots import AdapterView, BackendView, BaseModelView
from app.residency.memory import MemoryResidency
from app.residency.state import BackendSlots, Outcome
from app.routing.policy import LruPolicy
from app.routing.router import Router

MODEL = BaseModelView(uuid.uuid4(), "m", (), True)
POOL = str(MODEL.id)
# One GPU slot, so the target is one active adapter.
BACKEND = BackendView(uuid.uuid4(), "b", "http://127.0.0.1:9", MODEL.id, gpu_slots=1, capacity=2)


def adapter(name: str) -> AdapterView:
    return AdapterView(uuid.uuid4(), uuid.uuid4(), name, 1, MODEL, "0" * 64, name, 0.0)


async def register(store: MemoryResidency, a: AdapterView) -> None:
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
