"""POST /v1/chat/completions and /v1/completions: forwarded to vLLM with the tenant's adapter.

At run time app.api.openai.fastpath answers these before FastAPI routes anything; these routes keep
them in the OpenAPI schema and serve any app built without the fast path."""

from fastapi import APIRouter, Request, Response

from app.api.openai import spec
from app.api.openai.fastpath import proxy

_ERRORS = spec.errors(400, 401, 404, 413, 429, 502, 503)

router = APIRouter(tags=["openai"])


@router.post("/chat/completions", openapi_extra=spec.request_body("/v1/chat/completions"), responses=_ERRORS)
async def chat_completions(request: Request) -> Response:
    return await proxy(request, request.state.data_path, "/v1/chat/completions")


@router.post("/completions", openapi_extra=spec.request_body("/v1/completions"), responses=_ERRORS)
async def completions(request: Request) -> Response:
    return await proxy(request, request.state.data_path, "/v1/completions")
