"""POST /v1/chat/completions and /v1/completions: forwarded to vLLM with the tenant's adapter."""

from fastapi import APIRouter, Request, Response

from app.api.openai.proxy import ClientGone, DataPath

router = APIRouter(tags=["openai"])


async def _proxy(request: Request, route: str) -> Response:
    data_path: DataPath = request.state.data_path
    try:
        return await data_path.handle(request, route)
    except ClientGone:
        return Response(status_code=499)  # nobody reads it; ends the request without an error log


@router.post("/chat/completions")
async def chat_completions(request: Request) -> Response:
    return await _proxy(request, "/v1/chat/completions")


@router.post("/completions")
async def completions(request: Request) -> Response:
    return await _proxy(request, "/v1/completions")
