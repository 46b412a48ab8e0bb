"""What the admin API does with promotions, jobs and deployments: rows only. The worker does the work."""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from app.db.models import Adapter, AdapterState, Deployment, DeploymentState, Job, Tenant
from app.errors import Conflict, NotFound
from app.promotion import jobs, schemas
from app.promotion.advice import AdapterFacts
from app.registry.service import parse_uuid

_LIVE_DEPLOYMENT = (DeploymentState.PENDING, DeploymentState.STARTING, DeploymentState.READY, DeploymentState.STOPPING)


async def _adapter(session: AsyncSession, ref: str) -> Adapter:
    ident = parse_uuid(ref)
    adapter = await session.get(Adapter, ident) if ident is not None else None
    if adapter is None or adapter.state == AdapterState.DELETED:
        raise NotFound(f"adapter {ref!r} not found", param="adapter")
    return adapter


async def create_promotion(session: AsyncSession, *, adapter_ref: str, data: schemas.PromotionCreate) -> Job:
    adapter = await _adapter(session, adapter_ref)
    busy = await session.scalar(
        select(Job.id).where(Job.adapter_id == adapter.id, Job.state.in_(jobs.ACTIVE_STATES)).limit(1)
    )
    if busy is not None:
        raise Conflict(f"adapter {adapter_ref!r} already has a job under way ({busy})", param="adapter")
    live = await session.scalar(
        select(Deployment.id)
        .where(Deployment.adapter_id == adapter.id, Deployment.state.in_(_LIVE_DEPLOYMENT))
        .limit(1)
    )
    if live is not None:
        raise Conflict(
            f"adapter {adapter_ref!r} already has a dedicated deployment ({live}); demote it first",
            param="adapter",
        )
    job = await jobs.enqueue(
        session, kind=jobs.PROMOTE, adapter_id=adapter.id, params=data.model_dump(mode="json", exclude_none=True)
    )
    await session.commit()
    await session.refresh(job)
    return job


async def get_job(session: AsyncSession, ref: str) -> Job:
    ident = parse_uuid(ref)
    job = await session.get(Job, ident) if ident is not None else None
    if job is None:
        raise NotFound(f"job {ref!r} not found", param="job")
    return job


async def list_jobs(session: AsyncSession, *, limit: int = 100) -> list[Job]:
    return list(await session.scalars(select(Job).order_by(Job.created_at.desc()).limit(limit)))


async def cancel_job(session: AsyncSession, ref: str) -> Job:
    job = await get_job(session, ref)
    if job.state not in jobs.ACTIVE_STATES:
        raise Conflict(f"job {ref!r} is already {job.state.value}", param="job")
    return await jobs.request_cancel(session, job)


def deployment_read(dep: Deployment) -> schemas.DeploymentRead:
    return schemas.DeploymentRead(
        id=dep.id,
        adapter_id=dep.adapter_id,
        job_id=dep.job_id,
        launcher=dep.launcher,
        state=dep.state,
        active=dep.active,
        quantization=dep.quantization,
        tensor_parallel_size=dep.tensor_parallel_size,
        model_path=dep.model_path,
        error=dep.error,
        created_at=dep.created_at,
        updated_at=dep.updated_at,
    )


async def get_deployment(session: AsyncSession, ref: str) -> Deployment:
    ident = parse_uuid(ref)
    dep = await session.get(Deployment, ident) if ident is not None else None
    if dep is None:
        raise NotFound(f"deployment {ref!r} not found", param="deployment")
    return dep


async def list_deployments(session: AsyncSession) -> list[Deployment]:
    return list(await session.scalars(select(Deployment).order_by(Deployment.created_at.desc())))


async def demote(session: AsyncSession, ref: str) -> Job:
    """Queues the demotion of a deployment: traffic back to the LoRA path, then the deployment stops."""
    dep = await get_deployment(session, ref)
    if dep.state in (DeploymentState.STOPPED, DeploymentState.FAILED):
        raise Conflict(f"deployment {ref!r} is already {dep.state.value}", param="deployment")
    busy = await session.scalar(
        select(Job.id).where(Job.adapter_id == dep.adapter_id, Job.state.in_(jobs.ACTIVE_STATES)).limit(1)
    )
    if busy is not None:
        raise Conflict(f"a job for this adapter is under way ({busy}); cancel it or wait", param="deployment")
    job = await jobs.enqueue(
        session, kind=jobs.DEMOTE, adapter_id=dep.adapter_id, params={"deployment_id": str(dep.id)}
    )
    await session.commit()
    await session.refresh(job)
    return job


def job_artifacts(job: Job, *, artifact_root: Path) -> list[tuple[dict[str, object], Path]]:
    """The job's artifacts (as its result lists them) with where each lies; only folders under the root."""
    out = []
    for entry in (job.result or {}).get("artifacts", []):
        path = (artifact_root / str(entry.get("path", ""))).resolve()
        if artifact_root.resolve() in path.parents and path.is_dir():
            out.append((entry, path))
    return out


def find_artifact(job: Job, name: str, *, artifact_root: Path) -> tuple[dict[str, object], Path]:
    for entry, path in job_artifacts(job, artifact_root=artifact_root):
        if entry.get("name") == name:
            return entry, path
    raise NotFound(f"job has no artifact {name!r}", param="artifact")


async def adapter_facts(session: AsyncSession, keys: Iterable[str]) -> dict[str, AdapterFacts]:
    """What the advice needs of the adapters it saw traffic for (hex ids; other keys are skipped)."""
    ids = []
    for key in keys:
        try:
            ids.append(uuid.UUID(hex=key))
        except ValueError:
            continue
    out: dict[str, AdapterFacts] = {}
    for chunk in (ids[i : i + 500] for i in range(0, len(ids), 500)):
        rows = await session.execute(
            select(Adapter, Tenant.name)
            .join(Tenant, Tenant.id == Adapter.tenant_id)
            .where(Adapter.id.in_(chunk), Adapter.state != AdapterState.DELETED)
        )
        promoted = set(
            await session.scalars(
                select(Deployment.adapter_id).where(
                    Deployment.adapter_id.in_(chunk), Deployment.active.is_(True)
                )
            )
        )
        for adapter, tenant in rows:
            out[adapter.id.hex] = AdapterFacts(
                id=adapter.id, tenant=tenant, name=adapter.name, version=adapter.version,
                created_at=adapter.created_at, promoted=adapter.id in promoted,
            )  # fmt: skip
    return out
