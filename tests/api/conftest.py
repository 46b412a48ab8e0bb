"""Fixtures of the data-path tests: the scripted upstream (for faults vLLM cannot be made to produce,
and to read what the gateway forwarded) registered as a backend, with a tenant, an adapter and a key."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest

from tests.factories import registry
from tests.factories.adapters import TINY_BASE, adapter_files, multipart
from tests.fixtures.faulty_upstream import Script, serve


@pytest.fixture
def script() -> Script:
    return Script()


@pytest.fixture
async def upstream(script: Script) -> AsyncIterator[str]:
    async for url in serve(script, TINY_BASE):
        yield url


@pytest.fixture
async def tenant_key(admin: httpx.AsyncClient, upstream: str) -> str:
    await registry.tenant(admin)
    await registry.base_model(admin)
    resp = await admin.post(
        "/admin/v1/backends",
        json={
            "name": "up",
            "url": upstream,
            "base_model": TINY_BASE,
            "gpu_slots": 4,
            "max_lora_rank": 16,
        },
    )
    assert resp.status_code == 201, resp.text
    up = await admin.post(
        "/admin/v1/tenants/acme/adapters", data={"name": "support"}, files=multipart(adapter_files())
    )
    assert up.status_code == 201, up.text
    return str((await registry.api_key(admin))["key"])
