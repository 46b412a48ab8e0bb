"""Chooses the backend for a request and makes sure the adapter is loaded there, loading each adapter
once per backend however many requests arrive for it at the same time.

This is the per-process version the data path starts with: what is loaded where is learnt from the
loads this process made and from the backends' 404s. The residency issue replaces it with shared
(Redis) bookkeeping, LRU eviction and slot-aware placement behind the same two calls."""

from __future__ import annotations

import asyncio
import itertools
import logging
import uuid
from pathlib import PurePosixPath

from app.backends.vllm import VllmClient
from app.registry.snapshots import AdapterView, BackendView

log = logging.getLogger(__name__)


class Placement:
    def __init__(self, client: VllmClient, *, adapter_root: str) -> None:
        self._client = client
        # The adapter store as the backends see it (a shared volume may be mounted elsewhere there).
        self._adapter_root = PurePosixPath(adapter_root)
        self._loaded: dict[uuid.UUID, set[str]] = {}
        self._loading: dict[tuple[uuid.UUID, str], asyncio.Future[None]] = {}
        self._rr = itertools.count()
        self.loads = 0  # loads this process asked for (tests read it; metrics later)

    def adapter_path(self, adapter: AdapterView) -> str:
        return str(self._adapter_root / adapter.storage_path)

    def is_loaded(self, backend: BackendView, served_name: str) -> bool:
        return served_name in self._loaded.get(backend.id, ())

    def choose(self, backends: tuple[BackendView, ...], adapter: AdapterView | None) -> BackendView:
        """A backend that has the adapter already, else the one with the fewest adapters; round-robin on ties."""
        n = next(self._rr)
        if adapter is not None:
            holding = [b for b in backends if self.is_loaded(b, adapter.served_name)]
            if holding:
                return holding[n % len(holding)]
            fewest = min(len(self._loaded.get(b.id, ())) for b in backends)
            candidates = [b for b in backends if len(self._loaded.get(b.id, ())) == fewest]
            return candidates[n % len(candidates)]
        return backends[n % len(backends)]

    async def ensure_loaded(self, backend: BackendView, adapter: AdapterView) -> None:
        name = adapter.served_name
        if self.is_loaded(backend, name):
            return
        key = (backend.id, name)
        pending = self._loading.get(key)
        if pending is not None:
            await asyncio.shield(pending)
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._loading[key] = fut
        try:
            self.loads += 1
            await self._client.load_adapter(
                backend.url, name, self.adapter_path(adapter), backend=backend.name
            )
        except BaseException as exc:
            fut.set_exception(exc)
            fut.exception()  # waiters re-raise it; nobody else has to
            raise
        finally:
            del self._loading[key]
        self._loaded.setdefault(backend.id, set()).add(name)
        fut.set_result(None)
        log.info("loaded adapter %s on backend %s", name, backend.name)

    def forget(self, backend: BackendView, served_name: str) -> None:
        """The backend no longer has it (restart, manual unload): the next request loads it again."""
        self._loaded.get(backend.id, set()).discard(served_name)
