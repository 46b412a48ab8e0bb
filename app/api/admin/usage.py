"""A tenant's metered usage: requests and tokens per hour, model (adapter) and API key, as JSON or CSV."""

from __future__ import annotations

import csv
import io
import logging
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, Response
from sqlalchemy import func, select

from app.db.models import ApiKey, UsageHour
from app.deps import SessionDep
from app.errors import InvalidRequest
from app.registry import service

router = APIRouter(tags=["usage"])
log = logging.getLogger(__name__)

GROUPS = {"adapter": UsageHour.model, "key": UsageHour.api_key_id, "hour": UsageHour.hour}
MAX_RANGE = timedelta(days=400)


def _when(value: datetime | None, default: datetime, name: str) -> datetime:
    if value is None:
        return default
    if value.tzinfo is None:
        raise InvalidRequest(f"'{name}' needs a time zone (e.g. 2026-12-01T00:00:00Z)", param=name)
    return value.astimezone(UTC)


@router.get("/tenants/{tenant}/usage")
async def tenant_usage(
    tenant: str,
    request: Request,
    session: SessionDep,
    from_: Annotated[datetime | None, Query(alias="from", description="start (ISO 8601): from its hour")] = None,
    to: Annotated[datetime | None, Query(description="end (ISO 8601): hours starting before it; default now")] = None,
    group_by: Annotated[str, Query(description="comma-separated: adapter, key, hour")] = "adapter",
    format: Annotated[str, Query(pattern="^(json|csv)$")] = "json",
) -> Any:
    """Requests and prompt/completion tokens from the backends' usage reports, summed per group. This
    replica's unwritten usage is written first; other replicas' arrives within GATEWAY_USAGE_FLUSH_S."""
    owner = await service.get_tenant(session, tenant)
    now = datetime.now(UTC)
    end = _when(to, now, "to")
    start = _when(from_, end - timedelta(days=30), "from")
    if start >= end:
        raise InvalidRequest("'from' must be before 'to'", param="from")
    if end - start > MAX_RANGE:
        raise InvalidRequest("the range may span at most 400 days", param="from")
    groups = [g.strip() for g in group_by.split(",") if g.strip()]
    unknown = [g for g in groups if g not in GROUPS]
    if unknown or not groups:
        raise InvalidRequest("group_by takes adapter, key and hour (comma-separated)", param="group_by")
    meter = request.state.data_path.meter
    if meter is not None:
        try:
            await meter.flush()
        except Exception:  # the database answers with what it has; the sums are kept for the next flush
            log.warning("usage not written before the usage query", exc_info=True)
    columns = [GROUPS[g].label(g) for g in dict.fromkeys(groups)]
    sums = [
        func.sum(UsageHour.requests).label("requests"),
        func.sum(UsageHour.prompt_tokens).label("prompt_tokens"),
        func.sum(UsageHour.completion_tokens).label("completion_tokens"),
    ]
    hour_start = start.replace(minute=0, second=0, microsecond=0)
    stmt = (
        select(*columns, *sums)
        .where(UsageHour.tenant_id == owner.id, UsageHour.hour >= hour_start, UsageHour.hour < end)
        .group_by(*columns)
        .order_by(*columns)
    )
    rows = [dict(r._mapping) for r in await session.execute(stmt)]
    if "key" in groups:
        keys = {k.id: k for k in await session.scalars(select(ApiKey).where(ApiKey.tenant_id == owner.id))}
        for r in rows:
            key = keys.get(r["key"])
            r["key_name"], r["key_prefix"] = (key.name, key.prefix) if key is not None else (None, None)
    for r in rows:
        r["total_tokens"] = int(r["prompt_tokens"] or 0) + int(r["completion_tokens"] or 0)
        for k in ("requests", "prompt_tokens", "completion_tokens"):
            r[k] = int(r[k] or 0)
        if isinstance(r.get("hour"), datetime):
            r["hour"] = r["hour"].astimezone(UTC).isoformat().replace("+00:00", "Z")
        if "key" in r:
            r["key"] = str(r["key"])
    totals = {k: sum(r[k] for r in rows) for k in ("requests", "prompt_tokens", "completion_tokens", "total_tokens")}
    if format == "csv":
        out = io.StringIO()
        fields = [*dict.fromkeys(groups), *(["key_name", "key_prefix"] if "key" in groups else []), *totals]
        writer = csv.DictWriter(out, fieldnames=fields, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        name = f"usage-{owner.name}-{start:%Y%m%dT%H}-{end:%Y%m%dT%H}.csv"
        return Response(
            out.getvalue(),
            media_type="text/csv; charset=utf-8",
            headers={"Content-Disposition": f'attachment; filename="{name}"'},
        )
    return {
        "object": "usage",
        "tenant": owner.name,
        "from": hour_start.isoformat().replace("+00:00", "Z"),  # usage is kept by the hour
        "to": end.isoformat().replace("+00:00", "Z"),
        "group_by": list(dict.fromkeys(groups)),
        "data": rows,
        "totals": totals,
    }
