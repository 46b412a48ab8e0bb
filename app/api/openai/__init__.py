"""OpenAI-compatible public API under /v1 (tenant keys)."""

from fastapi import APIRouter

from app.api.openai import completions, models

router = APIRouter(prefix="/v1")
router.include_router(models.router)
router.include_router(completions.router)
