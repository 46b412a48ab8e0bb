"""GET /metrics: the gateway's Prometheus series (app.metrics). Its labels name tenants and adapters, so
it asks for a bearer token: GATEWAY_METRICS_TOKEN, or the admin key when none is set (Prometheus sends
it with `authorization: {credentials_file: ...}` in its scrape config). Kept out of the public OpenAPI."""

from fastapi import APIRouter, Request, Response

from app.deps import require_bearer
from app.metrics import CONTENT_TYPE
from app.settings import Settings

router = APIRouter(include_in_schema=False)


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    settings: Settings = request.state.settings
    require_bearer(
        request,
        settings.METRICS_TOKEN or settings.ADMIN_API_KEY,
        "/metrics needs the metrics token (Authorization: Bearer <GATEWAY_METRICS_TOKEN>)",
    )
    return Response(request.state.data_path.metrics.scrape(), media_type=CONTENT_TYPE)
