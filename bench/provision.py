"""A throw-away gateway for one benchmark run: its own data dir, database, admin key and tenant.

It decides what the gateway under test holds: one base model, one backend (the upstream being
measured), one tenant with one API key and one adapter, all made through the admin API exactly as an
operator would, on the embedded SQLite default in a temporary directory, so that a run touches no
developer data and needs no Postgres or Redis.
"""

from __future__ import annotations

import json
import os
import secrets
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from safetensors.numpy import save_file

from bench.procs import Child, pinned, run_to_end

TENANT = "bench"
ADAPTER = "bench-adapter"


@dataclass(frozen=True)
class Provisioned:
    tenant_key: str
    adapter: str  # the name the tenant calls it by


def gateway_bin() -> Path:
    """`lora-gateway` from the venv running this script (the project's .venv)."""
    return Path(sys.executable).parent / "lora-gateway"


def gateway_env(
    data_dir: Path,
    admin_key: str,
    source: Path | None = None,
    redis_url: str | None = None,
    extra_env: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """The gateway's environment; `source` runs the `app` package found there (another checkout)."""
    # Drop the caller's GATEWAY_* settings (a Postgres URL, another store): a run uses only its
    # temporary embedded defaults.
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    env["GATEWAY_DATA_DIR"] = str(data_dir)
    env["GATEWAY_ADMIN_API_KEY"] = admin_key
    env["PYTHONUNBUFFERED"] = "1"
    if redis_url:
        # Residency in Redis, as several replicas run it: the hot path then pays its round trips.
        env["GATEWAY_REDIS_URL"] = redis_url
        env["GATEWAY_REDIS_PREFIX"] = f"lgw-bench-{secrets.token_hex(4)}"
    if source is not None:
        # PYTHONPATH is searched before the venv's editable install of this checkout.
        env["PYTHONPATH"] = str(source.resolve())
    env.update(extra_env or {})
    return env


def new_admin_key() -> str:
    return secrets.token_hex(16)  # 32 characters


def gateway(
    *,
    data_dir: Path,
    admin_key: str,
    port: int,
    cpu: str,
    source: Path | None = None,
    redis_url: str | None = None,
    extra_env: Mapping[str, str] | None = None,
    log_name: str = "gateway.log",
) -> Child:
    """Migrate a fresh database; return (not yet started) `lora-gateway serve`, one worker on `cpu`.

    The working directory is the data dir, so that a developer's .env in the repository cannot
    point the run at another database.
    """
    env = gateway_env(data_dir, admin_key, source, redis_url, extra_env)
    binary = str(gateway_bin())
    run_to_end([binary, "migrate"], env=env, cwd=data_dir, timeout_s=120)
    return Child(
        "gateway",
        pinned(cpu, [binary, "serve", "--host", "127.0.0.1", "--port", str(port)]),
        log_path=data_dir / log_name,
        env=env,
        cwd=data_dir,
    )


def write_fake_adapter(
    out: Path, *, base_model: str, num_layers: int, shapes: dict[str, list[int]], rank: int = 8
) -> Path:
    """The two files peft writes, made with numpy: lora_A [r, in] and lora_B [out, r] per module."""
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    tensors: dict[str, np.ndarray] = {}
    for layer in range(num_layers):
        for module, (fan_in, fan_out) in shapes.items():
            prefix = f"base_model.model.model.layers.{layer}.self_attn.{module}"
            tensors[f"{prefix}.lora_A.weight"] = rng.standard_normal((rank, fan_in), dtype=np.float32)
            tensors[f"{prefix}.lora_B.weight"] = rng.standard_normal((fan_out, rank), dtype=np.float32)
    save_file(tensors, str(out / "adapter_model.safetensors"))
    config = {
        "peft_type": "LORA",
        "r": rank,
        "lora_alpha": 2 * rank,
        "target_modules": sorted(shapes),
        "base_model_name_or_path": base_model,
        "bias": "none",
        "task_type": "CAUSAL_LM",
    }
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return out


class Admin:
    """The few admin API calls a run needs; any answer but 2xx stops the run with the gateway's words."""

    def __init__(self, url: str, admin_key: str) -> None:
        self.client = httpx.Client(
            base_url=f"{url}/admin/v1", headers={"Authorization": f"Bearer {admin_key}"}, timeout=60.0
        )

    def close(self) -> None:
        self.client.close()

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        response = self.client.request(method, path, **kwargs)
        if response.status_code >= 300:
            raise RuntimeError(f"admin {method} {path} -> {response.status_code}: {response.text}")
        return response.json() if response.content else None

    def provision(
        self,
        *,
        base_model: dict[str, Any],
        backend_url: str,
        gpu_slots: int,
        max_lora_rank: int,
        adapter_dir: Path,
    ) -> str:
        """Base model, backend, tenant, key and adapter; returns the tenant's API key."""
        self._call("POST", "/base-models", json=base_model)
        self._call(
            "POST",
            "/backends",
            json={
                "name": "bench-upstream",
                "url": backend_url,
                "base_model": base_model["name"],
                "gpu_slots": gpu_slots,
                "max_lora_rank": max_lora_rank,
            },
        )
        return self.add_tenant(TENANT, adapter_dir)

    def add_tenant(self, name: str, adapter_dir: Path) -> str:
        """A tenant with the bench adapter (named ADAPTER) and a key; returns the key."""
        self._call("POST", "/tenants", json={"name": name})
        key: str = self._call("POST", f"/tenants/{name}/api-keys", json={"name": "bench"})["key"]
        files = [
            ("file", (n, (adapter_dir / n).read_bytes(), "application/octet-stream"))
            for n in ("adapter_config.json", "adapter_model.safetensors")
        ]
        self._call("POST", f"/tenants/{name}/adapters", data={"name": ADAPTER}, files=files)
        return key

    def set_limits(self, limits: dict[str, int], tenant: str = TENANT) -> None:
        self._call("PATCH", f"/tenants/{tenant}", json={"limits": limits})
