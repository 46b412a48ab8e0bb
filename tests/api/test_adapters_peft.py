"""Adapters written by real peft `save_pretrained` are accepted on the model they were trained for,
and refused on a model of another shape."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from app.devkit.tinymodel import TinyLlamaSpec, TinyModel, build_adapter, build_base_model, build_tiny_model
from tests.api.test_tenants import assert_envelope
from tests.factories import registry


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> TinyModel:
    return build_tiny_model(tmp_path_factory.mktemp("tiny"), n_adapters=1, base_model_name="tiny-llama")


@pytest.fixture(scope="module")
def wide_adapter(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An adapter for a 256-wide model that calls itself tiny-llama."""
    root = tmp_path_factory.mktemp("wide")
    base = build_base_model(
        root / "base", TinyLlamaSpec(hidden_size=256, num_attention_heads=8, num_key_value_heads=8)
    )
    return build_adapter(root / "lora", base_dir=base, base_model_name="tiny-llama", seed=7)


def _files(folder: Path) -> list[tuple[str, tuple[str, bytes]]]:
    return [
        ("file", (p.name, p.read_bytes())) for p in sorted(folder.iterdir()) if p.name.startswith("adapter_")
    ]


async def test_peft_adapter_accepted_on_its_base(admin: httpx.AsyncClient, tiny: TinyModel) -> None:
    await registry.tenant(admin)
    resp = await admin.post("/admin/v1/base-models", json={"name": "tiny-llama", "path": str(tiny.base)})
    assert resp.status_code == 201, resp.text
    assert resp.json()["module_shapes"]["q_proj"] == [128, 128]

    up = await admin.post(
        "/admin/v1/tenants/acme/adapters", data={"name": "real"}, files=_files(tiny.adapters[0])
    )
    assert up.status_code == 201, up.text
    assert up.json()["target_modules"] == ["k_proj", "o_proj", "q_proj", "v_proj"]
    assert up.json()["rank"] == 8


async def test_peft_adapter_of_another_shape_refused(
    admin: httpx.AsyncClient, tiny: TinyModel, wide_adapter: Path
) -> None:
    await registry.tenant(admin)
    await admin.post("/admin/v1/base-models", json={"name": "tiny-llama", "path": str(tiny.base)})
    up = await admin.post(
        "/admin/v1/tenants/acme/adapters", data={"name": "wide"}, files=_files(wide_adapter)
    )
    error = assert_envelope(up, 400, "invalid_adapter")
    assert "128->128" in str(error["message"])
