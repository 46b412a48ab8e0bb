"""The residency contract both stores (in-process and Redis) implement, and the values they exchange."""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol


@dataclass(frozen=True, slots=True)
class BackendSlots:
    """What a backend offers: `slots` adapters active at once (--max-loras), `capacity` registered."""

    id: str
    slots: int
    capacity: int


@dataclass(slots=True)
class BackendState:
    """One backend's residency as read in one atomic snapshot."""

    id: str
    slots: int
    capacity: int
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

    async def touch(
        self, pool: str, adapter: str, lease: str, backends: Sequence[BackendSlots]
    ) -> str | None:
        """Hot path: if the adapter is registered on one of `backends` that has it active or a free slot
        (one no load under way will take), pick the one with the fewest of its requests in flight, mark
        it used now, take a lease; else None."""

    async def acquire(self, pool: str, backend: str, adapter: str, lease: str) -> bool:
        """Take a lease on a registered adapter on one given backend (no slot check); False if not registered."""

    async def release(self, pool: str, backend: str, adapter: str, lease: str) -> None: ...

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
    ) -> Reservation:
        """Atomically: check the adapter is neither registered nor busy there; take the victim (if any)
        out of the registered set if it is still idle (it becomes `evicting`); check capacity and the
        tenant's cap; then mark the adapter `loading` under a fresh fencing token with a TTL."""

    async def commit(self, pool: str, backend: str, adapter: str, token: int, lease: str) -> bool:
        """Register a loaded adapter (and lease it for the request that loaded it) if the token still
        holds the reservation; False if it expired and was taken over (fenced out)."""

    async def abort(self, pool: str, backend: str, adapter: str, token: int) -> None: ...

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
