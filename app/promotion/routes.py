"""The routing table of promoted adapters: adapter -> the dedicated deployment that takes its traffic.

Every change (a switch, a demotion) bumps one epoch row in the same transaction. Each gateway replica
polls that row every GATEWAY_ROUTES_POLL_S (one indexed read, never per request) and reloads the table
when the epoch moved, then records the epoch it now serves in its `gateway_replicas` row. The worker
waits for every live replica to report the new epoch before it calls a switch done or stops a deployment,
so no replica sends a request to a deployment that is gone. A request is routed once, at its start: one
already running on the LoRA path finishes there.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy import delete, select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.db.models import Backend, Deployment, DeploymentState, GatewayReplica, RoutingEpoch
from app.outages import db_unreachable
from app.registry.cache import backend_view
from app.registry.snapshots import BackendView

log = logging.getLogger(__name__)

# A replica that has not reported for this long is taken for gone (crashed, scaled down): the worker no
# longer waits for it. Replicas report at least every REPORT_EVERY_S.
REPLICA_ALIVE_S = 15.0
REPORT_EVERY_S = 5.0


@dataclass(frozen=True, slots=True)
class Route:
    adapter_id: uuid.UUID
    deployment_id: uuid.UUID
    backend: BackendView
    served_name: str  # the model name the dedicated vLLM serves


async def bump_epoch(session: AsyncSession) -> int:
    """Moves the epoch on, inside the caller's transaction (commit makes the change visible)."""
    now = datetime.now(UTC)
    updated = await session.execute(
        update(RoutingEpoch).where(RoutingEpoch.id == 1).values(epoch=RoutingEpoch.epoch + 1, updated_at=now)
    )
    if updated.rowcount == 0:  # type: ignore[attr-defined]
        session.add(RoutingEpoch(id=1, epoch=1, updated_at=now))
        await session.flush()
    epoch = await session.scalar(select(RoutingEpoch.epoch).where(RoutingEpoch.id == 1))
    return int(epoch or 0)


async def current_epoch(session: AsyncSession) -> int:
    return int(await session.scalar(select(RoutingEpoch.epoch).where(RoutingEpoch.id == 1)) or 0)


async def load_routes(session: AsyncSession) -> dict[uuid.UUID, Route]:
    rows = await session.execute(
        select(Deployment, Backend)
        .join(Backend, Deployment.backend_id == Backend.id)
        .where(Deployment.active.is_(True), Deployment.state == DeploymentState.READY)
    )
    routes: dict[uuid.UUID, Route] = {}
    for dep, backend in rows:
        if dep.adapter_id is not None and dep.served_model_name:
            routes[dep.adapter_id] = Route(dep.adapter_id, dep.id, backend_view(backend), dep.served_model_name)
    return routes


async def lagging_replicas(session: AsyncSession, epoch: int) -> list[str]:
    """Live replicas that have not yet reported serving `epoch`."""
    alive_since = datetime.now(UTC) - timedelta(seconds=REPLICA_ALIVE_S)
    rows = await session.scalars(
        select(GatewayReplica.id).where(GatewayReplica.seen_at >= alive_since, GatewayReplica.epoch < epoch)
    )
    return list(rows)


async def wait_observed(
    sessionmaker: async_sessionmaker[AsyncSession], epoch: int, *, timeout_s: float, poll_s: float = 0.1
) -> list[str]:
    """Waits until every live replica serves `epoch`; returns the ones still behind at the timeout."""
    deadline = time.monotonic() + timeout_s
    while True:
        async with sessionmaker() as session:
            behind = await lagging_replicas(session, epoch)
        if not behind or time.monotonic() >= deadline:
            return behind
        await asyncio.sleep(poll_s)


class RoutingTable:
    """One gateway replica's copy of the table. `get` is a dict lookup: the hot path's whole cost."""

    def __init__(
        self, sessionmaker: async_sessionmaker[AsyncSession], *, poll_s: float = 0.25, replica_id: str | None = None
    ) -> None:
        self._sessionmaker = sessionmaker
        self.poll_s = poll_s
        self.replica_id = replica_id or uuid.uuid4().hex
        self.routes: dict[uuid.UUID, Route] = {}
        self.epoch = -1  # nothing loaded yet
        self._reported_at = 0.0
        self._failing = False

    def get(self, adapter_id: uuid.UUID) -> Route | None:
        return self.routes.get(adapter_id) if self.routes else None

    async def refresh(self) -> bool:
        """Reloads the table if the epoch moved; returns whether it did."""
        async with self._sessionmaker() as session:
            epoch = await current_epoch(session)
            changed = epoch != self.epoch
            if changed:
                self.routes = await load_routes(session)
                self.epoch = epoch
                log.info("routing epoch %d: %d promoted adapters", epoch, len(self.routes))
            if changed or time.monotonic() - self._reported_at >= REPORT_EVERY_S:
                await self._report(session)
        return changed

    async def _report(self, session: AsyncSession) -> None:
        now = datetime.now(UTC)
        updated = await session.execute(
            update(GatewayReplica).where(GatewayReplica.id == self.replica_id).values(epoch=self.epoch, seen_at=now)
        )
        if updated.rowcount == 0:  # type: ignore[attr-defined]
            session.add(GatewayReplica(id=self.replica_id, epoch=self.epoch, seen_at=now))
        await session.commit()
        self._reported_at = time.monotonic()

    async def run(self) -> None:
        while True:
            try:
                await self.refresh()
                if self._failing:
                    self._failing = False
                    log.info("routing table reachable again (epoch %d)", self.epoch)
            except Exception as exc:  # the database is out: keep serving the table we have
                if not self._failing:
                    self._failing = True
                    if db_unreachable(exc):
                        log.warning("routing table not refreshed (database unreachable); serving epoch %d", self.epoch)
                    else:
                        log.exception("routing table not refreshed; serving epoch %d", self.epoch)
            await asyncio.sleep(self.poll_s)

    async def leave(self) -> None:
        """Removes this replica's row at shutdown, so the worker does not wait for it."""
        async with self._sessionmaker() as session:
            await session.execute(delete(GatewayReplica).where(GatewayReplica.id == self.replica_id))
            await session.commit()
