"""Admin REST API under /admin/v1: every route needs the admin key."""

from fastapi import APIRouter

from app.api.admin import adapters, backends, base_models, tenants
from app.deps import AdminDep, AdminWriteDep

router = APIRouter(prefix="/admin/v1", dependencies=[AdminDep, AdminWriteDep])
for module in (tenants, base_models, backends, adapters):
    router.include_router(module.router)
