"""The public OpenAPI document (/openapi.json, /docs) shows the tenant API only; the admin API's own
document is served under /admin/v1 to the admin key."""

from __future__ import annotations

import httpx

from tests.api.test_tenants import assert_envelope


async def test_public_spec_does_not_advertise_the_admin_api(client: httpx.AsyncClient) -> None:
    spec = (await client.get("/openapi.json")).json()
    assert "/v1/models" in spec["paths"]
    assert not [p for p in spec["paths"] if p.startswith("/admin")]


async def test_admin_spec_needs_the_admin_key(client: httpx.AsyncClient, admin: httpx.AsyncClient) -> None:
    token = admin.headers.pop("Authorization")
    assert_envelope(await client.get("/admin/v1/openapi.json"), 401)
    admin.headers["Authorization"] = token
    spec = (await admin.get("/admin/v1/openapi.json")).json()
    assert "/admin/v1/tenants" in spec["paths"] and "/admin/v1/backends/{backend}" in spec["paths"]
    assert not [p for p in spec["paths"] if not p.startswith("/admin/v1/")]
    assert "api_key" in spec["components"]["schemas"]["BackendCreate"]["properties"]
    assert "api_key" not in spec["components"]["schemas"]["BackendRead"]["properties"]
