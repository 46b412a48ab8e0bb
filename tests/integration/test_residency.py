"""Residency end to end: two gateway processes sharing Redis and Postgres in front of two vLLM CPU
backends with two slots each, serving six adapters. Loads and evictions are counted from vLLM's own
logs and /v1/models, not from the gateway's counters."""

from __future__ import annotations

import asyncio
import os
import random
import re
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
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

pytestmark = pytest.mark.vllm

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

    def key_for(self, adapter: str) -> str:
        return self.keys[adapter.split("/")[0]]


def _server(tiny, log: Path, port: int = 0) -> VllmCpuServer:  # type: ignore[no-untyped-def]
    return VllmCpuServer(VllmCpuConfig(
        model=tiny.base, served_model_name=BASE, venv=vllm_venv(), port=port, max_loras=SLOTS,
        max_lora_rank=8, max_cpu_loras=SLOTS, max_model_len=1024, kv_cache_bytes=64 << 20, log_path=log,
        api_key=VLLM_KEY,
    ))  # fmt: skip


def _loaded(server: VllmCpuServer) -> set[str]:
    data = httpx.get(server.base_url + "/v1/models", headers=server.headers, timeout=10).json()["data"]
    return {m["id"] for m in data if m["id"].startswith("lgw-")}


def _events(server: VllmCpuServer) -> list[tuple[str, str]]:
    """("load" | "unload", served name) in the order vLLM logged them."""
    text = Path(str(server.log_path)).read_text(errors="replace")
    found = re.findall(r"(Loaded new LoRA adapter|Removed LoRA adapter): name '(lgw-[^']+)'", text)
    return [("load" if kind.startswith("Loaded") else "unload", name) for kind, name in found]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    from app.devkit.tinymodel import build_tiny_model

    root = tmp_path_factory.mktemp("residency")
    tiny = build_tiny_model(root / "tiny", n_adapters=N_ADAPTERS, base_model_name=BASE)
    servers = [_server(tiny, root / f"vllm-{i}.log") for i in range(2)]
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
        yield Stack(gateways, servers, keys, adapters, reference, redis, prefix, tiny)
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


def test_single_flight_across_gateways(stack: Stack) -> None:
    adapter = "acme/a0"
    before = sum(len(_events(s)) for s in stack.backends)

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=120) as c:
            return await asyncio.gather(*(ask(c, stack, adapter, i % 2) for i in range(24)))

    responses = asyncio.run(burst())
    assert [r.status_code for r in responses] == [200] * 24, [
        r.text for r in responses if r.status_code != 200
    ]
    assert {r.json()["choices"][0]["message"]["content"] for r in responses} == {stack.reference[adapter]}
    new = [e for s in stack.backends for e in _events(s)][before:]
    assert [kind for kind, _ in new] == ["load"], new  # 24 first requests, 2 gateways: one load


def test_concurrent_requests_over_more_adapters_than_fit(stack: Stack) -> None:
    rng = random.Random(7)
    plan = [rng.choice(list(stack.adapters)) for _ in range(60)]

    async def run() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=180) as c:
            sem = asyncio.Semaphore(12)

            async def one(i: int, adapter: str) -> httpx.Response:
                async with sem:
                    return await ask(c, stack, adapter, i % 2)

            return await asyncio.gather(*(one(i, a) for i, a in enumerate(plan)))

    responses = asyncio.run(run())
    bad = [r.text for r in responses if r.status_code != 200]
    assert not bad, bad
    for adapter, r in zip(plan, responses, strict=True):
        assert r.json()["choices"][0]["message"]["content"] == stack.reference[adapter], adapter
        assert r.json()["model"] == adapter.split("/")[1]
    for s in stack.backends:
        # Loads and unloads of one adapter alternate (no double load), and a backend never held more
        # adapters than its capacity.
        held: set[str] = set()
        for kind, name in _events(s):
            if kind == "load":
                assert name not in held, f"{name} loaded twice on {s.base_url}"
                held.add(name)
                assert len(held) <= SLOTS, f"{s.base_url} held {held}"
            else:
                held.discard(name)
        assert held == _loaded(s)


def test_evictions_follow_lru(stack: Stack) -> None:
    """Sequential requests; after each, both backends' /v1/models. Whenever an adapter leaves a backend,
    it must have been the least recently used one there."""
    rng = random.Random(11)
    names = list(stack.adapters)
    served: dict[str, str] = {}
    last_use: dict[str, int] = {}
    before = [_loaded(s) for s in stack.backends]
    evictions = 0

    async def run() -> None:
        nonlocal before, evictions
        async with httpx.AsyncClient(timeout=60) as c:
            for step in range(30):
                adapter = rng.choice(names)
                r = await ask(c, stack, adapter, step % 2)
                assert r.status_code == 200, r.text
                after = [_loaded(s) for s in stack.backends]
                new_names = set().union(*after) - set().union(*before)
                for n in new_names:
                    served.setdefault(n, adapter)
                by_served = {v: k for k, v in served.items()}
                for prev, now in zip(before, after, strict=True):
                    for gone in prev - now:
                        evictions += 1
                        candidates = [by_served.get(x) for x in prev]
                        if all(candidates):
                            oldest = min(candidates, key=lambda a: last_use.get(a, -1))  # type: ignore[arg-type]
                            assert by_served[gone] == oldest, (step, by_served[gone], oldest)
                last_use[adapter] = step
                before = after

    asyncio.run(run())
    assert evictions > 0  # six adapters over four places: the scenario did evict


def _served_name(stack: Stack, adapter: str) -> str:
    tenant, name = adapter.split("/")
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    rows = httpx.get(f"{stack.gateways[0]}/admin/v1/tenants/{tenant}/adapters", headers=admin).json()["data"]
    row = next(r for r in rows if r["name"] == name)
    return f"lgw-{uuid.UUID(row['id']).hex}-{row['sha256'][:12]}"


def test_in_flight_adapter_is_not_evicted(stack: Stack) -> None:
    """A chain of long streams of one adapter, through both gateways in turn, keeps it in flight at every
    moment while the other five churn through the remaining places: vLLM's log must show evictions,
    never of that adapter. Each stream starts once the one before has sent output (so it holds its
    lease) and the one before that has ended: two loops of equal requests could end together, leaving
    an instant with none in flight, in which evicting the adapter would be right."""
    held = "globex/a1"
    served = _served_name(stack, held)
    marks: list[int] = []
    long_body = {
        "model": "a1",
        "messages": MSG,
        "max_tokens": 1000,
        "n": 4,
        "ignore_eos": True,
        "temperature": 1.0,
        "stream": True,
    }

    async def run() -> None:
        done = asyncio.Event()
        async with httpx.AsyncClient(timeout=180) as c:
            headers = {"Authorization": f"Bearer {stack.key_for(held)}"}

            async def stream(gateway: int, serving: asyncio.Event) -> None:
                url = stack.gateways[gateway] + "/v1/chat/completions"
                last = ""
                async with c.stream("POST", url, json=long_body, headers=headers) as r:
                    assert r.status_code == 200, await r.aread()
                    async for line in r.aiter_lines():
                        if line.startswith("data: {"):
                            serving.set()  # placed, with its lease, and generating
                        last = line or last
                    assert last == "data: [DONE]", last

            async def chain(first: asyncio.Event) -> int:
                before: asyncio.Task[None] | None = None
                n = 0
                while not done.is_set():
                    serving = first if n == 0 else asyncio.Event()
                    current = asyncio.create_task(stream(n % 2, serving))
                    output = asyncio.create_task(serving.wait())
                    await asyncio.wait([current, output], return_when=asyncio.FIRST_COMPLETED)
                    output.cancel()
                    if current.done():
                        current.result()  # it failed before any output: raise what it raised
                    if before is not None:
                        await before
                    before, n = current, n + 1
                if before is not None:
                    await before
                return n

            first = asyncio.Event()
            keeper = asyncio.create_task(chain(first))
            await asyncio.wait_for(first.wait(), 120)  # in flight: from now on it must stay
            marks.extend(len(_events(s)) for s in stack.backends)
            others = [a for a in stack.adapters if a != held]
            for round_ in range(3):
                churn = await asyncio.gather(
                    *(ask(c, stack, a, (i + round_) % 2) for i, a in enumerate(others))
                )
                assert [r.status_code for r in churn] == [200] * len(others), [
                    r.text for r in churn if r.status_code != 200
                ]
            assert any(served in _loaded(s) for s in stack.backends)
            done.set()
            assert await keeper >= 2

    asyncio.run(run())
    during = [e for s, m in zip(stack.backends, marks, strict=True) for e in _events(s)[m:]]
    assert any(kind == "unload" for kind, _ in during), "the churn evicted nothing: the test proved nothing"
    assert ("unload", served) not in during


def test_state_converges_after_redis_flush_and_backend_restart(stack: Stack) -> None:
    rng = random.Random(3)
    failures: list[str] = []

    async def traffic(n: int) -> list[int]:
        async with httpx.AsyncClient(timeout=120) as c:
            # Fewer requests at once than the fleet has places (4), so there is always an idle adapter
            # to evict: with more distinct adapters busy than places, a cold one may rightly wait out
            # PLACEMENT_WAIT_S and get a 503, which is not the fault under test here.
            sem = asyncio.Semaphore(3)

            async def one(i: int) -> int:
                async with sem:
                    adapter = rng.choice(list(stack.adapters))
                    r = await ask(c, stack, adapter, i % 2)
                    if r.status_code == 200:
                        assert r.json()["choices"][0]["message"]["content"] == stack.reference[adapter]
                    else:
                        failures.append(r.text)
                    return r.status_code

            return await asyncio.gather(*(one(i) for i in range(n)))

    # Redis loses everything mid-run: no request fails.
    async def flush_mid_run() -> list[int]:
        task = asyncio.create_task(traffic(40))
        await asyncio.sleep(1.0)
        stack.redis.flushdb()
        return await task

    assert set(asyncio.run(flush_mid_run())) == {200}, failures

    # One backend dies mid-run and comes back: only requests in flight on it may fail, clearly.
    victim = stack.backends[1]
    port = victim.port

    async def kill_mid_run() -> list[int]:
        task = asyncio.create_task(traffic(40))
        await asyncio.sleep(1.0)
        await asyncio.to_thread(victim.stop)
        return await task

    statuses = asyncio.run(kill_mid_run())
    assert set(statuses) <= {200, 502, 503}, statuses
    assert statuses.count(200) >= len(statuses) - 8, failures  # at most the in-flight ones fail
    restarted = _server(stack.tiny, Path(str(victim.log_path) + ".2"), port=port)
    restarted.start()
    restarted.wait_ready()
    stack.backends[1] = restarted
    assert set(asyncio.run(traffic(30))) == {200}

    # Converged: what Redis says each backend holds is what the backend reports, within its capacity.
    import time

    deadline = time.monotonic() + 10
    while True:
        ok = True
        for s in stack.backends:
            keys = stack.redis.keys(f"{stack.prefix}:*reg:*")
            registered = set()
            for k in keys:
                registered |= {m.decode() for m in stack.redis.zrange(k, 0, -1)}
            ok &= _loaded(s) <= registered
        total_registered = sum(stack.redis.zcard(k) for k in stack.redis.keys(f"{stack.prefix}:*reg:*"))
        ok &= total_registered == sum(len(_loaded(s)) for s in stack.backends)
        # Gateways that loaded adapters while the state was lost may have put a backend over its
        # capacity: the reconciler unloads the excess (least recently used, idle) from vLLM itself.
        ok &= all(len(_loaded(s)) <= SLOTS for s in stack.backends)
        if ok:
            break
        assert time.monotonic() < deadline, "residency state did not converge"
        time.sleep(0.5)
