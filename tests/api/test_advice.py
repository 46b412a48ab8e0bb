"""GET /admin/v1/promotions/advice after real requests through the gateway (scripted upstream): the
tokens it counts are the usage the backend reported, and its verdict follows the adapter's age."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import httpx
import pytest
from sqlalchemy import update
from sqlalchemy.ext.asyncio import AsyncEngine

from app.db.models import Adapter
from app.settings import Settings
from tests.api.test_proxy import chat


@pytest.fixture
def settings(settings: Settings) -> Settings:
    return settings.model_copy(update={"TRAFFIC_FLUSH_S": 0.05})


async def advice(admin: httpx.AsyncClient, **params: object) -> httpx.Response:
    return await admin.get("/admin/v1/promotions/advice", params={"min_requests": 3, **params})


async def test_advice_counts_what_the_backend_reported(
    admin: httpx.AsyncClient, client: httpx.AsyncClient, tenant_key: str, engine: AsyncEngine
) -> None:
    for _ in range(3):  # (chat() sends the tenant's key; `admin` is the same client with the admin key)
        assert (await chat(client, tenant_key)).status_code == 200  # usage 3 + 1
    for _ in range(2):  # streamed, usage 3 + 2, whether or not the client asked for it
        assert (await chat(client, tenant_key, stream=True)).status_code == 200
    await asyncio.sleep(0.3)  # a flush
    resp = await advice(admin)
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["object"] == "promotion.advice" and body["basis"]["merge_speedup_one_live_adapter"] == 1.3
    (row,) = body["data"]
    assert (row["tenant"], row["name"], row["requests"]) == ("acme", "support", 5)
    assert (row["prompt_tokens"], row["completion_tokens"]) == (15, 7)
    assert row["shared_time_share"] == 1.0 and row["promoted"] is False
    # Just uploaded: hot, but it may still change, so it stays swappable.
    assert row["action"] == "keep" and "uploaded within the window" in row["reasons"][0]

    async with engine.begin() as conn:
        await conn.execute(update(Adapter).values(created_at=datetime.now(UTC) - timedelta(days=3)))
    (row,) = (await advice(admin, window_s=300, min_active=0)).json()["data"]
    assert (row["action"], row["quantization"]) == ("promote", "awq")  # ~0 in flight: latency-bound
    assert row["expected_speedup"] > 1.3
    assert "lgw-" not in resp.text and "http://" not in resp.text  # no internal names or backend URLs


async def test_advice_parameters_are_checked(admin: httpx.AsyncClient, client: httpx.AsyncClient) -> None:
    resp = await admin.get("/admin/v1/promotions/advice", params={"window_s": 10})
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "window_s", resp.text
    client.headers.pop("Authorization", None)
    assert (await client.get("/admin/v1/promotions/advice")).status_code == 401
