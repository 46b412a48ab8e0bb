"""/readyz: ready only with the database answering and at least one healthy shared backend."""

from __future__ import annotations

import httpx

from tests.factories import registry


async def test_ready_needs_a_healthy_backend(admin: httpx.AsyncClient) -> None:
    resp = await admin.get("/readyz")
    assert resp.status_code == 503
    assert resp.json()["checks"] == {"database": "ok", "backends": "none of 0 healthy"}
    await registry.base_model(admin)
    await registry.backend(admin, "b1")
    resp = await admin.get("/readyz")
    assert resp.status_code == 200, resp.text
    assert resp.json() == {"status": "ready", "checks": {"database": "ok", "backends": "ok"}}
