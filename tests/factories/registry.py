"""Creates registry objects through the admin API, as an operator would."""

from __future__ import annotations

from typing import Any

import httpx

from tests.factories.adapters import TINY_BASE, TINY_LAYERS, TINY_SHAPES


async def tenant(admin: httpx.AsyncClient, name: str = "acme") -> dict[str, Any]:
    resp = await admin.post("/admin/v1/tenants", json={"name": name})
    assert resp.status_code == 201, resp.text
    return dict(resp.json())


async def api_key(admin: httpx.AsyncClient, tenant_name: str = "acme") -> dict[str, Any]:
    resp = await admin.post(f"/admin/v1/tenants/{tenant_name}/api-keys", json={"name": "ci"})
    assert resp.status_code == 201, resp.text
    return dict(resp.json())


async def base_model(admin: httpx.AsyncClient, name: str = TINY_BASE, **extra: Any) -> dict[str, Any]:
    body = {
        "name": name,
        "path": f"/models/{name}",
        "hidden_size": 64,
        "num_layers": TINY_LAYERS,
        "module_shapes": TINY_SHAPES,
        **extra,
    }
    resp = await admin.post("/admin/v1/base-models", json=body)
    assert resp.status_code == 201, resp.text
    return dict(resp.json())


async def backend(
    admin: httpx.AsyncClient,
    name: str = "b1",
    *,
    base: str = TINY_BASE,
    max_lora_rank: int = 16,
    **extra: Any,
) -> dict[str, Any]:
    body = {
        "name": name,
        "url": f"http://{name}.internal:8000",
        "base_model": base,
        "gpu_slots": 4,
        "max_lora_rank": max_lora_rank,
        **extra,
    }
    resp = await admin.post("/admin/v1/backends", json=body)
    assert resp.status_code == 201, resp.text
    return dict(resp.json())
