"""In-process, TTL-bounded cache of the registry lookups on the request path, so a warm gateway sends
no query to the database per request. Changes made elsewhere (another replica, a revoked key) take
effect within the TTL; changes made through this process invalidate at once."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Hashable
from datetime import UTC, datetime
from typing import Generic, TypeVar

from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.db.models import Adapter, AdapterState, ApiKey, Backend, BackendKind, BackendState, BaseModel, Tenant
from app.limits.state import limits_from
from app.outages import OUTAGES, RegistryUnavailable, db_unreachable
from app.registry.snapshots import AdapterView, BackendView, BaseModelView, TenantView

log = logging.getLogger(__name__)

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class Breaker:
    """Shared by a cache's loaders: once a load finds the database unreachable, for `cooldown_s` no
    load is tried at all (a stale answer or a 503 at once), then one probes again. So an outage costs
    the database about one connection attempt per cooldown, and a request no wait."""

    def __init__(self, cooldown_s: float = 2.0) -> None:
        self.cooldown_s = cooldown_s
        self._open_until = 0.0
        self.outage = OUTAGES.db  # the process's one log of database outages

    @property
    def open(self) -> bool:
        return time.monotonic() < self._open_until

    def trip(self, exc: BaseException) -> None:
        self._open_until = time.monotonic() + self.cooldown_s
        self.outage.failed(exc)

    def ok(self) -> None:
        self._open_until = 0.0
        self.outage.recovered()


class _Loader(Generic[K, V]):
    """A bounded TTL map whose misses are loaded once however many requests ask at the same time.

    A plain dict of key -> (expiry, loaded at, value): a hit costs one lookup and one clock read
    (cachetools' TTLCache costs several microseconds per hit, and there are four lookups per request).
    When full, the entries past their staleness bound go first, then the oldest inserted.

    When the database is unreachable, an entry past its TTL is still served for up to `max_stale_s`
    after it was loaded (a known key keeps working through an outage; a key revoked during the outage
    is revoked once the database answers). A reload that takes longer than `stale_grace_s` while a
    stale answer exists leaves the request with the stale answer; the reload goes on for the next."""

    def __init__(
        self,
        maxsize: int,
        ttl: float,
        load: Callable[[K], Awaitable[V]],
        *,
        breaker: Breaker | None = None,
        max_stale_s: float = 0.0,
        stale_grace_s: float = 0.5,
    ) -> None:
        self._cache: dict[K, tuple[float, float, V]] = {}
        self._maxsize = maxsize
        self._ttl = ttl
        self._load = load
        self._pending: dict[K, asyncio.Task[V]] = {}
        self._breaker = breaker or Breaker()
        self._max_stale_s = max_stale_s
        self._stale_grace_s = stale_grace_s

    def _store(self, key: K, value: V) -> None:
        now = time.monotonic()
        self._cache.pop(key, None)
        if len(self._cache) >= self._maxsize:
            keep = self._ttl + self._max_stale_s
            for k in [k for k, (_, at, _) in self._cache.items() if now - at > keep]:
                del self._cache[k]
            while len(self._cache) >= self._maxsize:
                del self._cache[next(iter(self._cache))]
        self._cache[key] = (now + self._ttl, now, value)

    async def get(self, key: K) -> V:
        hit = self._cache.get(key)
        now = time.monotonic()
        if hit is not None and hit[0] > now:
            return hit[2]
        if hit is None or now - hit[1] > self._ttl + self._max_stale_s:
            if self._breaker.open:
                raise RegistryUnavailable()
            return await asyncio.shield(self._reloading(key))
        stale = hit[2]  # past its TTL, within its staleness bound: the answer while the database is out
        if self._breaker.open:
            return stale
        task = self._reloading(key)
        done, _ = await asyncio.wait({task}, timeout=self._stale_grace_s)
        if not done or isinstance(task.exception(), RegistryUnavailable):
            return stale
        return task.result()  # the fresh answer, or the load's own error

    def _reloading(self, key: K) -> asyncio.Task[V]:
        """The one reload of `key` under way, started if none is."""
        task = self._pending.get(key)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._reload(key))
            task.add_done_callback(_retrieved)  # a reload nobody waited for must not log "never retrieved"
            self._pending[key] = task
        return task

    async def _reload(self, key: K) -> V:
        try:
            value = await self._load(key)
        except Exception as exc:
            if db_unreachable(exc):
                self._breaker.trip(exc)
                raise RegistryUnavailable() from exc
            raise
        finally:
            del self._pending[key]
        self._breaker.ok()
        self._store(key, value)
        return value

    def invalidate(self, key: K | None = None) -> None:
        if key is None:
            self._cache.clear()
        else:
            self._cache.pop(key, None)


def _retrieved(task: asyncio.Task[object]) -> None:
    if not task.cancelled():
        task.exception()


def backend_view(b: Backend) -> BackendView:
    return BackendView(
        id=b.id,
        name=b.name,
        url=b.url,
        base_model_id=b.base_model_id,
        gpu_slots=b.gpu_slots,
        capacity=b.capacity,
        max_num_seqs=b.max_num_seqs,
        api_key=b.api_key,
    )


def _base_view(m: BaseModel) -> BaseModelView:
    return BaseModelView(id=m.id, name=m.name, aliases=tuple(m.aliases), public=m.public)


class RegistryCache:
    def __init__(
        self,
        sessionmaker: async_sessionmaker[AsyncSession],
        *,
        ttl: float,
        maxsize: int = 100_000,
        usage_flush_interval: float = 60.0,
        max_stale_s: float = 300.0,
    ) -> None:
        self._sessionmaker = sessionmaker
        self.breaker = Breaker()
        self._ttl, self._max_stale_s = ttl, max_stale_s
        self.keys: _Loader[str, TenantView | None] = self._loader(maxsize, self._load_key)
        self.adapters: _Loader[tuple[uuid.UUID, str, int | None], AdapterView | None] = self._loader(
            maxsize, self._load_adapter
        )
        self.tenant_adapters: _Loader[uuid.UUID, tuple[AdapterView, ...]] = self._loader(
            maxsize, self._load_tenant_adapters
        )
        self.base_models: _Loader[str, tuple[BaseModelView, ...]] = self._loader(1, self._load_base_models)
        self.backends: _Loader[uuid.UUID, tuple[BackendView, ...]] = self._loader(1024, self._load_backends)
        self.pinned: _Loader[uuid.UUID, frozenset[str]] = self._loader(1024, self._load_pinned)
        # Key hash -> last use; written to the database in batches, never per request.
        self._key_use: dict[str, float] = {}
        self._usage_flush_interval = usage_flush_interval

    def _loader(self, maxsize: int, load: Callable[[K], Awaitable[V]]) -> _Loader[K, V]:
        return _Loader(maxsize, self._ttl, load, breaker=self.breaker, max_stale_s=self._max_stale_s)

    # --- lookups -----------------------------------------------------------------------------------

    async def tenant_for_key(self, key_hash: str) -> TenantView | None:
        tenant = await self.keys.get(key_hash)
        if tenant is not None and len(self._key_use) < 100_000:
            self._key_use[key_hash] = time.time()
        return tenant

    async def adapter(self, tenant_id: uuid.UUID, name: str, version: int | None) -> AdapterView | None:
        return await self.adapters.get((tenant_id, name, version))

    async def base_model(self, name: str) -> BaseModelView | None:
        for model in await self.base_models.get(""):
            if model.name == name or name in model.aliases:
                return model
        return None

    async def shared_backends(self, base_model_id: uuid.UUID) -> tuple[BackendView, ...]:
        return await self.backends.get(base_model_id)

    def invalidate_all(self) -> None:
        for loader in (
            self.keys,
            self.adapters,
            self.tenant_adapters,
            self.base_models,
            self.backends,
            self.pinned,
        ):
            loader.invalidate()

    # --- loaders -----------------------------------------------------------------------------------

    async def _load_key(self, key_hash: str) -> TenantView | None:
        async with self._sessionmaker() as session:
            row = (
                await session.execute(
                    select(
                        Tenant.id, Tenant.name, Tenant.max_adapters_per_backend, Tenant.limits, ApiKey.id, ApiKey.limits
                    )
                    .join(ApiKey, ApiKey.tenant_id == Tenant.id)
                    .where(ApiKey.key_hash == key_hash, ApiKey.revoked_at.is_(None))
                )
            ).first()
        if row is None:
            return None
        return TenantView(
            id=row[0],
            name=row[1],
            max_adapters_per_backend=row[2],
            key_id=row[4],
            limits=limits_from(row[3]),
            key_limits=limits_from(row[5]),
        )

    async def _adapter_rows(self, session: AsyncSession, *conds: object) -> list[AdapterView]:
        stmt = (
            select(Adapter, BaseModel)
            .join(BaseModel, Adapter.base_model_id == BaseModel.id)
            .where(Adapter.state == AdapterState.READY, *conds)  # type: ignore[arg-type]
            .order_by(Adapter.name, Adapter.version.desc())
        )
        return [
            AdapterView(
                id=a.id,
                tenant_id=a.tenant_id,
                name=a.name,
                version=a.version,
                base_model=_base_view(m),
                sha256=a.sha256,
                storage_path=a.storage_path,
                created_at=a.created_at.timestamp(),
                pinned=a.pinned,
                limits=limits_from(a.limits),
            )
            for a, m in await session.execute(stmt)
        ]

    async def _load_adapter(self, key: tuple[uuid.UUID, str, int | None]) -> AdapterView | None:
        tenant_id, name, version = key
        conds: list[object] = [Adapter.tenant_id == tenant_id, Adapter.name == name]
        if version is not None:
            conds.append(Adapter.version == version)
        async with self._sessionmaker() as session:
            rows = await self._adapter_rows(session, *conds)
        return rows[0] if rows else None  # newest version first

    async def _load_tenant_adapters(self, tenant_id: uuid.UUID) -> tuple[AdapterView, ...]:
        async with self._sessionmaker() as session:
            rows = await self._adapter_rows(session, Adapter.tenant_id == tenant_id)
        latest: dict[str, AdapterView] = {}
        for view in rows:
            latest.setdefault(view.name, view)
        return tuple(latest.values())

    async def _load_base_models(self, _: str) -> tuple[BaseModelView, ...]:
        async with self._sessionmaker() as session:
            return tuple(
                _base_view(m) for m in await session.scalars(select(BaseModel).order_by(BaseModel.name))
            )

    async def _load_backends(self, base_model_id: uuid.UUID) -> tuple[BackendView, ...]:
        async with self._sessionmaker() as session:
            return tuple(map(backend_view, await session.scalars(
                select(Backend)
                .where(
                    Backend.base_model_id == base_model_id,
                    Backend.kind == BackendKind.SHARED,
                    Backend.state == BackendState.ACTIVE,
                )
                .order_by(Backend.name)
            )))  # fmt: skip

    async def _load_pinned(self, base_model_id: uuid.UUID) -> frozenset[str]:
        """Served names of the pinned adapters of one base model: what eviction must leave alone."""
        async with self._sessionmaker() as session:
            rows = await self._adapter_rows(
                session, Adapter.base_model_id == base_model_id, Adapter.pinned.is_(True)
            )
        return frozenset(a.served_name for a in rows)

    # --- key usage ---------------------------------------------------------------------------------

    async def flush_key_usage(self) -> int:
        """Writes the batched last-use times of API keys; returns how many keys were updated."""
        used, self._key_use = self._key_use, {}
        if not used:
            return 0
        async with self._sessionmaker() as session:
            # In one order on every replica: two gateways updating the same keys in different orders
            # deadlock in Postgres (seen under load).
            for key_hash, at in sorted(used.items()):
                await session.execute(
                    update(ApiKey)
                    .where(ApiKey.key_hash == key_hash)
                    .values(last_used_at=datetime.fromtimestamp(at, UTC))
                )
            await session.commit()
        return len(used)

    async def run_usage_flusher(self) -> None:
        while True:
            await asyncio.sleep(self._usage_flush_interval)
            try:
                await self.flush_key_usage()
            except Exception as exc:  # a DB hiccup must not end the loop; the next round retries
                if db_unreachable(exc):
                    self.breaker.outage.failed(exc)
                else:
                    log.exception("could not record API key usage")
