"""Liveness and readiness probes. /healthz: the process answers. /readyz: it can serve: the database
and Redis (when configured) answer, at least one shared backend is healthy, and it is not draining
after a SIGTERM."""

import asyncio

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from sqlalchemy import select, text

from app.db.models import Backend, BackendKind, BackendState

router = APIRouter(tags=["health"])

_CHECK_TIMEOUT_S = 2.0


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


async def _database(request: Request) -> tuple[str, list[str]]:
    async with request.state.sessionmaker() as session:
        await session.execute(text("SELECT 1"))
        rows = await session.scalars(
            select(Backend.id).where(Backend.kind == BackendKind.SHARED, Backend.state == BackendState.ACTIVE)
        )
        return "ok", [str(r) for r in rows]


@router.get("/readyz", responses={503: {"description": "not ready: the failing checks are named"}})
async def readyz(request: Request) -> JSONResponse:
    checks: dict[str, str] = {}
    backends: list[str] = []
    try:
        checks["database"], backends = await asyncio.wait_for(_database(request), _CHECK_TIMEOUT_S)
    except Exception as exc:  # noqa: BLE001 (any failure means not ready)
        checks["database"] = f"error: {type(exc).__name__}"
    router_ = request.state.data_path.router
    redis = getattr(router_.store, "redis", None)
    if redis is not None:
        try:
            await asyncio.wait_for(redis.ping(), _CHECK_TIMEOUT_S)
            checks["redis"] = "ok"
        except Exception as exc:  # noqa: BLE001
            checks["redis"] = f"error: {type(exc).__name__}"
    if checks["database"] == "ok":
        healthy = [b for b in backends if b not in router_.unhealthy]
        checks["backends"] = "ok" if healthy else f"none of {len(backends)} healthy"
    if request.state.drain.draining:
        checks["shutdown"] = "draining"
    ready = all(v == "ok" for v in checks.values())
    return JSONResponse(
        {"status": "ready" if ready else "not ready", "checks": checks}, status_code=200 if ready else 503
    )
