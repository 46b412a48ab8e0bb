"""Admin API: base models (shapes given or read from config.json) and backends."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from tests.api.test_tenants import assert_envelope
from tests.factories import registry
from tests.factories.adapters import TINY_SHAPES, tiny_hf_config


class TestBaseModels:
    async def test_create_with_explicit_shapes_list_get_delete(self, admin: httpx.AsyncClient) -> None:
        created = await registry.base_model(admin, "tiny-llama", aliases=["org/tiny-llama"])
        assert created["module_shapes"] == TINY_SHAPES
        assert created["aliases"] == ["org/tiny-llama"]
        assert [m["name"] for m in (await admin.get("/admin/v1/base-models")).json()["data"]] == [
            "tiny-llama"
        ]
        assert (await admin.get("/admin/v1/base-models/tiny-llama")).json() == created
        assert (await admin.get(f"/admin/v1/base-models/{created['id']}")).json() == created
        assert (await admin.delete("/admin/v1/base-models/tiny-llama")).status_code == 204
        assert_envelope(await admin.get("/admin/v1/base-models/tiny-llama"), 404, "not_found")

    async def test_name_with_slash(self, admin: httpx.AsyncClient) -> None:
        await registry.base_model(admin, "mistralai/Mistral-7B-v0.1")
        resp = await admin.get("/admin/v1/base-models/mistralai/Mistral-7B-v0.1")
        assert resp.json()["name"] == "mistralai/Mistral-7B-v0.1"

    async def test_shapes_read_from_config_json(self, admin: httpx.AsyncClient, tmp_path: Path) -> None:
        (tmp_path / "config.json").write_text(json.dumps(tiny_hf_config()))
        resp = await admin.post("/admin/v1/base-models", json={"name": "tiny", "path": str(tmp_path)})
        assert resp.status_code == 201, resp.text
        body = resp.json()
        assert body["module_shapes"] == TINY_SHAPES
        assert (body["hidden_size"], body["num_layers"], body["architecture"]) == (64, 2, "LlamaForCausalLM")

    async def test_missing_config_json_is_400(self, admin: httpx.AsyncClient, tmp_path: Path) -> None:
        resp = await admin.post("/admin/v1/base-models", json={"name": "tiny", "path": str(tmp_path)})
        assert assert_envelope(resp, 400)["param"] == "path"

    async def test_config_without_llama_fields_is_400(self, admin: httpx.AsyncClient, tmp_path: Path) -> None:
        (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
        assert_envelope(
            await admin.post("/admin/v1/base-models", json={"name": "b", "path": str(tmp_path)}), 400
        )

    @pytest.mark.parametrize(
        "body",
        [
            {"path": "/m"},
            {"name": "tiny", "path": ""},
            {"name": "has space", "path": "/m"},
            {"name": "tiny", "path": "/m", "hidden_size": 64},  # partial facts
            {
                "name": "tiny",
                "path": "/m",
                "hidden_size": 64,
                "num_layers": 2,
                "module_shapes": {"q_proj": [64]},
            },
            {
                "name": "tiny",
                "path": "/m",
                "hidden_size": 0,
                "num_layers": 2,
                "module_shapes": {"q_proj": [1, 1]},
            },
        ],
    )
    async def test_bad_input_is_400(self, admin: httpx.AsyncClient, body: dict[str, object]) -> None:
        assert_envelope(await admin.post("/admin/v1/base-models", json=body), 400)
        assert (await admin.get("/admin/v1/base-models")).json()["data"] == []

    async def test_duplicate_is_409(self, admin: httpx.AsyncClient) -> None:
        await registry.base_model(admin)
        body = {
            "name": "tiny-llama",
            "path": "/x",
            "hidden_size": 1,
            "num_layers": 1,
            "module_shapes": {"a": [1, 1]},
        }
        assert_envelope(await admin.post("/admin/v1/base-models", json=body), 409, "conflict")

    async def test_delete_in_use_is_409(self, admin: httpx.AsyncClient) -> None:
        await registry.base_model(admin)
        await registry.backend(admin)
        assert_envelope(await admin.delete("/admin/v1/base-models/tiny-llama"), 409, "conflict")
        assert (await admin.get("/admin/v1/base-models/tiny-llama")).status_code == 200


class TestBackends:
    async def test_create_list_get_update_delete(self, admin: httpx.AsyncClient) -> None:
        await registry.base_model(admin)
        created = await registry.backend(admin, "b1", capacity=8)
        assert (created["gpu_slots"], created["capacity"], created["max_lora_rank"]) == (4, 8, 16)
        assert (created["kind"], created["state"], created["base_model"]) == (
            "shared",
            "active",
            "tiny-llama",
        )
        assert created["url"] == "http://b1.internal:8000"
        await registry.backend(admin, "b2")
        assert [b["name"] for b in (await admin.get("/admin/v1/backends")).json()["data"]] == ["b1", "b2"]
        assert (await admin.get("/admin/v1/backends/b1")).json() == created

        resp = await admin.patch("/admin/v1/backends/b1", json={"state": "draining", "gpu_slots": 8})
        assert resp.status_code == 200, resp.text
        assert (resp.json()["state"], resp.json()["gpu_slots"]) == ("draining", 8)

        assert (await admin.delete("/admin/v1/backends/b1")).status_code == 204
        assert_envelope(await admin.get("/admin/v1/backends/b1"), 404, "not_found")

    async def test_capacity_defaults_to_slots(self, admin: httpx.AsyncClient) -> None:
        await registry.base_model(admin)
        assert (await registry.backend(admin))["capacity"] == 4

    async def test_max_num_seqs_is_optional_and_updatable(self, admin: httpx.AsyncClient) -> None:
        await registry.base_model(admin)
        assert (await registry.backend(admin, "b1"))["max_num_seqs"] is None
        assert (await registry.backend(admin, "b2", max_num_seqs=64))["max_num_seqs"] == 64
        resp = await admin.patch("/admin/v1/backends/b1", json={"max_num_seqs": 32})
        assert (resp.status_code, resp.json()["max_num_seqs"]) == (200, 32)
        # Other updates leave it alone; an explicit null clears it (unknown: no seat limit).
        resp = await admin.patch("/admin/v1/backends/b1", json={"state": "draining"})
        assert resp.json()["max_num_seqs"] == 32
        resp = await admin.patch("/admin/v1/backends/b1", json={"max_num_seqs": None})
        assert (resp.status_code, resp.json()["max_num_seqs"]) == (200, None)
        assert (await admin.get("/admin/v1/backends/b1")).json()["max_num_seqs"] is None
        assert_envelope(await admin.patch("/admin/v1/backends/b2", json={"max_num_seqs": 0}), 400)
        assert (await admin.get("/admin/v1/backends/b2")).json()["max_num_seqs"] == 64

    async def test_api_key_is_write_only(self, admin: httpx.AsyncClient, engine: AsyncEngine) -> None:
        token = "vllm-token-Zx81qPm4"
        await registry.base_model(admin)
        created = await registry.backend(admin, "b1", api_key=token)
        plain = await registry.backend(admin, "b2")
        assert (created["api_key_set"], plain["api_key_set"]) == (True, False)
        for resp in (
            await admin.get("/admin/v1/backends"),
            await admin.get("/admin/v1/backends/b1"),
            await admin.patch("/admin/v1/backends/b1", json={"state": "active"}),
        ):
            assert resp.status_code == 200 and token not in resp.text and 'api_key"' not in resp.text
        async with engine.connect() as conn:
            stored = (await conn.execute(text("SELECT api_key FROM backends WHERE name = 'b1'"))).scalar()
        assert stored == token  # the gateway must present it: kept as given, shown never
        resp = await admin.patch("/admin/v1/backends/b2", json={"api_key": "other-token"})
        assert resp.json()["api_key_set"] is True
        resp = await admin.patch("/admin/v1/backends/b1", json={"api_key": ""})  # cleared
        assert resp.json()["api_key_set"] is False
        assert_envelope(await admin.post("/admin/v1/backends", json={
            "name": "b3", "url": "http://b3:8000", "base_model": "tiny-llama", "gpu_slots": 4, "api_key": ""
        }), 400)  # fmt: skip

    async def test_unknown_base_model_is_404(self, admin: httpx.AsyncClient) -> None:
        body = {"name": "b1", "url": "http://x:8000", "base_model": "nope", "gpu_slots": 4}
        assert_envelope(await admin.post("/admin/v1/backends", json=body), 404, "not_found")

    @pytest.mark.parametrize(
        "patch",
        [
            {"url": "file:///etc/passwd"},
            {"url": "not a url"},
            {"gpu_slots": 0},
            {"gpu_slots": 8, "capacity": 4},
            {"max_num_seqs": 0},
            {"max_num_seqs": "many"},
            {"kind": "weird"},
            {"name": "B 1"},
        ],
    )
    async def test_bad_input_is_400(self, admin: httpx.AsyncClient, patch: dict[str, object]) -> None:
        await registry.base_model(admin)
        body = {"name": "b1", "url": "http://x:8000", "base_model": "tiny-llama", "gpu_slots": 4, **patch}
        assert_envelope(await admin.post("/admin/v1/backends", json=body), 400)
        assert (await admin.get("/admin/v1/backends")).json()["data"] == []

    async def test_bad_update_is_400_and_changes_nothing(self, admin: httpx.AsyncClient) -> None:
        await registry.base_model(admin)
        await registry.backend(admin)
        assert_envelope(await admin.patch("/admin/v1/backends/b1", json={"state": "exploded"}), 400)
        assert_envelope(await admin.patch("/admin/v1/backends/b1", json={"capacity": 1}), 400)
        assert (await admin.get("/admin/v1/backends/b1")).json()["capacity"] == 4

    async def test_duplicate_name_or_url_is_409(self, admin: httpx.AsyncClient) -> None:
        await registry.base_model(admin)
        await registry.backend(admin, "b1")
        body = {"name": "b1", "url": "http://other:8000", "base_model": "tiny-llama", "gpu_slots": 4}
        assert_envelope(await admin.post("/admin/v1/backends", json=body), 409)
        body = {"name": "b2", "url": "http://b1.internal:8000", "base_model": "tiny-llama", "gpu_slots": 4}
        assert_envelope(await admin.post("/admin/v1/backends", json=body), 409)
