"""Tenants and their API keys."""

from fastapi import APIRouter, Response

from app.deps import SessionDep
from app.registry import schemas, service

router = APIRouter(tags=["tenants"])


@router.post("/tenants", status_code=201)
async def create_tenant(data: schemas.TenantCreate, session: SessionDep) -> schemas.TenantRead:
    return schemas.TenantRead.model_validate(await service.create_tenant(session, data=data))


@router.get("/tenants")
async def list_tenants(session: SessionDep) -> schemas.Page[schemas.TenantRead]:
    tenants = await service.list_tenants(session)
    return schemas.Page(data=[schemas.TenantRead.model_validate(t) for t in tenants])


@router.get("/tenants/{tenant}")
async def get_tenant(tenant: str, session: SessionDep) -> schemas.TenantRead:
    return schemas.TenantRead.model_validate(await service.get_tenant(session, tenant))


@router.patch("/tenants/{tenant}")
async def update_tenant(tenant: str, data: schemas.TenantUpdate, session: SessionDep) -> schemas.TenantRead:
    return schemas.TenantRead.model_validate(await service.update_tenant(session, ref=tenant, data=data))


@router.delete("/tenants/{tenant}", status_code=204)
async def delete_tenant(tenant: str, session: SessionDep) -> Response:
    await service.delete_tenant(session, ref=tenant)
    return Response(status_code=204)


@router.post("/tenants/{tenant}/api-keys", status_code=201)
async def create_api_key(
    tenant: str, session: SessionDep, data: schemas.ApiKeyCreate | None = None
) -> schemas.ApiKeyCreated:
    owner = await service.get_tenant(session, tenant)
    key, secret = await service.create_key(session, tenant=owner, name=data.name if data else None)
    return schemas.ApiKeyCreated.model_validate(
        {**schemas.ApiKeyRead.model_validate(key).model_dump(), "key": secret}
    )


@router.get("/tenants/{tenant}/api-keys")
async def list_api_keys(tenant: str, session: SessionDep) -> schemas.Page[schemas.ApiKeyRead]:
    owner = await service.get_tenant(session, tenant)
    keys = await service.list_keys(session, tenant=owner)
    return schemas.Page(data=[schemas.ApiKeyRead.model_validate(k) for k in keys])


@router.patch("/tenants/{tenant}/api-keys/{key_id}")
async def update_api_key(
    tenant: str, key_id: str, data: schemas.ApiKeyUpdate, session: SessionDep
) -> schemas.ApiKeyRead:
    owner = await service.get_tenant(session, tenant)
    return schemas.ApiKeyRead.model_validate(await service.update_key(session, tenant=owner, key_id=key_id, data=data))


@router.delete("/tenants/{tenant}/api-keys/{key_id}")
async def revoke_api_key(tenant: str, key_id: str, session: SessionDep) -> schemas.ApiKeyRead:
    owner = await service.get_tenant(session, tenant)
    return schemas.ApiKeyRead.model_validate(await service.revoke_key(session, tenant=owner, key_id=key_id))
