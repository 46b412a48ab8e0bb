"""Promotions, jobs and dedicated deployments. The gateway only writes rows; `lora-gateway worker` runs
the jobs."""

from __future__ import annotations

import tarfile
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Query, Request
from fastapi.responses import StreamingResponse

from app.deps import SessionDep, SettingsDep
from app.promotion import schemas, service
from app.promotion.advice import Advice, AdviceParams, advise
from app.registry.schemas import Page
from app.traffic import TrafficMeter

router = APIRouter(tags=["promotions"])


@router.post("/adapters/{adapter}/promotions", status_code=202)
async def create_promotion(adapter: str, data: schemas.PromotionCreate, session: SessionDep) -> schemas.JobRead:
    return schemas.JobRead.model_validate(await service.create_promotion(session, adapter_ref=adapter, data=data))


@router.get("/promotions/advice")
async def promotion_advice(
    request: Request, session: SessionDep, params: Annotated[AdviceParams, Query()]
) -> Advice:
    """Adapters ranked by their share of shared-backend time over the window, each with the decision
    tree's verdict (promote with which quantization and the expected gain, keep, or demote). Traffic is
    summed across every gateway replica sharing Redis (one replica's own without Redis)."""
    meter: TrafficMeter = request.state.data_path.traffic
    window = await meter.window(params.window_s)
    facts = await service.adapter_facts(session, window.totals.keys())
    return advise(window, facts, params, datetime.now(UTC))


@router.get("/jobs")
async def list_jobs(session: SessionDep) -> Page[schemas.JobRead]:
    return Page(data=[schemas.JobRead.model_validate(j) for j in await service.list_jobs(session)])


@router.get("/jobs/{job}")
async def get_job(job: str, session: SessionDep) -> schemas.JobRead:
    return schemas.JobRead.model_validate(await service.get_job(session, job))


@router.post("/jobs/{job}/cancel", status_code=202)
async def cancel_job(job: str, session: SessionDep) -> schemas.JobRead:
    return schemas.JobRead.model_validate(await service.cancel_job(session, job))


@router.get("/jobs/{job}/artifacts")
async def list_artifacts(job: str, session: SessionDep, settings: SettingsDep) -> Page[schemas.ArtifactRead]:
    found = await service.get_job(session, job)
    return Page(
        data=[
            schemas.ArtifactRead(
                name=str(entry["name"]),
                kind=str(entry["kind"]),
                size_bytes=int(str(entry["size_bytes"])),
                sha256=str(entry["sha256"]),
                download=f"/admin/v1/jobs/{found.id}/artifacts/{entry['name']}",
            )
            for entry, _ in service.job_artifacts(found, artifact_root=settings.artifact_root)
        ]
    )


@router.get(
    "/jobs/{job}/artifacts/{name}",
    response_class=StreamingResponse,
    responses={200: {"content": {"application/x-tar": {}}, "description": "the artifact folder as a tar"}},
)
async def download_artifact(job: str, name: str, session: SessionDep, settings: SettingsDep) -> StreamingResponse:
    found = await service.get_job(session, job)
    entry, folder = service.find_artifact(found, name, artifact_root=settings.artifact_root)
    return StreamingResponse(
        _tar(folder, name),
        media_type="application/x-tar",
        headers={
            "Content-Disposition": f'attachment; filename="{name}.tar"',
            "X-Artifact-Sha256": str(entry["sha256"]),
        },
    )


def _tar(folder: Path, name: str) -> Iterator[bytes]:
    """The folder as an uncompressed tar, streamed file by file in 1 MiB blocks (never whole in memory;
    a sync iterator, so Starlette runs it off the event loop)."""
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        info = tarfile.TarInfo(f"{name}/{path.relative_to(folder)}")
        stat = path.stat()
        info.size, info.mtime, info.mode = stat.st_size, int(stat.st_mtime), 0o644
        yield info.tobuf(format=tarfile.PAX_FORMAT)
        with path.open("rb") as f:
            yield from iter(lambda: f.read(1 << 20), b"")
        if info.size % tarfile.BLOCKSIZE:
            yield b"\0" * (tarfile.BLOCKSIZE - info.size % tarfile.BLOCKSIZE)
    yield b"\0" * (2 * tarfile.BLOCKSIZE)


@router.get("/deployments")
async def list_deployments(session: SessionDep) -> Page[schemas.DeploymentRead]:
    return Page(data=[service.deployment_read(d) for d in await service.list_deployments(session)])


@router.get("/deployments/{deployment}")
async def get_deployment(deployment: str, session: SessionDep) -> schemas.DeploymentRead:
    return service.deployment_read(await service.get_deployment(session, deployment))


@router.delete("/deployments/{deployment}", status_code=202)
async def demote(deployment: str, session: SessionDep) -> schemas.JobRead:
    """Demotion: a job that moves the traffic back to the LoRA path, then stops the deployment."""
    return schemas.JobRead.model_validate(await service.demote(session, deployment))
