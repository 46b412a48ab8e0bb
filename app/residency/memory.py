"""In-process residency store for the embedded default (one gateway process). Every method runs without
awaiting in between, so each one is atomic on the event loop, as the Redis scripts are on the server."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from app.residency.state import BackendSlots, BackendState, Outcome, Reservation


@dataclass
class _Backend:
    registered: dict[str, float] = field(default_factory=dict)  # adapter -> last use
    tenants: dict[str, str] = field(default_factory=dict)
    leases: dict[str, dict[str, float]] = field(default_factory=dict)  # adapter -> lease -> expiry
    loading: dict[str, tuple[int, float]] = field(default_factory=dict)  # adapter -> (token, expiry)
    evicting: dict[str, float] = field(default_factory=dict)  # adapter -> expiry
    gone: dict[str, float] = field(default_factory=dict)  # recently evicted/forgotten -> until
    # No lease expires before this: leases are only swept once one may have (a request's lease lives
    # for minutes, so the hot path almost never pays for the sweep).
    leases_valid_until: float = float("inf")

    def prune(self, now: float) -> None:
        for adapter in [a for a, (_, exp) in self.loading.items() if exp <= now]:
            del self.loading[adapter]
            if adapter not in self.registered:
                self.tenants.pop(adapter, None)
        for adapter in [a for a, exp in self.evicting.items() if exp <= now]:
            del self.evicting[adapter]
        for adapter in [a for a, exp in self.gone.items() if exp <= now]:
            del self.gone[adapter]
        if now < self.leases_valid_until:
            return
        self.leases_valid_until = float("inf")
        for adapter in list(self.leases):
            live = {k: v for k, v in self.leases[adapter].items() if v > now}
            if live:
                self.leases[adapter] = live
                self.leases_valid_until = min(self.leases_valid_until, *live.values())
            else:
                del self.leases[adapter]

    def inflight(self, adapter: str) -> int:
        return len(self.leases.get(adapter, ()))


# How long an evicted or forgotten adapter is not re-added from a backend's (possibly stale) listing.
GONE_GRACE_S = 30.0


class MemoryResidency:
    shared = False  # one process: its own waiters are all there are

    def __init__(
        self, *, lock_ttl_s: float = 60.0, lease_ttl_s: float = 30.0, clock: Callable[[], float] = time.time
    ) -> None:
        self._pools: dict[str, dict[str, _Backend]] = {}
        # Published waiting counts: pool -> replica -> (counts, until).
        self._waiting: dict[str, dict[str, tuple[dict[str, int], float]]] = {}
        self._fence = 0
        self.lock_ttl_s = lock_ttl_s
        self.lease_ttl_s = lease_ttl_s
        self._clock = clock

    def _b(self, pool: str, backend: str) -> _Backend:
        state = self._pools.setdefault(pool, {}).setdefault(backend, _Backend())
        state.prune(self._clock())
        return state

    def _lease(self, b: _Backend, adapter: str, lease: str, now: float) -> None:
        b.registered[adapter] = now
        expiry = now + self.lease_ttl_s
        b.leases.setdefault(adapter, {})[lease] = expiry
        b.leases_valid_until = min(b.leases_valid_until, expiry)

    async def touch(
        self, pool: str, adapter: str, lease: str, backends: Sequence[BackendSlots]
    ) -> str | None:
        now = self._clock()
        best: tuple[tuple[bool, int], _Backend, str] | None = None
        for slots in backends:
            b = self._b(pool, slots.id)
            if adapter not in b.registered:
                continue
            mine = b.inflight(adapter)
            requests = sum(len(ls) for ls in b.leases.values())
            taken = len(b.leases) + len(b.loading)  # loads under way will each need a slot
            key = (mine == 0, requests)  # where it is active already, then the least busy
            if slots.has_room(mine=mine, requests=requests, taken=taken) and (best is None or key < best[0]):
                best = (key, b, slots.id)
        if best is None:
            return None
        self._lease(best[1], adapter, lease, now)
        return best[2]

    async def renew(self, pool: str, leases: Sequence[tuple[str, str, str]]) -> int:
        now, n = self._clock(), 0
        for backend, adapter, lease in leases:
            b = self._b(pool, backend)
            held = b.leases.get(adapter)
            if held is not None and lease in held:
                held[lease] = now + self.lease_ttl_s
                n += 1
        return n

    async def acquire(self, pool: str, backend: str, adapter: str, lease: str) -> bool:
        b = self._b(pool, backend)
        if adapter not in b.registered:
            return False
        self._lease(b, adapter, lease, self._clock())
        return True

    async def release(self, pool: str, backend: str, adapter: str, lease: str) -> None:
        self.release_nowait(pool, backend, adapter, lease)

    def release_nowait(self, pool: str, backend: str, adapter: str, lease: str) -> None:
        b = self._b(pool, backend)
        leases = b.leases.get(adapter)
        if leases is not None:
            leases.pop(lease, None)
            if not leases:
                del b.leases[adapter]

    async def snapshot(self, pool: str, backends: Sequence[BackendSlots]) -> list[BackendState]:
        out = []
        for slots in backends:
            b = self._b(pool, slots.id)
            out.append(
                BackendState(
                    id=slots.id,
                    slots=slots.slots,
                    capacity=slots.capacity,
                    seats=slots.seats,
                    registered=dict(b.registered),
                    inflight={a: len(ls) for a, ls in b.leases.items() if ls},
                    tenants=dict(b.tenants),
                    loading=set(b.loading),
                    evicting=set(b.evicting),
                )
            )
        return out

    async def reserve(
        self,
        pool: str,
        backend: BackendSlots,
        adapter: str,
        tenant: str,
        *,
        victim: str | None,
        tenant_cap: int | None,
        pool_loads: int | None = None,
        pool_backends: Sequence[str] = (),
    ) -> Reservation:
        now = self._clock()
        b = self._b(pool, backend.id)
        if adapter in b.registered:
            return Reservation(Outcome.LIVE)
        if b.loading or adapter in b.evicting:
            return Reservation(Outcome.BUSY)  # its own load, or another one there: one at a time
        if pool_loads is not None:
            others = {x for x in pool_backends if x != backend.id}
            if sum(len(self._b(pool, x).loading) for x in others) >= pool_loads:
                return Reservation(Outcome.BUSY)
        victim_tenant = None
        if victim is not None:
            if victim not in b.registered or b.inflight(victim) > 0:
                return Reservation(Outcome.FULL)
            victim_tenant = b.tenants.get(victim)
        # A swap (with a victim) never raises occupancy, so it is allowed even above capacity (a backend
        # can end up there when the state was lost and rebuilt from what the backend reports).
        if victim is None and len(b.registered) + len(b.loading) >= backend.capacity:
            return Reservation(Outcome.FULL)
        if tenant_cap is not None:
            held = sum(1 for a, t in b.tenants.items() if t == tenant)
            if held - (1 if victim_tenant == tenant else 0) >= tenant_cap:
                return Reservation(Outcome.TENANT_CAP)
        if victim is not None:
            del b.registered[victim]
            b.tenants.pop(victim, None)
            b.evicting[victim] = now + self.lock_ttl_s
        self._fence += 1
        b.loading[adapter] = (self._fence, now + self.lock_ttl_s)
        b.tenants[adapter] = tenant
        return Reservation(Outcome.OK, self._fence)

    async def commit(self, pool: str, backend: str, adapter: str, token: int, lease: str) -> bool:
        b = self._b(pool, backend)
        held = b.loading.get(adapter)
        if held is None or held[0] != token:
            return False
        del b.loading[adapter]
        self._lease(b, adapter, lease, self._clock())
        return True

    async def abort(self, pool: str, backend: str, adapter: str, token: int) -> None:
        b = self._b(pool, backend)
        held = b.loading.get(adapter)
        if held is not None and held[0] == token:
            del b.loading[adapter]
            b.tenants.pop(adapter, None)

    async def trim(self, pool: str, backend: BackendSlots, pinned: frozenset[str]) -> list[str]:
        now = self._clock()
        b = self._b(pool, backend.id)
        excess = len(b.registered) + len(b.loading) - backend.capacity
        if excess <= 0:
            return []
        idle = sorted(
            (last, a)
            for a, last in b.registered.items()
            if b.inflight(a) == 0 and a not in pinned and a not in b.loading
        )
        victims = [a for _, a in idle[:excess]]
        for a in victims:
            del b.registered[a]
            b.tenants.pop(a, None)
            b.evicting[a] = now + self.lock_ttl_s
        return victims

    async def evicted(self, pool: str, backend: str, adapter: str) -> None:
        b = self._b(pool, backend)
        b.evicting.pop(adapter, None)
        b.gone[adapter] = self._clock() + GONE_GRACE_S

    async def forget(self, pool: str, backend: str, adapter: str) -> None:
        b = self._b(pool, backend)
        b.registered.pop(adapter, None)
        b.gone[adapter] = self._clock() + GONE_GRACE_S
        if adapter not in b.loading:
            b.tenants.pop(adapter, None)

    async def reconcile(
        self, pool: str, backend: str, actual: set[str], known_before: set[str]
    ) -> tuple[set[str], set[str]]:
        now = self._clock()
        b = self._b(pool, backend)
        busy = set(b.loading) | set(b.evicting)
        removed = {a for a in b.registered if a not in actual and a in known_before and a not in busy}
        added = {a for a in actual if a not in b.registered and a not in busy and a not in b.gone}
        for a in removed:
            del b.registered[a]
            b.tenants.pop(a, None)
        for a in added:
            b.registered[a] = now
        return added, removed

    async def waiting(
        self, pool: str, replica: str, counts: Mapping[str, int], ttl_s: float
    ) -> dict[str, int]:
        now = self._clock()
        published = self._waiting.setdefault(pool, {})
        mine = {a: n for a, n in counts.items() if n > 0}
        if mine:
            published[replica] = (mine, now + ttl_s)
        else:
            published.pop(replica, None)
        sums: dict[str, int] = {}
        for r, (theirs, until) in list(published.items()):
            if until <= now:
                del published[r]
                continue
            for a, n in theirs.items():
                sums[a] = sums.get(a, 0) + n
        return sums

    async def drop_backend(self, pool: str, backend: str) -> None:
        self._pools.get(pool, {}).pop(backend, None)
