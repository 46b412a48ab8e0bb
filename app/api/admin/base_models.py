"""Base models: what backends serve and what adapters are checked against."""

from fastapi import APIRouter, Response

from app.deps import SessionDep
from app.registry import schemas, service

router = APIRouter(tags=["base models"])


@router.post("/base-models", status_code=201)
async def create_base_model(data: schemas.BaseModelCreate, session: SessionDep) -> schemas.BaseModelRead:
    return schemas.BaseModelRead.model_validate(await service.create_base_model(session, data=data))


@router.get("/base-models")
async def list_base_models(session: SessionDep) -> schemas.Page[schemas.BaseModelRead]:
    models = await service.list_base_models(session)
    return schemas.Page(data=[schemas.BaseModelRead.model_validate(m) for m in models])


@router.get("/base-models/{base_model:path}")
async def get_base_model(base_model: str, session: SessionDep) -> schemas.BaseModelRead:
    return schemas.BaseModelRead.model_validate(await service.get_base_model(session, base_model))


@router.delete("/base-models/{base_model:path}", status_code=204)
async def delete_base_model(base_model: str, session: SessionDep) -> Response:
    await service.delete_base_model(session, ref=base_model)
    return Response(status_code=204)
