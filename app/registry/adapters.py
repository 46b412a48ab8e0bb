"""Adapter registration: validate staged files against config and base model, then row + file together."""

from __future__ import annotations

import asyncio
import logging
import random
from pathlib import Path
from typing import BinaryIO

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from app.db.models import Adapter, AdapterState, BaseModel, Tenant
from app.errors import Conflict, InvalidRequest, NotFound
from app.registry import schemas, service
from app.store.files import AdapterStore, StagedAdapter
from app.store.validate import LoraConfig, ModuleFacts, check_weights, parse_config, read_tensor_shapes

log = logging.getLogger(__name__)

_VERSION_RETRIES = 8


def adapter_read(adapter: Adapter, *, tenant: str, base_model: str) -> schemas.AdapterRead:
    fields = {
        c: getattr(adapter, c) for c in schemas.AdapterRead.model_fields if c not in ("tenant", "base_model")
    }
    return schemas.AdapterRead.model_validate({**fields, "tenant": tenant, "base_model": base_model})


def _stage_and_parse(
    store: AdapterStore, folder: Path, files: list[tuple[str, BinaryIO]], max_bytes: int
) -> tuple[StagedAdapter, LoraConfig, dict[str, tuple[str, list[int]]]]:
    # Blocking file I/O and hashing: run in a worker thread, never on the event loop.
    staged = store.stage_files(folder, files, max_bytes=max_bytes)
    config = parse_config(staged.config_path.read_bytes())
    return staged, config, read_tensor_shapes(staged.weights_path)


async def _resolve_base_model(session: AsyncSession, config: LoraConfig, override: str | None) -> BaseModel:
    if override:
        return await service.get_base_model(session, override)
    if config.base_model_name_or_path is None:
        raise InvalidRequest(
            "adapter_config.json has no base_model_name_or_path; pass the base_model form field",
            param="base_model",
        )
    model = await service.find_base_model(session, config.base_model_name_or_path)
    if model is None:
        raise InvalidRequest(
            f"base model {config.base_model_name_or_path!r} (adapter_config.json base_model_name_or_path) "
            "is not registered; register it, add it as an alias, or pass the base_model form field",
            param="base_model",
        )
    return model


async def upload_adapter(
    session: AsyncSession,
    *,
    store: AdapterStore,
    tenant_ref: str,
    name: str,
    files: list[tuple[str, BinaryIO]],
    base_model: str | None,
    max_bytes: int,
    default_max_rank: int,
) -> schemas.AdapterRead:
    """Registers a new version of `name`; on any failure no file and no row is left behind."""
    tenant = await service.get_tenant(session, tenant_ref)
    if await service.find_base_model(session, name) is not None:
        # The tenant's adapters resolve before base models: it would shadow that model for them.
        raise Conflict(f"{name!r} is the name of a base model; choose another adapter name", param="name")
    with store.staging() as folder:
        staged, config, tensors = await asyncio.to_thread(_stage_and_parse, store, folder, files, max_bytes)
        model = await _resolve_base_model(session, config, base_model)
        max_rank = await service.max_lora_rank(session, base_model=model, default=default_max_rank)
        targets = check_weights(
            config, tensors, ModuleFacts(model.num_layers, model.module_shapes), max_rank=max_rank
        )
        tenant_name, model_name = (
            tenant.name,
            model.name,
        )  # a rollback in the insert's retry expires loaded objects
        # End the read transaction before the slow rename; the insert below opens a short one.
        await session.commit()
        storage_path, created = await asyncio.to_thread(store.publish, staged)
        try:
            adapter = await _insert_next_version(
                session,
                tenant=tenant,
                name=name,
                model=model,
                config=config,
                targets=targets,
                staged=staged,
                storage_path=storage_path,
            )
        except BaseException:
            if created and not await _referenced(session, storage_path):
                await asyncio.to_thread(store.remove, storage_path)
            raise
    result = adapter_read(adapter, tenant=tenant_name, base_model=model_name)
    log.info("adapter %s/%s v%d registered (%s)", result.tenant, name, result.version, staged.sha256[:12])
    return result


async def _insert_next_version(
    session: AsyncSession,
    *,
    tenant: Tenant,
    name: str,
    model: BaseModel,
    config: LoraConfig,
    targets: list[str],
    staged: StagedAdapter,
    storage_path: str,
) -> Adapter:
    # Two uploads of one name may race for the same version; the unique constraint decides, we retry.
    # A rollback expires loaded objects, so keep the plain ids.
    tenant_id, model_id = tenant.id, model.id
    for _ in range(_VERSION_RETRIES):
        last = (
            await session.execute(
                select(Adapter.version, Adapter.limits)
                .where(Adapter.tenant_id == tenant_id, Adapter.name == name)
                .order_by(Adapter.version.desc())
                .limit(1)
            )
        ).first()
        current, limits = (last[0], last[1]) if last is not None else (None, None)
        adapter = Adapter(
            tenant_id=tenant_id,
            name=name,
            version=(current or 0) + 1,
            base_model_id=model_id,
            rank=config.max_rank,
            alpha=config.alpha,
            target_modules=targets,
            sha256=staged.sha256,
            size_bytes=staged.size_bytes,
            storage_path=storage_path,
            limits=limits,  # the operator's limits on the adapter outlive its uploads
        )
        session.add(adapter)
        try:
            await session.commit()
        except IntegrityError:
            await session.rollback()
            taken = await session.scalar(
                select(func.count()).where(
                    Adapter.tenant_id == tenant_id, Adapter.name == name, Adapter.version == adapter.version
                )
            )
            if not taken:  # some other constraint (e.g. the tenant was deleted meanwhile): not ours to retry
                raise
            await asyncio.sleep(random.uniform(0.005, 0.05))  # de-synchronise the racers
            continue
        return adapter
    raise Conflict(f"adapter {name!r} is being uploaded concurrently; retry", param="name")


async def _referenced(session: AsyncSession, storage_path: str) -> bool:
    await session.rollback()
    return bool(await session.scalar(select(func.count()).where(Adapter.storage_path == storage_path)))


async def list_adapters(session: AsyncSession, *, tenant_ref: str) -> list[schemas.AdapterRead]:
    tenant = await service.get_tenant(session, tenant_ref)
    stmt = (
        select(Adapter, BaseModel)
        .join(BaseModel)
        .where(Adapter.tenant_id == tenant.id, Adapter.state != AdapterState.DELETED)
        .order_by(Adapter.name, Adapter.version)
    )
    rows = await session.execute(stmt)
    return [adapter_read(a, tenant=tenant.name, base_model=m.name) for a, m in rows]


async def _get(session: AsyncSession, adapter_id: str) -> tuple[Adapter, Tenant, BaseModel]:
    ident = service.parse_uuid(adapter_id)
    row = None
    if ident is not None:
        stmt = (
            select(Adapter, Tenant, BaseModel)
            .join(Tenant, Adapter.tenant_id == Tenant.id)
            .join(BaseModel, Adapter.base_model_id == BaseModel.id)
            .where(Adapter.id == ident, Adapter.state != AdapterState.DELETED)
        )
        row = (await session.execute(stmt)).first()
    if row is None:
        raise NotFound(f"adapter {adapter_id!r} not found", param="adapter")
    return row[0], row[1], row[2]


async def get_adapter(session: AsyncSession, *, adapter_id: str) -> schemas.AdapterRead:
    adapter, tenant, model = await _get(session, adapter_id)
    return adapter_read(adapter, tenant=tenant.name, base_model=model.name)


async def update_adapter(
    session: AsyncSession, *, adapter_id: str, data: schemas.AdapterUpdate
) -> schemas.AdapterRead:
    adapter, tenant, model = await _get(session, adapter_id)
    if data.state is AdapterState.DELETED:
        raise InvalidRequest("use DELETE to delete an adapter", param="state")
    for field, value in data.model_dump(exclude_unset=True, exclude_none=True).items():
        if field != "limits":
            setattr(adapter, field, value)
    if "limits" in data.model_fields_set:
        # The adapter's, whichever version a request names (`name@2` as much as `name`): every version.
        stored = service.stored_limits(data.limits)  # null removes them
        versions = await session.scalars(
            select(Adapter).where(Adapter.tenant_id == adapter.tenant_id, Adapter.name == adapter.name)
        )
        for version in versions:
            version.limits = stored
    await session.commit()
    return adapter_read(adapter, tenant=tenant.name, base_model=model.name)


async def delete_adapter(session: AsyncSession, *, adapter_id: str) -> None:
    # A soft delete: the row stops resolving at once, while its files stay until no backend may read them.
    adapter, _, _ = await _get(session, adapter_id)
    adapter.state = AdapterState.DELETED
    await session.commit()
