"""A residency store that times each call into the metrics (gateway_store_duration_seconds and
gateway_store_failures_total{store, op}): the Redis round trips the request path and the placement
loop make, seen by operators without a Redis exporter. One monotonic clock read and one histogram
observation per call."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

from app.metrics import Metrics
from app.residency.state import BackendSlots, BackendState, Reservation, ResidencyStore


class InstrumentedStore:
    def __init__(self, inner: ResidencyStore, metrics: Metrics, name: str) -> None:
        self.inner = inner
        self.shared = inner.shared
        self.lock_ttl_s = inner.lock_ttl_s
        self.lease_ttl_s = inner.lease_ttl_s
        self._metrics = metrics
        self._name = name

    async def _timed(self, op: str, call: Any) -> Any:
        started = time.monotonic()
        failed = True
        try:
            result = await call
            failed = False
            return result
        finally:
            self._metrics.store_call(self._name, op, time.monotonic() - started, failed)

    async def touch(self, pool: str, adapter: str, lease: str, backends: Sequence[BackendSlots]) -> str | None:
        result: str | None = await self._timed("touch", self.inner.touch(pool, adapter, lease, backends))
        return result

    async def acquire(self, pool: str, backend: str, adapter: str, lease: str) -> bool:
        return bool(await self._timed("acquire", self.inner.acquire(pool, backend, adapter, lease)))

    async def renew(self, pool: str, leases: Sequence[tuple[str, str, str]]) -> int:
        return int(await self._timed("renew", self.inner.renew(pool, leases)))

    async def release(self, pool: str, backend: str, adapter: str, lease: str) -> None:
        await self._timed("release", self.inner.release(pool, backend, adapter, lease))

    def release_nowait(self, pool: str, backend: str, adapter: str, lease: str) -> None:
        self.inner.release_nowait(pool, backend, adapter, lease)  # fire and forget: nothing to time

    async def snapshot(self, pool: str, backends: Sequence[BackendSlots]) -> list[BackendState]:
        result: list[BackendState] = await self._timed("snapshot", self.inner.snapshot(pool, backends))
        return result

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
        call = self.inner.reserve(
            pool,
            backend,
            adapter,
            tenant,
            victim=victim,
            tenant_cap=tenant_cap,
            pool_loads=pool_loads,
            pool_backends=pool_backends,
        )
        result: Reservation = await self._timed("reserve", call)
        return result

    async def commit(self, pool: str, backend: str, adapter: str, token: int, lease: str) -> bool:
        return bool(await self._timed("commit", self.inner.commit(pool, backend, adapter, token, lease)))

    async def abort(self, pool: str, backend: str, adapter: str, token: int) -> None:
        await self._timed("abort", self.inner.abort(pool, backend, adapter, token))

    async def trim(self, pool: str, backend: BackendSlots, pinned: frozenset[str]) -> list[str]:
        result: list[str] = await self._timed("trim", self.inner.trim(pool, backend, pinned))
        return result

    async def evicted(self, pool: str, backend: str, adapter: str) -> None:
        await self._timed("evicted", self.inner.evicted(pool, backend, adapter))

    async def forget(self, pool: str, backend: str, adapter: str) -> None:
        await self._timed("forget", self.inner.forget(pool, backend, adapter))

    async def reconcile(
        self, pool: str, backend: str, actual: set[str], known_before: set[str]
    ) -> tuple[set[str], set[str]]:
        result: tuple[set[str], set[str]] = await self._timed(
            "reconcile", self.inner.reconcile(pool, backend, actual, known_before)
        )
        return result

    async def drop_backend(self, pool: str, backend: str) -> None:
        await self._timed("drop_backend", self.inner.drop_backend(pool, backend))

    async def waiting(self, pool: str, replica: str, counts: Mapping[str, int], ttl_s: float) -> dict[str, int]:
        result: dict[str, int] = await self._timed("waiting", self.inner.waiting(pool, replica, counts, ttl_s))
        return result
