"""Adapter uploads (multipart: the two peft files, or one .tar.gz/.zip) and adapter lookups."""

from __future__ import annotations

from typing import Any, BinaryIO

from fastapi import APIRouter, Request, Response
from pydantic import TypeAdapter, ValidationError
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException
from starlette.types import Message, Receive

from app.deps import SessionDep, SettingsDep, StoreDep
from app.errors import InvalidRequest, PayloadTooLarge
from app.registry import adapters, schemas

router = APIRouter(tags=["adapters"])

_NAME = TypeAdapter(schemas.AdapterName)
# Multipart framing and the small form fields on top of the files themselves.
_FORM_OVERHEAD = 1 << 20
_UPLOAD_SCHEMA: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["name", "file"],
                    "properties": {
                        "name": {
                            "type": "string",
                            "description": "Adapter name (a new upload = new version)",
                        },
                        "base_model": {"type": "string", "description": "Overrides base_model_name_or_path"},
                        "file": {
                            "type": "array",
                            "items": {"type": "string", "format": "binary"},
                            "description": "adapter_config.json + adapter_model.safetensors, or one archive",
                        },
                    },
                }
            }
        },
    }
}


def _limited(receive: Receive, limit: int) -> Receive:
    """Counts body bytes as they arrive, so an oversized upload stops before it is buffered."""
    seen = 0

    async def wrapped() -> Message:
        nonlocal seen
        message = await receive()
        if message["type"] == "http.request":
            seen += len(message.get("body", b""))
            if seen > limit:
                raise PayloadTooLarge(f"upload exceeds the {limit} byte limit")
        return message

    return wrapped


@router.post("/tenants/{tenant}/adapters", status_code=201, openapi_extra=_UPLOAD_SCHEMA)
async def upload_adapter(
    tenant: str, request: Request, session: SessionDep, store: StoreDep, settings: SettingsDep
) -> schemas.AdapterRead:
    limit = settings.MAX_ADAPTER_BYTES + _FORM_OVERHEAD
    length = request.headers.get("content-length")
    if length is not None and length.isascii() and length.isdigit() and int(length) > limit:
        raise PayloadTooLarge(f"upload of {length} bytes exceeds the {limit} byte limit")
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise InvalidRequest("send multipart/form-data with fields name and file", param="file")
    limited = Request(request.scope, _limited(request.receive, limit))
    try:
        async with limited.form(max_files=4, max_fields=8) as form:
            name = form.get("name")
            base_model = form.get("base_model")
            uploads = [f for f in form.getlist("file") if isinstance(f, UploadFile)]
            if not isinstance(name, str):
                raise InvalidRequest("form field 'name' is required", param="name")
            try:
                name = _NAME.validate_python(name)
            except ValidationError as exc:
                raise InvalidRequest(
                    "adapter name must be 1-128 letters, digits, '.', '_' or '-', starting and ending "
                    "with a letter or digit",
                    param="name",
                ) from exc
            if not uploads:
                raise InvalidRequest("form field 'file' is required (one or more files)", param="file")
            files: list[tuple[str, BinaryIO]] = [(u.filename or "", u.file) for u in uploads]
            return await adapters.upload_adapter(
                session,
                store=store,
                tenant_ref=tenant,
                name=name,
                files=files,
                base_model=base_model if isinstance(base_model, str) and base_model else None,
                max_bytes=settings.MAX_ADAPTER_BYTES,
                default_max_rank=settings.DEFAULT_MAX_LORA_RANK,
            )
    except MultiPartException as exc:
        raise InvalidRequest(f"malformed multipart body: {exc.message}", param="file") from exc


@router.get("/tenants/{tenant}/adapters")
async def list_adapters(tenant: str, session: SessionDep) -> schemas.Page[schemas.AdapterRead]:
    return schemas.Page(data=await adapters.list_adapters(session, tenant_ref=tenant))


@router.get("/adapters/{adapter_id}")
async def get_adapter(adapter_id: str, session: SessionDep) -> schemas.AdapterRead:
    return await adapters.get_adapter(session, adapter_id=adapter_id)


@router.patch("/adapters/{adapter_id}")
async def update_adapter(
    adapter_id: str, data: schemas.AdapterUpdate, session: SessionDep
) -> schemas.AdapterRead:
    return await adapters.update_adapter(session, adapter_id=adapter_id, data=data)


@router.delete("/adapters/{adapter_id}", status_code=204)
async def delete_adapter(adapter_id: str, session: SessionDep) -> Response:
    await adapters.delete_adapter(session, adapter_id=adapter_id)
    return Response(status_code=204)
