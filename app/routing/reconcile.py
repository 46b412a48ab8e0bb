"""Keeps the residency state true to the backends: every interval (and right after a backend answers
404 for an adapter) each backend's /v1/models is compared with the state and the state repaired (a
restarted vLLM, a flushed Redis, an adapter unloaded by hand). A backend that fails its health checks
gets no traffic from this process (its adapters are placed elsewhere) and is used again as soon as it
answers; its state is repaired from its own listing then, never dropped on one process's word."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Awaitable, Callable

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.backends.vllm import BackendUnavailable
from app.db.models import Backend, BackendKind, BackendState
from app.outages import OUTAGES
from app.registry.cache import backend_view
from app.registry.snapshots import BackendView
from app.residency.state import BackendSlots
from app.routing.router import Router

log = logging.getLogger(__name__)

MANAGED_PREFIX = "lgw-"  # adapters the gateway loaded; anything else on a backend is left alone


class Reconciler:
    def __init__(
        self,
        *,
        sessionmaker: async_sessionmaker[AsyncSession],
        router: Router,
        interval_s: float,
        unhealthy_after: int,
        pinned: Callable[[uuid.UUID], Awaitable[frozenset[str]]] | None = None,
    ) -> None:
        self._sessionmaker = sessionmaker
        self._pinned = pinned  # base model -> served names of its pinned adapters (never trimmed)
        self.router = router
        self.interval_s = interval_s
        self.unhealthy_after = unhealthy_after
        self._failures: dict[str, int] = {}
        self._poked: dict[str, asyncio.Task[None]] = {}
        router.on_trouble = self.poke

    async def backends(self) -> list[BackendView]:
        async with self._sessionmaker() as session:
            rows = await session.scalars(
                select(Backend).where(Backend.kind == BackendKind.SHARED, Backend.state != BackendState.DOWN)
            )
            return [backend_view(b) for b in rows]

    async def run(self) -> None:
        while True:
            try:
                await asyncio.gather(*(self.reconcile(b) for b in await self.backends()))
            except Exception as exc:
                if OUTAGES.answer(exc) is None:  # an outage is logged there, once for the process
                    log.exception("reconciliation round failed")
            else:
                OUTAGES.recovered()
            await asyncio.sleep(self.interval_s)

    async def reconcile(self, backend: BackendView) -> None:
        key, pool = str(backend.id), str(backend.base_model_id)
        slots = BackendSlots(key, backend.gpu_slots, backend.capacity, backend.max_num_seqs)
        known_before = set((await self.router.store.snapshot(pool, [slots]))[0].registered)
        try:
            models = await self.router.client.list_models(
                backend.url, backend=backend.name, token=backend.api_key
            )
        except BackendUnavailable:
            self._failures[key] = self._failures.get(key, 0) + 1
            if self._failures[key] >= self.unhealthy_after and key not in self.router.unhealthy:
                log.warning(
                    "backend %s failed %d health checks: draining it", backend.name, self._failures[key]
                )
                await self.router.mark_down(backend)
            return
        self._failures[key] = 0
        if key in self.router.unhealthy:
            log.info("backend %s answers again", backend.name)
            self.router.unhealthy.discard(key)
        actual = {str(m.get("id")) for m in models if str(m.get("id", "")).startswith(MANAGED_PREFIX)}
        added, removed = await self.router.store.reconcile(pool, key, actual, known_before)
        if added or removed:
            log.info("backend %s: state repaired (+%d -%d)", backend.name, len(added), len(removed))
        await self.trim(backend, slots)

    async def trim(self, backend: BackendView, slots: BackendSlots) -> list[str]:
        """Unload the least recently used idle adapters a backend holds beyond its capacity (after the
        state was lost, gateways may have loaded adapters there that it already had others for)."""
        pool = str(backend.base_model_id)
        pinned = await self._pinned(backend.base_model_id) if self._pinned is not None else frozenset()
        victims = await self.router.store.trim(pool, slots, pinned)
        reachable = True
        for victim in victims:
            try:
                if reachable:
                    await self.router.client.unload_adapter(
                        backend.url, victim, backend=backend.name, token=backend.api_key
                    )
                    self.router.metrics.unloaded(backend.name, "trimmed")
            except BackendUnavailable:
                reachable = False  # down: what was not unloaded shows up in its listing again
            except Exception:
                log.exception("unloading %s from %s failed", victim, backend.name)
            finally:
                await self.router.store.evicted(pool, str(backend.id), victim)
        if victims and reachable:
            log.info("backend %s: over capacity, unloaded %s", backend.name, ", ".join(victims))
        return victims

    def poke(self, backend: BackendView) -> None:
        """Reconcile this backend soon (once, however many requests ask)."""
        key = str(backend.id)
        task = self._poked.get(key)
        if task is not None and not task.done():
            return
        self._poked[key] = asyncio.create_task(self._reconcile_quietly(backend))

    async def _reconcile_quietly(self, backend: BackendView) -> None:
        with contextlib.suppress(Exception):
            await self.reconcile(backend)
