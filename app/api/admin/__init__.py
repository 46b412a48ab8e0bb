"""Admin REST API under /admin/v1: every route needs the admin key. The public OpenAPI document
(/openapi.json, /docs) does not list it; its own document is /admin/v1/openapi.json, behind the key."""

import functools
from typing import Any

from fastapi import APIRouter, FastAPI

from app.api.admin import adapters, backends, base_models, promotions, tenants, usage
from app.api.openai.spec import document_errors
from app.deps import AdminDep, AdminWriteDep

MODULES = (tenants, base_models, backends, adapters, promotions, usage)
router = APIRouter(prefix="/admin/v1", dependencies=[AdminDep, AdminWriteDep], include_in_schema=False)
for module in MODULES:
    router.include_router(module.router)


@functools.cache
def _spec() -> dict[str, Any]:
    # The same routers, listed in a document of their own (never served to anyone without the key).
    listed = FastAPI(title="LoRA Gateway admin API", version="0.1.0")
    for module in MODULES:
        listed.include_router(module.router, prefix="/admin/v1")
    return document_errors(listed.openapi())


@router.get("/openapi.json")
async def admin_openapi() -> dict[str, Any]:
    return _spec()
