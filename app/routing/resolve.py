"""Turns a tenant's `model` (and the seed's `lora_request`) into what to run: an adapter of theirs or a
public base model. Only the registry decides; nothing the client sends is used as a path."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from app.errors import InvalidRequest, ModelNotFound
from app.registry.cache import RegistryCache
from app.registry.snapshots import AdapterView, BaseModelView, TenantView


@dataclass(frozen=True, slots=True)
class Target:
    public_name: str  # what the tenant called it; shown in responses
    served_name: str  # what the backend knows it by
    base_model: BaseModelView
    adapter: AdapterView | None
    ignored_lora_path: bool = False


def split_version(model: str) -> tuple[str, int | None]:
    name, sep, version = model.rpartition("@")
    if not sep:
        return model, None
    if not (version.isascii() and version.isdigit()) or not name:  # "x@²": isdigit alone says yes
        raise InvalidRequest(
            f"model {model!r}: use NAME or NAME@VERSION with a numeric version", param="model"
        )
    return name, int(version)


# Longer than any name the registry accepts (adapters 128, base models 200, plus "@VERSION"): refused
# before any lookup, so a tenant cannot make the gateway hash and cache megabyte-long names.
MAX_MODEL_CHARS = 256


async def resolve(cache: RegistryCache, tenant: TenantView, model: Any, lora_request: Any) -> Target:
    if not isinstance(model, str) or not model:
        raise InvalidRequest("'model' is required and must be a string", param="model")
    if len(model) > MAX_MODEL_CHARS:
        raise InvalidRequest(f"'model' is longer than {MAX_MODEL_CHARS} characters", param="model")
    if lora_request is not None:
        return await _resolve_lora_request(cache, tenant, model, lora_request)
    name, version = split_version(model)
    adapter = await cache.adapter(tenant.id, name, version)
    if adapter is not None:
        return Target(model, adapter.served_name, adapter.base_model, adapter)
    if version is None:
        base = await cache.base_model(model)
        if base is not None and base.public:
            return Target(model, base.name, base, None)
    # The same answer whether the name is unknown or another tenant's: names do not leak across tenants.
    raise ModelNotFound(f"The model '{model}' does not exist or you do not have access to it.", param="model")


async def _resolve_lora_request(cache: RegistryCache, tenant: TenantView, model: str, lora: Any) -> Target:
    if not isinstance(lora, dict) or not isinstance(lora.get("lora_name"), str) or not lora["lora_name"]:
        raise InvalidRequest(
            "'lora_request' must be an object with a string 'lora_name'", param="lora_request"
        )
    if len(lora["lora_name"]) > MAX_MODEL_CHARS:
        raise InvalidRequest(
            f"'lora_request.lora_name' is longer than {MAX_MODEL_CHARS} characters",
            param="lora_request.lora_name",
        )
    name, version = split_version(lora["lora_name"])
    adapter = await cache.adapter(tenant.id, name, version)
    if adapter is None:
        raise ModelNotFound(
            f"The adapter '{lora['lora_name']}' does not exist or you do not have access to it.",
            param="lora_request.lora_name",
        )
    base = adapter.base_model
    if model != base.name and model not in base.aliases:
        raise InvalidRequest(
            f"adapter '{lora['lora_name']}' is trained on base model '{base.name}', not '{model}'",
            param="model",
        )
    return Target(
        lora["lora_name"], adapter.served_name, base, adapter, ignored_lora_path="lora_path" in lora
    )
