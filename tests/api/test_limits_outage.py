"""Limits in Redis while Redis is down (a redis-server of the test's own, stopped and started again):
GATEWAY_LIMITS_REDIS_OUTAGE=closed answers a limited tenant's requests with a 503 within about the Redis
timeout, =open lets them through uncounted; a tenant without limits never touches the store either way,
and counting resumes when Redis is back."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from app.settings import Settings
from tests.conftest import ADMIN_KEY
from tests.factories import registry
from tests.fixtures.services import PrivateRedis

CHAT = "/v1/chat/completions"
BODY = {"model": "tiny-llama", "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture
def private_redis() -> Iterator[PrivateRedis]:
    server = PrivateRedis()
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(params=["closed", "open"])
def settings(request: pytest.FixtureRequest, db_url: str, data_dir: Path, private_redis: PrivateRedis) -> Settings:
    return Settings(
        _env_file=None,  # type: ignore[call-arg]
        DATABASE_URL=db_url,
        DATA_DIR=data_dir,
        ADMIN_API_KEY=ADMIN_KEY,
        REDIS_URL=private_redis.url,
        REDIS_TIMEOUT_S=0.5,
        LIMITS_REDIS_OUTAGE=request.param,
    )


async def test_limited_tenants_follow_the_configured_outage_mode(
    admin: httpx.AsyncClient, client: httpx.AsyncClient, tenant_key: str, settings: Settings, private_redis: PrivateRedis
) -> None:
    resp = await admin.patch("/admin/v1/tenants/acme", json={"limits": {"requests_per_minute": 100}})
    assert resp.status_code == 200
    await registry.tenant(admin, "free")
    free_key = (await registry.api_key(admin, "free"))["key"]
    limited = {"Authorization": f"Bearer {tenant_key}"}
    ok = await client.post(CHAT, json=BODY, headers=limited)
    assert ok.status_code == 200 and ok.headers["x-ratelimit-remaining-requests"] == "99"
    private_redis.stop()
    started = time.monotonic()
    during = await client.post(CHAT, json=BODY, headers=limited)
    took = time.monotonic() - started
    if settings.LIMITS_REDIS_OUTAGE == "closed":
        assert during.status_code == 503, during.text
        assert during.json()["error"]["type"] == "server_error"
    else:
        assert during.status_code == 200 and "x-ratelimit-remaining-requests" not in during.headers
    assert took < 2.0
    free = await client.post(CHAT, json=BODY, headers={"Authorization": f"Bearer {free_key}"})
    assert free.status_code == 200  # no limits: the store is never asked
    private_redis.start()  # back, empty (no persistence): counting starts afresh
    deadline = time.monotonic() + 5
    while True:
        after = await client.post(CHAT, json=BODY, headers=limited)
        if after.status_code == 200 or time.monotonic() > deadline:
            break
    assert after.status_code == 200 and after.headers["x-ratelimit-remaining-requests"] == "99"

async def test_shutdown_closes_the_hot_paths_own_redis_connections(
    admin: httpx.AsyncClient, client: httpx.AsyncClient, tenant_key: str, settings: Settings, private_redis: PrivateRedis
) -> None:
    """The residency touch and the limit admission keep Redis connections of their own
    (app/scriptcall.py); a gateway that shuts down closes them, and its client's pool."""
    from asgi_lifespan import LifespanManager
    from redis.asyncio import Redis

    from app.main import create_app

    assert (await admin.patch("/admin/v1/tenants/acme", json={"limits": {"concurrent_requests": 5}})).status_code == 200
    limited = {"Authorization": f"Bearer {tenant_key}"}
    assert (await client.post(CHAT, json=BODY, headers=limited)).status_code == 200
    counter = Redis.from_url(private_redis.url)
    try:
        before = len(await counter.client_list())
        second = create_app(settings)  # another gateway process on the same Redis
        async with LifespanManager(second) as manager:
            transport = httpx.ASGITransport(app=manager.app)
            async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as other:
                for _ in range(3):
                    assert (await other.post(CHAT, json=BODY, headers=limited)).status_code == 200
            during = len(await counter.client_list())
        assert during >= before + 2  # its touch and its admission, each on a connection of its own
        for _ in range(50):
            if len(await counter.client_list()) <= before:
                break
            await asyncio.sleep(0.02)  # the server sees the closes a moment later
        left = [(c["id"], c["cmd"]) for c in await counter.client_list()]
        assert len(left) <= before, f"connections left open after shutdown: {left}"
    finally:
        await counter.aclose()
