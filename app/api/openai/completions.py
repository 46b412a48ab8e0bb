"""POST /v1/chat/completions and /v1/completions: forwarded to vLLM with the tenant's adapter.

At run time app.api.openai.fastpath answers these before FastAPI routes anything; these routes keep
them in the OpenAPI schema and serve any app built without the fast path."""

from fastapi import APIRouter, Request, Response

from app.api.openai.fastpath import proxy

router = APIRouter(tags=["openai"])


@router.post("/chat/completions")
async def chat_completions(request: Request) -> Response:
    return await proxy(request, request.state.data_path, "/v1/chat/completions")


@router.post("/completions")
async def completions(request: Request) -> Response:
    return await proxy(request, request.state.data_path, "/v1/completions")
