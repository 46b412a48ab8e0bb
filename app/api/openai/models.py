"""GET /v1/models: the calling tenant's adapters (latest versions)."""

from fastapi import APIRouter

from app.deps import SessionDep, TenantDep
from app.registry import adapters

router = APIRouter(tags=["openai"])


@router.get("/models")
async def list_models(tenant: TenantDep, session: SessionDep) -> dict[str, object]:
    rows = await adapters.list_adapters(session, tenant_ref=str(tenant.id))
    latest = {a.name: a for a in rows}  # rows are ordered by version, so the last one wins
    data = [
        {
            "id": a.name,
            "object": "model",
            "created": int(a.created_at.timestamp()),
            "owned_by": tenant.name,
            "root": a.base_model,
            "parent": a.base_model,
        }
        for a in latest.values()
    ]
    return {"object": "list", "data": data}
