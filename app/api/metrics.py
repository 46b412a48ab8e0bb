"""GET /metrics: the gateway's Prometheus series (app.metrics). Its labels name tenants and adapters, so
it asks for a bearer token: GATEWAY_METRICS_TOKEN, or the admin key when none is set (Prometheus sends
it with `authorization: {credentials_file: ...}` in its scrape config). Kept out of the public OpenAPI.

The fleet gauges (backends' health, slots and adapters, the registry's adapters, promotion jobs) are read
here, at most every few seconds, from the registry and the residency store; when either does not answer
within a second the last reading is served again (the request-path series never wait on them)."""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict

from fastapi import APIRouter, Request, Response
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.db.models import (
    Adapter,
    AdapterState,
    Backend,
    BackendKind,
    BackendState,
    BaseModel,
    Job,
    JobState,
)
from app.deps import require_bearer
from app.metrics import CONTENT_TYPE, BackendSample, FleetSample
from app.residency.state import BackendSlots
from app.routing.router import Router
from app.settings import Settings

router = APIRouter(include_in_schema=False)
log = logging.getLogger(__name__)

FLEET_TIMEOUT_S = 1.0


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    settings: Settings = request.state.settings
    require_bearer(
        request,
        settings.METRICS_TOKEN or settings.ADMIN_API_KEY,
        "/metrics needs the metrics token (Authorization: Bearer <GATEWAY_METRICS_TOKEN>)",
    )
    data_path = request.state.data_path
    sessionmaker = request.state.sessionmaker

    async def sample() -> FleetSample:
        return await fleet_sample(sessionmaker, data_path.router)

    try:
        await asyncio.wait_for(data_path.metrics.refresh_fleet(sample), FLEET_TIMEOUT_S)
    except Exception as exc:  # noqa: BLE001 - the last reading is served; the outage has its own series
        log.debug("fleet gauges not refreshed: %r", exc)
    return Response(data_path.metrics.scrape(), media_type=CONTENT_TYPE)


async def fleet_sample(sessionmaker: async_sessionmaker[AsyncSession], router_: Router) -> FleetSample:
    """One reading of the fleet: three grouped queries and one residency snapshot per base model."""
    async with sessionmaker() as session:
        backends = (
            await session.execute(
                select(Backend, BaseModel.name)
                .join(BaseModel, Backend.base_model_id == BaseModel.id)
                .where(Backend.kind == BackendKind.SHARED, Backend.state != BackendState.DOWN)
            )
        ).all()
        registered = (
            await session.execute(
                select(BaseModel.name, func.count(Adapter.id))
                .join(Adapter, Adapter.base_model_id == BaseModel.id)
                .where(Adapter.state != AdapterState.DELETED)
                .group_by(BaseModel.name)
            )
        ).all()
        jobs = (
            await session.execute(
                select(Job.kind, Job.state, Job.step, func.count()).group_by(Job.kind, Job.state, Job.step)
            )
        ).all()
    out = FleetSample(registered={name: int(n) for name, n in registered})
    for kind, job_state, step, n in jobs:
        key = (kind, str(job_state), "" if job_state is JobState.SUCCEEDED else step or "")
        out.jobs[key] = out.jobs.get(key, 0) + n
    pools: dict[str, list[tuple[Backend, str]]] = defaultdict(list)
    for backend, model in backends:
        pools[str(backend.base_model_id)].append((backend, model))
    for pool, members in pools.items():
        slots = [BackendSlots(str(b.id), b.gpu_slots, b.capacity, b.max_num_seqs) for b, _ in members]
        states = {s.id: s for s in await router_.store.snapshot(pool, slots)}
        model = members[0][1]
        loaded: set[str] = set()
        for b, _ in members:
            state = states.get(str(b.id))
            held = set(state.registered) if state is not None else set()
            loaded |= held
            out.backends.append(
                BackendSample(b.name, model, str(b.id) not in router_.unhealthy, b.gpu_slots, len(held))
            )
        out.active[model] = len(loaded)
    for model in out.registered:
        out.active.setdefault(model, 0)
    return out
