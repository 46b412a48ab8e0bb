"""GET /v1/models: the calling tenant's adapters (latest versions) and the public base models;
GET /v1/models/{model}: one of them, as OpenAI's `models.retrieve` expects."""

from fastapi import APIRouter, Request

from app.api.openai import spec
from app.api.openai.proxy import DataPath
from app.registry.snapshots import AdapterView, BaseModelView, TenantView
from app.routing.resolve import resolve

router = APIRouter(tags=["openai"])


def _adapter(a: AdapterView, tenant: TenantView, shown: str | None = None) -> dict[str, object]:
    return {
        "id": shown or a.name,
        "object": "model",
        "created": int(a.created_at),
        "owned_by": tenant.name,
        "root": a.base_model.name,
        "parent": a.base_model.name,
    }


def _base(b: BaseModelView, shown: str | None = None) -> dict[str, object]:
    return {
        "id": shown or b.name,
        "object": "model",
        "created": 0,
        "owned_by": "lora-gateway",
        "root": b.name,
        "parent": None,
    }


@router.get("/models", openapi_extra=spec.TENANT_KEY, responses=spec.errors(401, 503))
async def list_models(request: Request) -> dict[str, object]:
    data_path: DataPath = request.state.data_path
    tenant = await data_path.authenticate(request)
    adapters = await data_path.cache.tenant_adapters.get(tenant.id)
    bases = await data_path.cache.base_models.get("")
    data = [_adapter(a, tenant) for a in adapters] + [_base(b) for b in bases if b.public]
    return {"object": "list", "data": data}


@router.get("/models/{model:path}", openapi_extra=spec.TENANT_KEY, responses=spec.errors(400, 401, 404, 503))
async def retrieve_model(model: str, request: Request) -> dict[str, object]:
    """The name as a request's `model` would take it (NAME or NAME@VERSION of the tenant's adapter, or
    a public base model); 404 in the same words whether it is unknown or another tenant's."""
    data_path: DataPath = request.state.data_path
    tenant = await data_path.authenticate(request)
    target = await resolve(data_path.cache, tenant, model, None)
    if target.adapter is not None:
        return _adapter(target.adapter, tenant, model)
    return _base(target.base_model, model)
