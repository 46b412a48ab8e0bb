"""Postgres down under a running gateway (a private server this test stops and starts again): known
keys keep working from the cache, bounded by the staleness limit; unknown keys and admin calls get a
503 in the OpenAI envelope, never a 500; the first calls after Postgres returns succeed."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
from asgi_lifespan import LifespanManager

from app.main import create_app
from app.settings import Settings
from tests.conftest import ADMIN_KEY, _upgrade
from tests.fixtures.services import PrivatePostgres

TTL_S, MAX_STALE_S = 0.3, 4.0


@pytest.fixture
def pg() -> Iterator[PrivatePostgres]:
    server = PrivatePostgres()
    server.start()
    try:
        _upgrade(server.url)
        yield server
    finally:
        server.destroy()


@pytest.fixture
async def gateway(pg: PrivatePostgres, tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    settings = Settings(
        _env_file=None,  # type: ignore[call-arg]
        DATABASE_URL=pg.url,
        DATA_DIR=tmp_path / "data",
        ADMIN_API_KEY=ADMIN_KEY,
        CACHE_TTL_S=TTL_S,
        REGISTRY_MAX_STALE_S=MAX_STALE_S,
        DB_TIMEOUT_S=1.0,
    )
    app = create_app(settings)
    async with LifespanManager(app) as manager:
        transport = httpx.ASGITransport(app=manager.app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as c:
            yield c


def _is_503_envelope(resp: httpx.Response) -> bool:
    body = resp.json()
    return (
        resp.status_code == 503
        and body["error"]["type"] == "server_error"
        and "Retry-After" in resp.headers
        and "127.0.0.1" not in resp.text
    )


async def _key(gateway: httpx.AsyncClient, tenant: str) -> str:
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    assert (await gateway.post("/admin/v1/tenants", json={"name": tenant}, headers=admin)).status_code == 201
    resp = await gateway.post(f"/admin/v1/tenants/{tenant}/api-keys", json={}, headers=admin)
    assert resp.status_code == 201, resp.text
    return str(resp.json()["key"])


async def test_known_keys_are_served_from_cache_while_postgres_is_down(
    pg: PrivatePostgres, gateway: httpx.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    known, unknown = await _key(gateway, "acme"), await _key(gateway, "globex")
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    assert (await gateway.get("/v1/models", headers={"Authorization": f"Bearer {known}"})).status_code == 200
    pg.stop()
    await asyncio.sleep(TTL_S * 2)  # every cached answer is past its TTL now
    with caplog.at_level(logging.WARNING):
        statuses: list[int] = []
        t = time.monotonic()
        for _ in range(30):
            resp = await gateway.get("/v1/models", headers={"Authorization": f"Bearer {known}"})
            statuses.append(resp.status_code)
        took = time.monotonic() - t
        assert statuses == [200] * 30, statuses
        assert took < 3.0  # no request waits for the database (at most one short grace)
        resp = await gateway.get("/v1/models", headers={"Authorization": f"Bearer {unknown}"})
        assert _is_503_envelope(resp), resp.text  # never seen by this process: nothing to serve stale
        resp = await gateway.get("/admin/v1/tenants", headers=admin)
        assert _is_503_envelope(resp), resp.text
        for _ in range(20):
            assert (await gateway.get("/admin/v1/tenants", headers=admin)).status_code == 503
    outage_lines = [r for r in caplog.records if "unreachable" in r.getMessage()]
    assert 1 <= len(outage_lines) <= 4, [r.getMessage() for r in caplog.records]  # per outage, not request
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]

    # Past the staleness bound the known key is refused too (503, not served from an old answer).
    await asyncio.sleep(MAX_STALE_S)
    resp = await gateway.get("/v1/models", headers={"Authorization": f"Bearer {known}"})
    assert _is_503_envelope(resp), resp.text

    pg.start()
    deadline = time.monotonic() + 5  # the cache probes again at most 2 s after its last failure

    async def statuses_now() -> list[int]:
        return [(await gateway.get("/admin/v1/tenants", headers=admin)).status_code] + [
            (await gateway.get("/v1/models", headers={"Authorization": f"Bearer {key}"})).status_code
            for key in (known, unknown)
        ]

    while (now := await statuses_now()) != [200, 200, 200]:
        assert set(now) <= {200, 503}, now
        assert time.monotonic() < deadline, f"not recovered within 5 s of Postgres returning: {now}"
        await asyncio.sleep(0.1)
