"""vLLM backends: where adapters of a base model can be loaded."""

from fastapi import APIRouter, Response

from app.deps import SessionDep
from app.registry import schemas, service

router = APIRouter(tags=["backends"])


@router.post("/backends", status_code=201)
async def create_backend(data: schemas.BackendCreate, session: SessionDep) -> schemas.BackendRead:
    return service.backend_read(*await service.create_backend(session, data=data))


@router.get("/backends")
async def list_backends(session: SessionDep) -> schemas.Page[schemas.BackendRead]:
    return schemas.Page(data=[service.backend_read(b, m) for b, m in await service.list_backends(session)])


@router.get("/backends/{backend}")
async def get_backend(backend: str, session: SessionDep) -> schemas.BackendRead:
    return service.backend_read(*await service.get_backend(session, backend))


@router.patch("/backends/{backend}")
async def update_backend(
    backend: str, data: schemas.BackendUpdate, session: SessionDep
) -> schemas.BackendRead:
    return service.backend_read(*await service.update_backend(session, ref=backend, data=data))


@router.delete("/backends/{backend}", status_code=204)
async def delete_backend(backend: str, session: SessionDep) -> Response:
    await service.delete_backend(session, ref=backend)
    return Response(status_code=204)
