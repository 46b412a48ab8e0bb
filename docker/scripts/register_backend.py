"""The compose file's `register-backend` one-shot: registers the base model and the vLLM backend with
the gateway through its admin API. Idempotent: run again, it leaves what matches, brings the backend's
sizes and token to the values given, and replaces a backend of that name whose URL or base model differ.

Runs in the gateway image (httpx, and the gateway's own reading of config.json). Env:
  GATEWAY_URL, GATEWAY_ADMIN_API_KEY  the gateway and its admin key
  MODEL_NAME, MODEL_PATH, MODEL       the base model's name (= vLLM's --served-model-name), the folder
                                      vLLM serves (the gateway reads its config.json), and the Hub id
                                      (an alias: adapters name it as their base_model_name_or_path)
  BACKEND_NAME, BACKEND_URL           the backend's name and where the gateway reaches vLLM
  VLLM_API_KEY                        vLLM's token (sent by the gateway on every call)
  VLLM_MAX_LORAS, VLLM_MAX_CPU_LORAS, VLLM_MAX_LORA_RANK, VLLM_MAX_NUM_SEQS
                                      the flags vLLM runs with (the backend's gpu_slots, capacity,
                                      max_lora_rank, max_num_seqs)
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import httpx

from app.registry.base_models import facts_from_path

API = "/admin/v1"


def _say(line: str, *, err: bool = False) -> None:
    stream = sys.stderr if err else sys.stdout
    stream.write(line + "\n")
    stream.flush()


class RegistrationError(Exception):
    """What stops the registration; the message says what to change."""


@dataclass(frozen=True)
class Target:
    model_name: str
    model_path: str
    aliases: tuple[str, ...]
    backend_name: str
    backend_url: str
    api_key: str | None
    gpu_slots: int
    capacity: int
    max_lora_rank: int
    max_num_seqs: int | None

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Target:
        name = env["MODEL_NAME"]
        hub_id = env.get("MODEL", "")
        return cls(
            model_name=name,
            model_path=env["MODEL_PATH"],
            aliases=(hub_id,) if hub_id and hub_id != name else (),
            backend_name=env.get("BACKEND_NAME", "vllm"),
            backend_url=env["BACKEND_URL"].rstrip("/"),
            api_key=env.get("VLLM_API_KEY") or None,
            gpu_slots=int(env["VLLM_MAX_LORAS"]),
            capacity=int(env.get("VLLM_MAX_CPU_LORAS") or env["VLLM_MAX_LORAS"]),
            max_lora_rank=int(env["VLLM_MAX_LORA_RANK"]),
            max_num_seqs=int(env["VLLM_MAX_NUM_SEQS"]) if env.get("VLLM_MAX_NUM_SEQS") else None,
        )


def _fail(resp: httpx.Response) -> RegistrationError:
    try:
        message = resp.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = resp.text[:500]
    return RegistrationError(f"{resp.request.method} {resp.request.url.path}: {resp.status_code} {message}")


def _ok(resp: httpx.Response) -> Any:
    if not resp.is_success:
        raise _fail(resp)
    return resp.json() if resp.content else None


async def register(admin: httpx.AsyncClient, target: Target) -> list[str]:
    """Brings the registry to `target`; returns what it did. `admin`: at the gateway, with the admin key."""
    done: list[str] = []
    found = await admin.get(f"{API}/base-models/{target.model_name}")
    if found.status_code == 404:
        body: dict[str, Any] = {
            "name": target.model_name,
            "path": target.model_path,
            "aliases": list(target.aliases),
        }
        _ok(await admin.post(f"{API}/base-models", json=body))
        done.append(f"base model {target.model_name} created ({target.model_path})")
    else:
        model = _ok(found)
        if model["path"] != target.model_path:
            raise RegistrationError(
                f"base model {target.model_name!r} is registered with path {model['path']!r}, not "
                f"{target.model_path!r}: delete it (and its backends and adapters) or use another MODEL_NAME"
            )
        # Another model downloaded under the same name: the registered shapes would check adapters wrongly.
        facts = facts_from_path(target.model_path)
        registered = (model["hidden_size"], model["num_layers"], model["module_shapes"])
        if registered != (facts.hidden_size, facts.num_layers, facts.module_shapes):
            raise RegistrationError(
                f"base model {target.model_name!r} was registered with the shapes of another model than "
                f"the one now in {target.model_path}: give the new model another MODEL_NAME"
            )
        done.append(f"base model {target.model_name} already registered")

    sizes: dict[str, Any] = {
        "gpu_slots": target.gpu_slots,
        "capacity": target.capacity,
        "max_lora_rank": target.max_lora_rank,
        "max_num_seqs": target.max_num_seqs,
    }
    create = {
        "name": target.backend_name,
        "url": target.backend_url,
        "base_model": target.model_name,
        **sizes,
        **({"api_key": target.api_key} if target.api_key else {}),
    }
    found = await admin.get(f"{API}/backends/{target.backend_name}")
    if found.status_code == 404:
        _ok(await admin.post(f"{API}/backends", json=create))
        done.append(f"backend {target.backend_name} created ({target.backend_url})")
        return done
    backend = _ok(found)
    if backend["url"].rstrip("/") != target.backend_url or backend["base_model"] != target.model_name:
        _ok(await admin.delete(f"{API}/backends/{target.backend_name}"))
        _ok(await admin.post(f"{API}/backends", json=create))
        done.append(
            f"backend {target.backend_name} replaced ({backend['url']} {backend['base_model']} -> "
            f"{target.backend_url} {target.model_name})"
        )
        return done
    # The token is write-only (reads say api_key_set): sent every time, "" clears one no longer used.
    _ok(
        await admin.patch(
            f"{API}/backends/{target.backend_name}", json={**sizes, "api_key": target.api_key or ""}
        )
    )
    done.append(f"backend {target.backend_name} updated (sizes and token)")
    return done


async def _wait_ready(client: httpx.AsyncClient, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if (await client.get("/healthz")).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if time.monotonic() >= deadline:
            raise RegistrationError(
                f"the gateway at {client.base_url} did not answer /healthz in {timeout_s:g} s"
            )
        await asyncio.sleep(1.0)


async def amain(env: Mapping[str, str]) -> int:
    target = Target.from_env(env)
    url = env.get("GATEWAY_URL", "http://gateway:8080").rstrip("/")
    headers = {"Authorization": f"Bearer {env['GATEWAY_ADMIN_API_KEY']}"}
    try:
        async with httpx.AsyncClient(base_url=url, headers=headers, timeout=30.0) as admin:
            await _wait_ready(admin, float(env.get("WAIT_S", "120")))
            for line in await register(admin, target):
                _say(f"register-backend: {line}")
    except (RegistrationError, httpx.HTTPError) as exc:
        _say(f"register-backend: {exc}", err=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(amain(os.environ)))
