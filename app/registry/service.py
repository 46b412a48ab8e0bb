"""Tenants, API keys, base models and backends: the registry's write and read operations."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime

from sqlalchemy import func, or_, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from app import security
from app.db.models import Adapter, AdapterState, ApiKey, Backend, BackendKind, BaseModel, Tenant
from app.errors import Conflict, InvalidRequest, NotFound
from app.registry import schemas
from app.registry.base_models import ArchitectureFacts, facts_from_path


def parse_uuid(ref: str) -> uuid.UUID | None:
    try:
        return uuid.UUID(ref)
    except ValueError:
        return None


async def _commit_unique(session: AsyncSession, what: str) -> None:
    try:
        await session.commit()
    except IntegrityError as exc:
        await session.rollback()
        raise Conflict(f"{what} already exists") from exc


# --- tenants ---------------------------------------------------------------------------------------------


async def get_tenant(session: AsyncSession, ref: str) -> Tenant:
    """By name, or by id."""
    ident = parse_uuid(ref)
    cond = Tenant.id == ident if ident is not None else Tenant.name == ref
    tenant = await session.scalar(select(Tenant).where(cond))
    if tenant is None:
        raise NotFound(f"tenant {ref!r} not found", param="tenant")
    return tenant


async def list_tenants(session: AsyncSession) -> list[Tenant]:
    return list(await session.scalars(select(Tenant).order_by(Tenant.name)))


async def create_tenant(session: AsyncSession, *, data: schemas.TenantCreate) -> Tenant:
    tenant = Tenant(
        name=data.name,
        display_name=data.display_name,
        max_adapters_per_backend=data.max_adapters_per_backend,
        limits=stored_limits(data.limits),
    )
    session.add(tenant)
    await _commit_unique(session, f"tenant {data.name!r}")
    return tenant


async def update_tenant(session: AsyncSession, *, ref: str, data: schemas.TenantUpdate) -> Tenant:
    tenant = await get_tenant(session, ref)
    for field, value in data.model_dump(exclude_unset=True).items():
        setattr(tenant, field, stored_limits(data.limits) if field == "limits" else value)
    await session.commit()
    return tenant


def stored_limits(limits: schemas.LimitsIn | None) -> dict[str, int] | None:
    """As stored: only the limits that are set; None when none is."""
    if limits is None:
        return None
    return limits.model_dump(exclude_none=True) or None


async def delete_tenant(session: AsyncSession, *, ref: str) -> None:
    # Keys and adapter rows go with the tenant (ON DELETE CASCADE); adapter files stay in the store
    # until no backend can read them any more.
    tenant = await get_tenant(session, ref)
    await session.delete(tenant)
    await session.commit()


# --- API keys --------------------------------------------------------------------------------------------


async def list_keys(session: AsyncSession, *, tenant: Tenant) -> list[ApiKey]:
    stmt = select(ApiKey).where(ApiKey.tenant_id == tenant.id).order_by(ApiKey.created_at)
    return list(await session.scalars(stmt))


async def create_key(session: AsyncSession, *, tenant: Tenant, name: str | None) -> tuple[ApiKey, str]:
    """Returns the row and the secret; the secret is not kept anywhere."""
    secret = security.generate_api_key()
    key = ApiKey(
        tenant_id=tenant.id,
        name=name,
        prefix=security.visible_prefix(secret),
        key_hash=security.hash_api_key(secret),
    )
    session.add(key)
    await session.commit()
    return key, secret


async def get_key(session: AsyncSession, *, tenant: Tenant, key_id: str) -> ApiKey:
    ident = parse_uuid(key_id)
    key = None
    if ident is not None:
        key = await session.scalar(select(ApiKey).where(ApiKey.id == ident, ApiKey.tenant_id == tenant.id))
    if key is None:
        raise NotFound(f"API key {key_id!r} not found for tenant {tenant.name!r}", param="key_id")
    return key


async def update_key(session: AsyncSession, *, tenant: Tenant, key_id: str, data: schemas.ApiKeyUpdate) -> ApiKey:
    key = await get_key(session, tenant=tenant, key_id=key_id)
    for field, value in data.model_dump(exclude_unset=True).items():
        setattr(key, field, stored_limits(data.limits) if field == "limits" else value)
    await session.commit()
    return key


async def revoke_key(session: AsyncSession, *, tenant: Tenant, key_id: str) -> ApiKey:
    key = await get_key(session, tenant=tenant, key_id=key_id)
    if key.revoked_at is None:
        key.revoked_at = datetime.now(UTC)
        await session.commit()
    return key


# --- base models -----------------------------------------------------------------------------------------


async def get_base_model(session: AsyncSession, ref: str) -> BaseModel:
    ident = parse_uuid(ref)
    cond = BaseModel.id == ident if ident is not None else BaseModel.name == ref
    model = await session.scalar(select(BaseModel).where(cond))
    if model is None:
        raise NotFound(f"base model {ref!r} not found", param="base_model")
    return model


async def find_base_model(session: AsyncSession, name_or_path: str) -> BaseModel | None:
    """Matches an adapter's base_model_name_or_path against names, paths and aliases."""
    stmt = select(BaseModel).where(or_(BaseModel.name == name_or_path, BaseModel.path == name_or_path))
    found = await session.scalar(stmt)
    if found is not None:
        return found
    # Aliases live in a JSON list; the table is small (a handful of base models), so filter here.
    for model in await session.scalars(select(BaseModel)):
        if name_or_path in model.aliases:
            return model
    return None


async def list_base_models(session: AsyncSession) -> list[BaseModel]:
    return list(await session.scalars(select(BaseModel).order_by(BaseModel.name)))


async def create_base_model(session: AsyncSession, *, data: schemas.BaseModelCreate) -> BaseModel:
    if data.hidden_size and data.num_layers and data.module_shapes:
        facts = ArchitectureFacts(data.architecture, data.hidden_size, data.num_layers, data.module_shapes)
    elif data.hidden_size or data.num_layers or data.module_shapes:
        raise InvalidRequest(
            "give all of hidden_size, num_layers and module_shapes, or none to read them from config.json",
            param="module_shapes",
        )
    else:
        facts = await asyncio.to_thread(facts_from_path, data.path)
    model = BaseModel(
        name=data.name,
        path=data.path,
        aliases=list(dict.fromkeys(data.aliases)),
        architecture=data.architecture or facts.architecture,
        hidden_size=facts.hidden_size,
        num_layers=facts.num_layers,
        module_shapes=facts.module_shapes,
        public=data.public,
    )
    session.add(model)
    await _commit_unique(session, f"base model {data.name!r}")
    return model


async def delete_base_model(session: AsyncSession, *, ref: str) -> None:
    model = await get_base_model(session, ref)
    backends = await session.scalar(select(func.count()).where(Backend.base_model_id == model.id))
    adapters = await session.scalar(
        select(func.count()).where(Adapter.base_model_id == model.id, Adapter.state != AdapterState.DELETED)
    )
    if backends or adapters:
        raise Conflict(
            f"base model {model.name!r} still has {backends} backend(s) and {adapters} adapter(s)",
            param="base_model",
        )
    await session.delete(model)
    await _commit_unique(session, "a reference to this base model")


async def max_lora_rank(session: AsyncSession, *, base_model: BaseModel, default: int) -> int:
    """The rank every shared backend of this base model accepts (vLLM fails a load above it)."""
    stmt = select(func.min(Backend.max_lora_rank)).where(
        Backend.base_model_id == base_model.id, Backend.kind == BackendKind.SHARED
    )
    return (await session.scalar(stmt)) or default


# --- backends --------------------------------------------------------------------------------------------


def backend_read(backend: Backend, base_model: BaseModel) -> schemas.BackendRead:
    return schemas.BackendRead.model_validate(
        {
            **{
                c: getattr(backend, c)
                for c in schemas.BackendRead.model_fields
                if c not in ("base_model", "api_key_set")
            },
            "base_model": base_model.name,
            "api_key_set": bool(backend.api_key),
        }
    )


async def get_backend(session: AsyncSession, ref: str) -> tuple[Backend, BaseModel]:
    ident = parse_uuid(ref)
    cond = Backend.id == ident if ident is not None else Backend.name == ref
    row = (await session.execute(select(Backend, BaseModel).join(BaseModel).where(cond))).first()
    if row is None:
        raise NotFound(f"backend {ref!r} not found", param="backend")
    return row[0], row[1]


async def list_backends(session: AsyncSession) -> list[tuple[Backend, BaseModel]]:
    rows = await session.execute(select(Backend, BaseModel).join(BaseModel).order_by(Backend.name))
    return [(b, m) for b, m in rows]


async def create_backend(session: AsyncSession, *, data: schemas.BackendCreate) -> tuple[Backend, BaseModel]:
    model = await get_base_model(session, data.base_model)
    backend = Backend(
        name=data.name,
        url=str(data.url).rstrip("/"),
        base_model_id=model.id,
        gpu_slots=data.gpu_slots,
        max_lora_rank=data.max_lora_rank,
        capacity=data.capacity or data.gpu_slots,
        max_num_seqs=data.max_num_seqs,
        kind=data.kind,
        api_key=data.api_key.get_secret_value() if data.api_key else None,
    )
    session.add(backend)
    await _commit_unique(session, f"backend named {data.name!r} or at {backend.url!r}")
    return backend, model


async def update_backend(
    session: AsyncSession, *, ref: str, data: schemas.BackendUpdate
) -> tuple[Backend, BaseModel]:
    backend, model = await get_backend(session, ref)
    for field, value in data.model_dump(exclude_unset=True).items():
        if field == "api_key":
            if value is not None:
                backend.api_key = value.get_secret_value() or None  # "" clears it
        elif value is not None or field == "max_num_seqs":  # the one field null clears
            setattr(backend, field, value)
    if backend.capacity < backend.gpu_slots:
        raise InvalidRequest("capacity must be >= gpu_slots", param="capacity")
    await session.commit()
    return backend, model


async def delete_backend(session: AsyncSession, *, ref: str) -> None:
    backend, _ = await get_backend(session, ref)
    await session.delete(backend)
    await session.commit()
