"""A fleet for the residency and rollout drills: two gateway processes sharing Redis and Postgres in
front of two vLLM CPU backends with two slots each, serving six adapters of two tenants, with each
adapter's greedy answer taken straight from vLLM as the reference."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
from redis import Redis
from sqlalchemy.engine import make_url

from app.backends.launcher import VllmCpuConfig, VllmCpuServer
from tests.conftest import PG_ADMIN_URL, _pg_admin
from tests.integration.conftest import (
    ADMIN_KEY,
    BASE,
    VLLM_KEY,
    start_gateway,
    stop_process,
    upload,
    vllm_venv,
)

REDIS_URL = os.environ.get("GATEWAY_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
N_ADAPTERS = 6
SLOTS = 2  # --max-loras and --max-cpu-loras of each backend: 4 places for 6 adapters
MSG = [{"role": "user", "content": "Hello! How are you today?"}]


@dataclass
class Stack:
    gateways: list[str]
    backends: list[VllmCpuServer]
    keys: dict[str, str]  # tenant -> key
    adapters: dict[str, str]  # "tenant/name" -> tenant
    reference: dict[str, str]  # "tenant/name" -> greedy output
    redis: Redis
    prefix: str
    tiny: object
    env: dict[str, str]  # the gateways' GATEWAY_* settings (database, Redis, adapter store)

    def key_for(self, adapter: str) -> str:
        return self.keys[adapter.split("/")[0]]


def fleet_server(tiny, log: Path, port: int = 0) -> VllmCpuServer:  # type: ignore[no-untyped-def]
    # vLLM's automatic OpenMP binding pins every server of this machine to the same core: one that
    # starts while another is serving on that core never finished starting in 180 s here (25 s unbound).
    return VllmCpuServer(VllmCpuConfig(
        model=tiny.base, served_model_name=BASE, venv=vllm_venv(), port=port, max_loras=SLOTS,
        max_lora_rank=8, max_cpu_loras=SLOTS, max_model_len=1024, kv_cache_bytes=64 << 20, log_path=log,
        api_key=VLLM_KEY, extra_env={"VLLM_CPU_OMP_THREADS_BIND": "nobind"},
    ))  # fmt: skip


def loaded(server: VllmCpuServer) -> set[str]:
    data = httpx.get(server.base_url + "/v1/models", headers=server.headers, timeout=10).json()["data"]
    return {m["id"] for m in data if m["id"].startswith("lgw-")}


def events(server: VllmCpuServer) -> list[tuple[str, str]]:
    """("load" | "unload", served name) in the order vLLM logged them."""
    text = Path(str(server.log_path)).read_text(errors="replace")
    found = re.findall(r"(Loaded new LoRA adapter|Removed LoRA adapter): name '(lgw-[^']+)'", text)
    return [("load" if kind.startswith("Loaded") else "unload", name) for kind, name in found]


@contextlib.contextmanager
def running_fleet(root: Path) -> Iterator[Stack]:
    from app.devkit.tinymodel import build_tiny_model

    tiny = build_tiny_model(root / "tiny", n_adapters=N_ADAPTERS, base_model_name=BASE)
    servers = [fleet_server(tiny, root / f"vllm-{i}.log") for i in range(2)]
    for s in servers:
        s.start()
    db = f"lgw_res_{uuid.uuid4().hex[:8]}"
    asyncio.run(_pg_admin(f'CREATE DATABASE "{db}"'))
    prefix = f"lgw-it-{uuid.uuid4().hex[:6]}"
    env = {
        "GATEWAY_DATABASE_URL": make_url(PG_ADMIN_URL).set(database=db).render_as_string(hide_password=False),
        "GATEWAY_REDIS_URL": REDIS_URL,
        "GATEWAY_REDIS_PREFIX": prefix,
        "GATEWAY_RECONCILE_INTERVAL_S": "1",
        # Replicas share one adapter store (a shared volume in production).
        "GATEWAY_ADAPTER_STORE": str(root / "store"),
        # ... and, with the promotion worker, one artifact store (the admin API lists and serves it).
        "GATEWAY_ARTIFACT_STORE": str(root / "artifacts"),
        # The default lock (60 s, loads cut off at 45 s): a CPU vLLM busy with the eviction test's long
        # requests was seen taking 28 s over one load.
        # Every request, its load included, ends by the placement wait. Two CPU vLLM servers on two
        # cores, busy with the long requests of the eviction test, serve a wave of cold adapters in
        # tens of seconds: these tests are about what gets evicted and loaded, not how fast.
        "GATEWAY_PLACEMENT_WAIT_S": "90",
        # The default 1 s is for a Redis that answers in a millisecond; here two CPU vLLMs starve the
        # gateways' event loops on two cores for longer than that, and a Redis call that times out is
        # a 503 (never retried: a timed-out script may have run).
        "GATEWAY_REDIS_TIMEOUT_S": "5",
    }
    procs = []
    try:
        for s in servers:
            s.wait_ready()
        gateways = []
        for i in range(2):
            proc, url, _ = start_gateway(root / f"gw-{i}", env)
            procs.append(proc)
            gateways.append(url)
        admin = httpx.Client(
            base_url=gateways[0], headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=60
        )
        admin.post("/admin/v1/base-models", json={"name": BASE, "path": str(tiny.base)}).raise_for_status()
        for i, s in enumerate(servers):
            admin.post(
                "/admin/v1/backends",
                json={
                    "name": f"cpu-{i}",
                    "url": s.base_url,
                    "base_model": BASE,
                    "gpu_slots": SLOTS,
                    "max_lora_rank": 8,
                    "capacity": SLOTS,
                    "api_key": VLLM_KEY,
                },
            ).raise_for_status()
        keys, adapters = {}, {}
        for t in ("acme", "globex"):
            admin.post("/admin/v1/tenants", json={"name": t}).raise_for_status()
            keys[t] = admin.post(f"/admin/v1/tenants/{t}/api-keys", json={}).json()["key"]
        for i, folder in enumerate(tiny.adapters):
            tenant, name = ("acme", "globex")[i % 2], f"a{i}"
            upload(admin, tenant, name, folder)
            adapters[f"{tenant}/{name}"] = tenant
        # Reference outputs straight from vLLM, one adapter at a time, unloaded again afterwards.
        reference = {}
        with httpx.Client(base_url=servers[0].base_url, headers=servers[0].headers, timeout=60) as c:
            for i, full in enumerate(adapters):
                c.post(
                    "/v1/load_lora_adapter", json={"lora_name": "ref", "lora_path": str(tiny.adapters[i])}
                ).raise_for_status()
                r = c.post(
                    "/v1/chat/completions",
                    json={"model": "ref", "messages": MSG, "max_tokens": 12, "temperature": 0},
                )
                reference[full] = r.json()["choices"][0]["message"]["content"]
                c.post("/v1/unload_lora_adapter", json={"lora_name": "ref"}).raise_for_status()
        assert len(set(reference.values())) == N_ADAPTERS
        redis = Redis.from_url(REDIS_URL)
        yield Stack(gateways, servers, keys, adapters, reference, redis, prefix, tiny, env)
        redis.close()
    finally:
        for p in procs:
            stop_process(p)
        for s in servers:
            s.stop()
        asyncio.run(_pg_admin(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)'))


async def ask(client: httpx.AsyncClient, stack: Stack, adapter: str, gateway: int) -> httpx.Response:
    return await client.post(
        stack.gateways[gateway] + "/v1/chat/completions",
        headers={"Authorization": f"Bearer {stack.key_for(adapter)}"},
        json={"model": adapter.split("/")[1], "messages": MSG, "max_tokens": 12, "temperature": 0},
    )
