"""GET /v1/models: the calling tenant's adapters (latest versions) and the public base models."""

from fastapi import APIRouter, Request

from app.api.openai.proxy import DataPath

router = APIRouter(tags=["openai"])


@router.get("/models")
async def list_models(request: Request) -> dict[str, object]:
    data_path: DataPath = request.state.data_path
    tenant = await data_path.authenticate(request)
    adapters = await data_path.cache.tenant_adapters.get(tenant.id)
    bases = await data_path.cache.base_models.get("")
    data: list[dict[str, object]] = [
        {
            "id": a.name,
            "object": "model",
            "created": int(a.created_at),
            "owned_by": tenant.name,
            "root": a.base_model.name,
            "parent": a.base_model.name,
        }
        for a in adapters
    ]
    data += [
        {
            "id": b.name,
            "object": "model",
            "created": 0,
            "owned_by": "lora-gateway",
            "root": b.name,
            "parent": None,
        }
        for b in bases
        if b.public
    ]
    return {"object": "list", "data": data}
