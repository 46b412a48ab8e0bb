"""Switching a hot adapter to its dedicated deployment, and back, under load from two gateway replicas
(the residency fleet: Postgres, Redis, two shared vLLM CPU backends): no request fails, every answer is
the adapter's, and the requests routed after the switch are the deployment's to serve."""

from __future__ import annotations

import asyncio
import io
import tarfile
import time
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import httpx
import pytest

from app.db.models import Deployment
from app.db.session import create_engine, create_sessionmaker
from tests.integration.conftest import (
    ADMIN_KEY,
    CALIBRATION,
    TINY_AWQ_GATES,
    start_worker,
    stop_deployments,
    stop_process,
)
from tests.integration.fleet import MSG, Stack

pytestmark = pytest.mark.vllm


PACE_S = 0.1  # between one client's requests: steady concurrent load that leaves the quantizer some CPU


@dataclass
class Call:
    adapter: str
    gateway: int
    started: float
    ended: float
    status: int
    text: str | None


async def load(stack: Stack, stop: asyncio.Event, calls: list[Call], adapter: str, gateway: int) -> None:
    async with httpx.AsyncClient(timeout=120) as client:
        while not stop.is_set():
            started = time.time()
            try:
                resp = await client.post(
                    stack.gateways[gateway] + "/v1/chat/completions",
                    headers={"Authorization": f"Bearer {stack.key_for(adapter)}"},
                    json={
                        "model": adapter.split("/")[1],
                        "messages": MSG,
                        "max_tokens": 12,
                        "temperature": 0,
                    },
                )
                text = (
                    resp.json()["choices"][0]["message"]["content"] if resp.status_code == 200 else resp.text
                )
                calls.append(Call(adapter, gateway, started, time.time(), resp.status_code, text))
            except httpx.HTTPError as exc:
                calls.append(Call(adapter, gateway, started, time.time(), 0, repr(exc)))
            await asyncio.sleep(PACE_S)


async def wait_job(admin: httpx.AsyncClient, job_id: str, timeout_s: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        job = (await admin.get(f"/admin/v1/jobs/{job_id}")).json()
        if job["state"] in ("succeeded", "failed", "cancelled"):
            return dict(job)
        assert time.monotonic() < deadline, f"job still {job['state']} at {job['step']}: {job['log_tail']}"
        await asyncio.sleep(0.5)


def step_window(job: dict[str, Any], name: str) -> tuple[float, float]:
    step = next(s for s in job["steps"] if s["name"] == name)
    start = datetime.fromisoformat(step["started_at"]).timestamp()
    return start, start + step["seconds"]


async def dedicated_served(url: str, key: str) -> float:
    async with httpx.AsyncClient(timeout=10) as c:
        text = (await c.get(f"{url}/metrics", headers={"Authorization": f"Bearer {key}"})).text
    return sum(
        float(x.rsplit(" ", 1)[1]) for x in text.splitlines() if x.startswith("vllm:request_success_total")
    )


async def deployment_handle(url: str, dep_id: str) -> dict[str, Any]:
    """The deployment's URL, token and served name, from the registry (the admin API never shows them)."""
    engine = create_engine(url)
    try:
        async with create_sessionmaker(engine)() as session:
            dep = await session.get(Deployment, uuid.UUID(dep_id))
            assert dep is not None and dep.handle is not None
            return {**dep.handle, "served_model_name": dep.served_model_name}
    finally:
        await engine.dispose()


# acme/a2 and a4: the residency tests that share this fleet and run after this one count on a0 and a1
# being cold.
PROMOTIONS = {
    "acme/a2": {"quantization": "none", "serve_dtype": "float32", "gates": {"served_min_exact": 1.0, "served_min_top1": 1.0}},
    "acme/a4": {"quantization": "awq", "calibration_texts": CALIBRATION, "gates": TINY_AWQ_GATES,
                "gguf": {"quant_type": "Q8_0", "pre_tokenizer": "gpt-2"}},
}  # fmt: skip


async def artifact_head(admin: httpx.AsyncClient, listed: list[dict[str, Any]], kind: str) -> tuple[str, int, bytes]:
    """Downloads the job's artifact of `kind` (a tar) and returns its one model file's name, size and first bytes."""
    entry = next(a for a in listed if a["kind"] == kind)
    resp = await admin.get(entry["download"])
    assert resp.status_code == 200, resp.text
    with tarfile.open(fileobj=io.BytesIO(resp.content)) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith((".gguf", ".safetensors")))
        f = tar.extractfile(member)
        assert f is not None
        return member.name.rsplit("/", 1)[1], member.size, f.read(4)


async def ended_since(calls: list[Call], adapter: str, since: float, count: int = 4, timeout_s: float = 90) -> None:
    """Waits until `count` of the adapter's calls that started after `since` have ended: under this load one
    takes seconds, so a fixed pause may see none."""
    deadline = time.monotonic() + timeout_s
    while sum(1 for c in calls if c.adapter == adapter and c.started > since) < count:
        assert time.monotonic() < deadline, f"fewer than {count} calls of {adapter} ended {timeout_s} s after {since}"
        await asyncio.sleep(0.25)


async def chat_direct(url: str, key: str, model: str) -> str:
    async with httpx.AsyncClient(timeout=60) as c:
        resp = await c.post(
            f"{url}/v1/chat/completions",
            headers={"Authorization": f"Bearer {key}"},
            json={"model": model, "messages": MSG, "max_tokens": 12, "temperature": 0},
        )
    assert resp.status_code == 200, resp.text
    return str(resp.json()["choices"][0]["message"]["content"])


async def test_switch_and_demote_under_load(fleet: Stack, tmp_path_factory: pytest.TempPathFactory) -> None:
    """Each adapter of PROMOTIONS is promoted, then demoted, while clients call it through both gateway
    replicas. Unquantized, its merged model answers exactly as its LoRA did: the deployment's request
    counter tells who answered. With AWQ the answers differ from the LoRA's, so each answer names its
    model; that promotion also exports a GGUF file, downloaded and checked here."""
    data_dir = tmp_path_factory.mktemp("switch-worker")
    worker = start_worker(data_dir, {**fleet.env, "GATEWAY_DATA_DIR": str(data_dir)})
    admin = httpx.AsyncClient(
        base_url=fleet.gateways[0], headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=60
    )
    calls: list[Call] = []
    clients: list[asyncio.Task[None]] = []
    stops: list[asyncio.Event] = []
    promoted: dict[str, dict[str, Any]] = {}
    demoted: dict[str, dict[str, Any]] = {}
    handles: dict[str, dict[str, Any]] = {}
    served_on_dedicated: dict[str, float] = {}
    read_at: dict[str, float] = {}
    artifacts: dict[str, list[dict[str, Any]]] = {}
    gguf_head: dict[str, tuple[str, int, bytes]] = {}
    awq_text = ""
    try:
        # One after the other (one worker runs one job at a time), so that this 2-core machine runs at
        # most one dedicated vLLM beside the two shared ones; two clients, one per replica, call the
        # adapter from before its promotion until after its demotion.
        for adapter, options in PROMOTIONS.items():
            calling = asyncio.Event()
            stops.append(calling)
            clients += [asyncio.create_task(load(fleet, calling, calls, adapter, g)) for g in (0, 1)]
            await ended_since(calls, adapter, 0.0)
            tenant, name = adapter.split("/")
            listed = (await admin.get(f"/admin/v1/tenants/{tenant}/adapters")).json()["data"]
            adapter_id = next(a["id"] for a in listed if a["name"] == name)
            body = {"max_model_len": 512, "resources": {"kv_cache_bytes": 64 << 20}, **options}
            resp = await admin.post(f"/admin/v1/adapters/{adapter_id}/promotions", json=body)
            assert resp.status_code == 202, resp.text
            job = promoted[adapter] = await wait_job(admin, resp.json()["id"], 600)
            assert job["state"] == "succeeded", (adapter, job["error"], job["log_tail"])
            switch = next(s for s in job["steps"] if s["name"] == "switch")["figures"]
            assert switch["replicas_behind"] == [] and switch["observed_s"] < 1.0, switch
            handle = handles[adapter] = await deployment_handle(
                fleet.env["GATEWAY_DATABASE_URL"], job["result"]["deployment_id"]
            )
            await ended_since(calls, adapter, step_window(job, "switch")[1])
            read_at[adapter] = time.time()
            verify = next(s for s in job["steps"] if s["name"] == "verify")["figures"]
            # Its request count, less the served gate's own (a greedy and a teacher-forced one per prompt).
            served = await dedicated_served(handle["url"], handle["api_key"])
            served_on_dedicated[adapter] = served - 2 * verify["prompts"]
            if options["quantization"] == "awq":
                awq_text = await chat_direct(handle["url"], handle["api_key"], handle["served_model_name"])
            artifacts[adapter] = (await admin.get(f"/admin/v1/jobs/{job['id']}/artifacts")).json()["data"]
            if "gguf" in options:
                gguf_head[adapter] = await artifact_head(admin, artifacts[adapter], "gguf")
            resp = await admin.delete(f"/admin/v1/deployments/{job['result']['deployment_id']}")
            assert resp.status_code == 202, resp.text
            job = demoted[adapter] = await wait_job(admin, resp.json()["id"], 180)
            assert job["state"] == "succeeded", (adapter, job["error"], job["log_tail"])
            await ended_since(calls, adapter, step_window(job, "unroute")[1])
            calling.set()
    finally:
        for event in stops:
            event.set()
        await asyncio.gather(*clients, return_exceptions=True)
        await admin.aclose()
        stop_process(worker)
        await stop_deployments(fleet.env["GATEWAY_DATABASE_URL"])  # after a failure: none outlives the test

    for adapter, job in promoted.items():
        mine = [c for c in calls if c.adapter == adapter]
        switch_start, switch_end = step_window(job, "switch")
        unroute_start, unroute_end = step_window(demoted[adapter], "unroute")
        failed = [c for c in mine if c.status != 200]
        # A call is routed some time after it starts (authentication, parsing) and before it ends.
        before = [c for c in mine if c.ended < switch_start]
        after = [c for c in mine if c.started > switch_end and c.ended < min(read_at[adapter], unroute_start)]
        back = [c for c in mine if c.started > unroute_end]
        steps = {s["name"]: s for s in job["steps"]}
        print(  # noqa: T201 - the drill's figures (-s)
            f"{adapter} ({PROMOTIONS[adapter]['quantization']}) under load: {len(mine)} requests, {len(failed)}"
            f" failed; {len(before)} started before the switch, {len(after)} after it was observed; the deployment"
            f" served {served_on_dedicated[adapter]:.0f}; switch observed in {steps['switch']['figures']['observed_s']} s;"
            f" steps {[(s['name'], s['seconds']) for s in job['steps']]}; served gate"
            f" { ({k: steps['verify']['figures'][k] for k in ('greedy_exact', 'top1_agreement')}) }; demotion"
            f" {[(s['name'], s['seconds']) for s in demoted[adapter]['steps']]}"
        )
        assert not failed, failed[:3]
        assert before and after and back
        lora = fleet.reference[adapter]
        # Routed before the switch began, or after the demotion took the route away: the LoRA path.
        assert all(c.text == lora for c in before + back), [c.text for c in before + back if c.text != lora][
            :3
        ]
        if PROMOTIONS[adapter]["quantization"] == "none":
            # The merged model answers token for token as the LoRA path did: the counter says who answered.
            # Every request routed after every replica had the new epoch went to the deployment; none that
            # started before the switch can have (the route did not exist yet).
            assert all(c.text == lora for c in mine)
            assert (
                len(after)
                <= served_on_dedicated[adapter]
                <= len([c for c in mine if c.started < read_at[adapter]]) - len(before)
            )
        else:
            quantize = steps["quantize"]["figures"]
            print(  # noqa: T201
                f"{adapter} AWQ quality against the merged model: KL {quantize['kl']:.4f} (max {quantize['max_kl']}),"
                f" top-1 {quantize['top1_agreement']:.3f} (min {quantize['min_top1']}); size {quantize['size_before_bytes']}"
                f" -> {quantize['size_after_bytes']} B; LoRA answer {lora!r}, AWQ answer {awq_text!r}"
            )
            assert (
                quantize["kl"] <= TINY_AWQ_GATES["max_kl"] and quantize["top1_agreement"] >= TINY_AWQ_GATES["min_top1"]
            )
            assert awq_text != lora  # the AWQ model's answer tells it apart
            # Routed after the switch was observed and before the demotion began: the quantized model's
            # answer, every time (those still running at the unroute finish there); during either switch,
            # one model's or the other's, never anything else.
            routed = [c for c in mine if c.started > switch_end and c.ended < unroute_start]
            assert all(c.text == awq_text for c in routed), [c.text for c in routed if c.text != awq_text][:3]
            assert all(c.text in (lora, awq_text) for c in mine)
            assert len(after) <= served_on_dedicated[adapter]
            assert quantize["size_after_bytes"] < quantize["size_before_bytes"]
        if "gguf" in PROMOTIONS[adapter]:
            gguf, quant_type = steps["gguf"]["figures"], PROMOTIONS[adapter]["gguf"]["quant_type"]
            print(  # noqa: T201
                f"{adapter} GGUF {gguf['type']}: logprob diff {gguf['logprob_diff']:.4f} (max {gguf['max_logprob_diff']}),"
                f" KL {gguf['kl']:.4f}, top-1 {gguf['top1_agreement']:.3f}; {gguf['size_after_bytes']} B"
            )
            assert gguf["passed"] is True and gguf["tokenizer_match"] == 1.0 and gguf["type"] == quant_type
            assert gguf_head[adapter] == (f"model-{quant_type}.gguf", gguf["size_after_bytes"], b"GGUF")
        kinds = ["merged", "awq"] if PROMOTIONS[adapter]["quantization"] == "awq" else ["merged"]
        assert sorted(a["kind"] for a in artifacts[adapter]) == sorted(kinds + ["gguf"] * ("gguf" in PROMOTIONS[adapter]))
