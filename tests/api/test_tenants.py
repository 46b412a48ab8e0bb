"""Admin API: tenants and API keys."""

from __future__ import annotations

import hashlib

import httpx
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from tests.factories import registry


def assert_envelope(resp: httpx.Response, status: int, code: str | None = None) -> dict[str, object]:
    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"]
    if code is not None:
        assert error["code"] == code
    # Every error names its request, as the x-request-id header does; returned without that suffix.
    rid = resp.headers["x-request-id"]
    suffix = f" (request id: {rid})"
    assert str(error["message"]).endswith(suffix), error["message"]
    return {**error, "message": str(error["message"])[: -len(suffix)]}


ADMIN_ROUTES = [
    ("GET", "/admin/v1/tenants"),
    ("POST", "/admin/v1/tenants"),
    ("GET", "/admin/v1/tenants/acme"),
    ("DELETE", "/admin/v1/tenants/acme"),
    ("PATCH", "/admin/v1/tenants/acme"),
    ("POST", "/admin/v1/tenants/acme/api-keys"),
    ("GET", "/admin/v1/tenants/acme/api-keys"),
    ("DELETE", "/admin/v1/tenants/acme/api-keys/00000000-0000-0000-0000-000000000000"),
    ("GET", "/admin/v1/base-models"),
    ("POST", "/admin/v1/base-models"),
    ("GET", "/admin/v1/base-models/tiny"),
    ("DELETE", "/admin/v1/base-models/tiny"),
    ("GET", "/admin/v1/backends"),
    ("POST", "/admin/v1/backends"),
    ("GET", "/admin/v1/backends/b1"),
    ("PATCH", "/admin/v1/backends/b1"),
    ("DELETE", "/admin/v1/backends/b1"),
    ("POST", "/admin/v1/tenants/acme/adapters"),
    ("GET", "/admin/v1/tenants/acme/adapters"),
    ("GET", "/admin/v1/adapters/00000000-0000-0000-0000-000000000000"),
    ("DELETE", "/admin/v1/adapters/00000000-0000-0000-0000-000000000000"),
    ("PATCH", "/admin/v1/adapters/00000000-0000-0000-0000-000000000000"),
]


class TestAdminAuth:
    @pytest.mark.parametrize(("method", "path"), ADMIN_ROUTES)
    @pytest.mark.parametrize("auth", [None, "Bearer wrong-key-wrong-key-wrong", "Basic dGVzdA=="])
    async def test_every_admin_route_needs_the_admin_key(
        self, client: httpx.AsyncClient, method: str, path: str, auth: str | None
    ) -> None:
        headers = {"Authorization": auth} if auth else {}
        resp = await client.request(method, path, headers=headers, json={})
        assert_envelope(resp, 401, "invalid_api_key")

    async def test_tenant_key_is_not_an_admin_key(self, admin: httpx.AsyncClient) -> None:
        await registry.tenant(admin)
        key = (await registry.api_key(admin))["key"]
        resp = await admin.get("/admin/v1/tenants", headers={"Authorization": f"Bearer {key}"})
        assert_envelope(resp, 401, "invalid_api_key")


class TestTenants:
    async def test_create_list_get_delete(self, admin: httpx.AsyncClient) -> None:
        created = await registry.tenant(admin, "acme")
        await registry.tenant(admin, "globex")
        listed = (await admin.get("/admin/v1/tenants")).json()
        assert [t["name"] for t in listed["data"]] == ["acme", "globex"]
        by_name = (await admin.get("/admin/v1/tenants/acme")).json()
        by_id = (await admin.get(f"/admin/v1/tenants/{created['id']}")).json()
        assert by_name == by_id == created
        assert (await admin.delete("/admin/v1/tenants/acme")).status_code == 204
        assert_envelope(await admin.get("/admin/v1/tenants/acme"), 404, "not_found")
        assert [t["name"] for t in (await admin.get("/admin/v1/tenants")).json()["data"]] == ["globex"]

    async def test_duplicate_name_is_409(self, admin: httpx.AsyncClient) -> None:
        await registry.tenant(admin, "acme")
        assert_envelope(await admin.post("/admin/v1/tenants", json={"name": "acme"}), 409, "conflict")

    @pytest.mark.parametrize(
        "body",
        [
            {},
            {"name": ""},
            {"name": "Acme Corp"},
            {"name": "../etc"},
            {"name": "a" * 65},
            {"name": 5},
            {"name": "acme", "surprise": 1},
        ],
    )
    async def test_bad_input_is_400(self, admin: httpx.AsyncClient, body: dict[str, object]) -> None:
        error = assert_envelope(await admin.post("/admin/v1/tenants", json=body), 400)
        assert error["type"] == "invalid_request_error"
        assert (await admin.get("/admin/v1/tenants")).json()["data"] == []

    async def test_malformed_json_is_400(self, admin: httpx.AsyncClient) -> None:
        resp = await admin.post(
            "/admin/v1/tenants", content=b"{not json", headers={"content-type": "application/json"}
        )
        assert_envelope(resp, 400)

    async def test_unknown_tenant_is_404(self, admin: httpx.AsyncClient) -> None:
        assert_envelope(await admin.get("/admin/v1/tenants/nobody"), 404, "not_found")
        assert_envelope(await admin.delete("/admin/v1/tenants/nobody"), 404, "not_found")


class TestApiKeys:
    async def test_key_shown_once_and_only_its_hash_stored(
        self, admin: httpx.AsyncClient, engine: AsyncEngine
    ) -> None:
        await registry.tenant(admin)
        created = await registry.api_key(admin)
        secret = created["key"]
        assert len(secret) >= 40 and secret.startswith(created["prefix"])

        listed = (await admin.get("/admin/v1/tenants/acme/api-keys")).json()["data"]
        assert len(listed) == 1 and "key" not in listed[0] and listed[0]["prefix"] == created["prefix"]

        async with engine.connect() as conn:
            rows = (await conn.execute(text("SELECT * FROM api_keys"))).mappings().all()
        assert len(rows) == 1
        stored = " ".join(str(v) for v in rows[0].values())
        assert secret not in stored
        assert secret[len(created["prefix"]) :] not in stored
        assert rows[0]["key_hash"] == hashlib.sha256(secret.encode()).hexdigest()

    async def test_keys_are_distinct(self, admin: httpx.AsyncClient) -> None:
        await registry.tenant(admin)
        keys = {(await registry.api_key(admin))["key"] for _ in range(5)}
        assert len(keys) == 5

    async def test_revoked_key_stops_working(
        self, admin: httpx.AsyncClient, client: httpx.AsyncClient
    ) -> None:
        await registry.tenant(admin)
        created = await registry.api_key(admin)
        headers = {"Authorization": f"Bearer {created['key']}"}
        assert (await client.get("/v1/models", headers=headers)).status_code == 200

        resp = await admin.delete(f"/admin/v1/tenants/acme/api-keys/{created['id']}")
        assert resp.status_code == 200 and resp.json()["revoked_at"] is not None

        assert_envelope(await client.get("/v1/models", headers=headers), 401, "invalid_api_key")

    async def test_other_tenants_key_cannot_be_revoked_through_this_tenant(
        self, admin: httpx.AsyncClient
    ) -> None:
        await registry.tenant(admin, "acme")
        await registry.tenant(admin, "globex")
        other = await registry.api_key(admin, "globex")
        resp = await admin.delete(f"/admin/v1/tenants/acme/api-keys/{other['id']}")
        assert_envelope(resp, 404, "not_found")

    async def test_key_of_deleted_tenant_stops_working(self, admin: httpx.AsyncClient) -> None:
        await registry.tenant(admin)
        created = await registry.api_key(admin)
        await admin.delete("/admin/v1/tenants/acme")
        resp = await admin.get("/v1/models", headers={"Authorization": f"Bearer {created['key']}"})
        assert_envelope(resp, 401, "invalid_api_key")

    @pytest.mark.parametrize("key_id", ["not-a-uuid", "00000000-0000-0000-0000-000000000000"])
    async def test_revoking_unknown_key_is_404(self, admin: httpx.AsyncClient, key_id: str) -> None:
        await registry.tenant(admin)
        assert_envelope(await admin.delete(f"/admin/v1/tenants/acme/api-keys/{key_id}"), 404, "not_found")

    async def test_key_for_unknown_tenant_is_404(self, admin: httpx.AsyncClient) -> None:
        assert_envelope(await admin.post("/admin/v1/tenants/nobody/api-keys", json={}), 404, "not_found")

    async def test_bad_key_body_is_400(self, admin: httpx.AsyncClient) -> None:
        await registry.tenant(admin)
        assert_envelope(await admin.post("/admin/v1/tenants/acme/api-keys", json={"name": "x" * 101}), 400)


class TestTenantUpdate:
    async def test_cap_set_and_cleared(self, admin: httpx.AsyncClient) -> None:
        await registry.tenant(admin)
        resp = await admin.patch("/admin/v1/tenants/acme", json={"max_adapters_per_backend": 2})
        assert resp.status_code == 200 and resp.json()["max_adapters_per_backend"] == 2
        resp = await admin.patch("/admin/v1/tenants/acme", json={"max_adapters_per_backend": None})
        assert resp.json()["max_adapters_per_backend"] is None

    @pytest.mark.parametrize(
        "patch", [{"max_adapters_per_backend": 0}, {"name": "other"}, {"display_name": "x" * 201}]
    )
    async def test_bad_update_is_400(self, admin: httpx.AsyncClient, patch: dict[str, object]) -> None:
        await registry.tenant(admin)
        assert_envelope(await admin.patch("/admin/v1/tenants/acme", json=patch), 400)
        assert (await admin.get("/admin/v1/tenants/acme")).json()["max_adapters_per_backend"] is None
