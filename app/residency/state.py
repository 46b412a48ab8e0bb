"""The residency contract both stores (in-process and Redis) implement, and the values they exchange."""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol


@dataclass(frozen=True, slots=True)
class BackendSlots:
    """What a backend offers: `slots` adapters active at once (--max-loras), `capacity` registered, `seats`
    requests in one batch (--max-num-seqs; None: unknown, no limit). `target`: the active adapters the
    placement policy aims for on it (at most `slots`; None: `slots`)."""

    id: str
    slots: int
    capacity: int
    seats: int | None = None
    target: int | None = None

    def has_room(self, *, mine: int, requests: int, taken: int) -> bool:
        """The hot path's rule (`touch`, and LruPolicy's steps 1 and 2): a holder of the adapter with
        `mine` of its requests in flight, `requests` in flight in all and `taken` GPU slots in use (active
        adapters plus loads under way) may take one more request of it: a seat is free, and the adapter
        is active there already or an idle one may still be activated (`taken` below the target)."""
        if self.seats is not None and requests >= self.seats:
            return False
        return mine > 0 or taken < (self.slots if self.target is None else min(self.target, self.slots))


@dataclass(slots=True)
class BackendState:
    """One backend's residency as read in one atomic snapshot."""

    id: str
    slots: int
    capacity: int
    seats: int | None = None  # requests in one batch (--max-num-seqs); None: unknown
    registered: dict[str, float] = field(default_factory=dict)  # adapter -> last use (unix seconds)
    inflight: dict[str, int] = field(default_factory=dict)  # adapter -> requests in flight (> 0 only)
    tenants: dict[str, str] = field(default_factory=dict)  # adapter -> tenant, for registered and loading
    loading: set[str] = field(default_factory=set)
    evicting: set[str] = field(default_factory=set)

    @property
    def occupied(self) -> int:
        return len(self.registered) + len(self.loading)

    @property
    def active(self) -> int:
        return len(self.inflight)

    @property
    def requests(self) -> int:
        return sum(self.inflight.values())

    @property
    def slots_taken(self) -> int:
        """GPU slots in use: adapters with requests in flight, plus loads under way (each will need one)."""
        return self.active + len(self.loading - self.inflight.keys())

    def tenant_count(self, tenant: str) -> int:
        return sum(
            1 for a, t in self.tenants.items() if t == tenant and (a in self.registered or a in self.loading)
        )


class Outcome(enum.StrEnum):
    OK = "ok"  # reserved: go and load it, then commit with the token
    LIVE = "live"  # it is registered there already (someone loaded it meanwhile)
    BUSY = "busy"  # a load or eviction of it is under way there: wait
    FULL = "full"  # no room without an eviction (or the chosen victim is no longer evictable)
    TENANT_CAP = "tenant_cap"  # the tenant holds its maximum share of that backend


@dataclass(frozen=True, slots=True)
class Reservation:
    outcome: Outcome
    token: int = 0


class ResidencyStore(Protocol):
    """All multi-step changes are atomic per call, across every gateway process sharing the store."""

    # Whether several gateway processes may share it (Redis), so each must learn what the others wait for.
    shared: bool
    # How long a load's or an eviction's reservation holds before another gateway may take it over.
    lock_ttl_s: float
    # How long a lease lives unless renewed: the process holding it renews its leases in batches
    # (Router's heartbeat), so a killed process's leases vanish after about this long.
    lease_ttl_s: float

    async def touch(
        self, pool: str, adapter: str, lease: str, backends: Sequence[BackendSlots]
    ) -> str | None:
        """Hot path: among the backends where the adapter is registered and `BackendSlots.has_room`
        holds, pick one where it is active already, then the one with the fewest requests in flight (the
        first in order on ties); mark it used now and take a lease. None if there is none."""

    async def acquire(self, pool: str, backend: str, adapter: str, lease: str) -> bool:
        """Take a lease on a registered adapter on one given backend (no slot check); False if not registered."""

    async def renew(self, pool: str, leases: Sequence[tuple[str, str, str]]) -> int:
        """Push the expiry of each (backend, adapter, lease) still held to now + the lease TTL; returns
        how many were still held (a lease that expired or was released stays gone)."""

    async def release(self, pool: str, backend: str, adapter: str, lease: str) -> None: ...

    def release_nowait(self, pool: str, backend: str, adapter: str, lease: str) -> None:
        """Release without waiting for the store: the end of a response, where nobody needs the answer.
        This process's later touches see it; a snapshot may briefly not. If it fails, the lease expires."""

    async def snapshot(self, pool: str, backends: Sequence[BackendSlots]) -> list[BackendState]: ...

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
        """Atomically: check the adapter is neither registered nor busy there, and that no other load is
        under way on that backend, nor `pool_loads` (if set) across `pool_backends` (BUSY: wait; vLLM
        decodes nothing while it loads); take the victim (if any) out of the registered set if it is
        still idle (it becomes `evicting`); check capacity and the tenant's cap; then mark the adapter
        `loading` under a fresh fencing token with a TTL."""

    async def commit(self, pool: str, backend: str, adapter: str, token: int, lease: str) -> bool:
        """Register a loaded adapter (and lease it for the request that loaded it) if the token still
        holds the reservation; False if it expired and was taken over (fenced out)."""

    async def abort(self, pool: str, backend: str, adapter: str, token: int) -> None: ...

    async def trim(self, pool: str, backend: BackendSlots, pinned: frozenset[str]) -> list[str]:
        """Atomically: while the backend holds more than its capacity (registered plus loading; it gets
        there when the state was lost and rebuilt from what the backend reports while gateways kept
        loading), take the least recently used idle adapter that is not pinned out of the registered
        set (it becomes `evicting`, as a victim of `reserve` does). Returns them, to be unloaded and
        then reported with `evicted`; empty when the backend is within its capacity."""

    async def evicted(self, pool: str, backend: str, adapter: str) -> None:
        """The victim's unload finished (or failed for good): it no longer blocks loads of itself."""

    async def forget(self, pool: str, backend: str, adapter: str) -> None:
        """The backend does not have it (a 404): drop it from the registered set."""

    async def reconcile(
        self, pool: str, backend: str, actual: set[str], known_before: set[str]
    ) -> tuple[set[str], set[str]]:
        """Make the registered set match what the backend reported; returns (added, removed).

        `actual` was read while other gateways kept working, so it may be stale: only adapters that
        were registered before it was read (`known_before`) may be removed, and adapters evicted or
        forgotten in the last moments are not added back. Loads and evictions under way are left alone."""

    async def drop_backend(self, pool: str, backend: str) -> None: ...

    async def waiting(
        self, pool: str, replica: str, counts: Mapping[str, int], ttl_s: float
    ) -> dict[str, int]:
        """Publish one gateway process's requests waiting to be placed, per adapter (replacing what it
        published before; dropped `ttl_s` after its last call, so a process that dies leaves nothing
        behind), and return the counts summed over every process that published within its ttl."""
