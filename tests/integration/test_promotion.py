"""Promotion end to end on the tiny model: upload -> promote (quantization none) -> a dedicated vLLM CPU
server -> the tenant's greedy output through the gateway is token for token the LoRA path's -> demote ->
the LoRA path again; and promote with AWQ (plus a GGUF file) -> the int4 deployment answers through the
gateway under the same model name, its quality figures against the merged model within the gates ->
demote. The worker is the real `lora-gateway worker` process; the deployments real vLLM servers."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import sqlite3
import subprocess
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.integration.conftest import (
    CALIBRATION,
    TINY_AWQ_GATES,
    Gateway,
    start_worker,
    stop_deployments,
    stop_process,
    upload,
    vllm_venv,
)

pytestmark = pytest.mark.vllm
PROMPT = "The gateway routes each request to"


@pytest.fixture(scope="module")
def worker(gateway: Gateway) -> Iterator[subprocess.Popen[bytes]]:
    vllm_venv()  # skips without the vLLM CPU build
    proc = start_worker(gateway.data_dir)
    try:
        yield proc
    finally:
        stop_process(proc)
        db_url = f"sqlite+aiosqlite:///{(gateway.data_dir / 'gateway.db').resolve()}"
        asyncio.run(stop_deployments(db_url))  # after a failure: no deployment outlives the tests


def wait_job(admin: httpx.Client, job_id: str, timeout_s: float = 300) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        job = admin.get(f"/admin/v1/jobs/{job_id}").json()
        if job["state"] in ("succeeded", "failed", "cancelled"):
            return dict(job)
        assert time.monotonic() < deadline, f"job still {job['state']} at step {job['step']}: {job['log_tail']}"
        time.sleep(0.5)


def complete(gateway: Gateway, model: str) -> str:
    with gateway.tenant_client("acme") as c:
        resp = c.post("/v1/completions", json={"model": model, "prompt": PROMPT, "max_tokens": 12, "temperature": 0})
    assert resp.status_code == 200, resp.text
    assert resp.json()["model"] == model
    return str(resp.json()["choices"][0]["text"])


def deployment_handle(gateway: Gateway, dep_id: str) -> dict[str, Any]:
    """The deployment's URL and token, read from the registry (the admin API never shows them)."""
    with sqlite3.connect(gateway.data_dir / "gateway.db") as db:
        row = db.execute("SELECT handle FROM deployments WHERE id = ?", (dep_id.replace("-", ""),)).fetchone()
    return dict(json.loads(row[0]))


def served_requests(handle: dict[str, Any]) -> float:
    text = httpx.get(
        f"{handle['url']}/metrics", headers={"Authorization": f"Bearer {handle['api_key']}"}, timeout=10
    ).text
    return sum(
        float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith("vllm:request_success_total")
    )


def test_promote_none_then_demote(gateway: Gateway, tiny, worker: subprocess.Popen[bytes]) -> None:  # type: ignore[no-untyped-def]
    admin = gateway.admin
    adapter = upload(admin, "acme", "promo", tiny.adapters[1])
    lora_text = complete(gateway, "promo")

    resp = admin.post(
        f"/admin/v1/adapters/{adapter['id']}/promotions",
        json={
            "quantization": "none",
            "serve_dtype": "float32",
            "max_model_len": 512,
            "resources": {"kv_cache_bytes": 64 << 20},
            "gates": {"served_min_exact": 1.0, "served_min_top1": 1.0},
        },
    )
    assert resp.status_code == 202, resp.text
    again = admin.post(f"/admin/v1/adapters/{adapter['id']}/promotions", json={"quantization": "none"})
    assert again.status_code == 409, again.text  # one job per adapter at a time
    job = wait_job(admin, resp.json()["id"])
    assert job["state"] == "succeeded", (job["error"], job["log_tail"])
    steps = {s["name"]: s for s in job["steps"]}
    assert list(steps) == ["merge", "launch", "verify", "switch"]
    for step in job["steps"]:
        figures = json.dumps(step.get("figures") or {})[:300]
        print(f"promotion step {step['name']}: {step['seconds']:.2f} s {figures}")  # noqa: T201 - figures (-s)
    assert steps["merge"]["figures"]["logits_max_abs_diff"] <= 1e-3
    assert steps["verify"]["figures"]["greedy_exact"] == 1.0
    assert steps["verify"]["figures"]["top1_agreement"] == 1.0
    assert steps["switch"]["figures"]["replicas_behind"] == []
    assert steps["switch"]["figures"]["observed_s"] < 1.0

    dep_id = job["result"]["deployment_id"]
    deps = {d["id"]: d for d in admin.get("/admin/v1/deployments").json()["data"]}
    assert deps[dep_id]["active"] is True and deps[dep_id]["state"] == "ready"
    handle = deployment_handle(gateway, dep_id)
    before = served_requests(handle)
    assert complete(gateway, "promo") == lora_text  # token for token, now from the merged model
    assert served_requests(handle) == before + 1  # ... and it was the dedicated deployment that answered

    # Artifacts: listed with size and sha256, downloadable as a tar whose manifest has that digest.
    arts = admin.get(f"/admin/v1/jobs/{job['id']}/artifacts").json()["data"]
    assert [a["kind"] for a in arts] == ["merged"]
    with admin.stream("GET", arts[0]["download"]) as r:
        assert r.status_code == 200
        blob = r.read()
    with tarfile.open(fileobj=io.BytesIO(blob)) as tar:
        names = tar.getnames()
        manifest = tar.extractfile(f"{arts[0]['name']}/manifest.json")
        assert manifest is not None
        assert hashlib.sha256(manifest.read()).hexdigest() == arts[0]["sha256"]
    assert f"{arts[0]['name']}/model.safetensors" in names

    demote = admin.delete(f"/admin/v1/deployments/{dep_id}")
    assert demote.status_code == 202, demote.text
    done = wait_job(admin, demote.json()["id"], timeout_s=120)
    assert done["state"] == "succeeded", (done["error"], done["log_tail"])
    assert [s["name"] for s in done["steps"]] == ["unroute", "drain", "stop"]
    assert admin.get(f"/admin/v1/deployments/{dep_id}").json()["state"] == "stopped"
    assert not Path(f"/proc/{handle['ref']['pid']}").exists() or _zombie(handle["ref"]["pid"])
    assert complete(gateway, "promo") == lora_text  # the LoRA path again


def test_promote_awq_with_gguf_then_demote(gateway: Gateway, tiny, worker: subprocess.Popen[bytes]) -> None:  # type: ignore[no-untyped-def]
    admin = gateway.admin
    adapter = upload(admin, "acme", "promo-awq", tiny.adapters[2])
    lora_text = complete(gateway, "promo-awq")
    resp = admin.post(
        f"/admin/v1/adapters/{adapter['id']}/promotions",
        json={
            "quantization": "awq",
            "calibration_texts": CALIBRATION,
            "gguf": {"quant_type": "Q8_0", "pre_tokenizer": "gpt-2"},
            "max_model_len": 512,
            "resources": {"kv_cache_bytes": 64 << 20},
            "gates": TINY_AWQ_GATES,
        },
    )
    assert resp.status_code == 202, resp.text
    job = wait_job(admin, resp.json()["id"], timeout_s=600)
    assert job["state"] == "succeeded", (job["error"], job["log_tail"])
    steps = {s["name"]: s for s in job["steps"]}
    assert list(steps) == ["merge", "gguf", "quantize", "launch", "verify", "switch"]
    quantize, verify, gguf = steps["quantize"]["figures"], steps["verify"]["figures"], steps["gguf"]["figures"]
    print(  # noqa: T201 - the AWQ promotion's figures (-s)
        f"AWQ promotion: steps {[(s['name'], s['seconds']) for s in job['steps']]}; quality against the merged"
        f" model: KL {quantize['kl']:.4f} (max {quantize['max_kl']}), top-1 {quantize['top1_agreement']:.3f}"
        f" (min {quantize['min_top1']}); size {quantize['size_before_bytes']} -> {quantize['size_after_bytes']} B;"
        f" served gate vs the LoRA path: top-1 {verify['top1_agreement']:.3f}, greedy exact {verify['greedy_exact']:.2f};"
        f" GGUF {gguf['type']}: logprob diff {gguf['logprob_diff']:.4f}, {gguf['size_after_bytes']} B"
    )
    assert quantize["kl"] <= TINY_AWQ_GATES["max_kl"] and quantize["top1_agreement"] >= TINY_AWQ_GATES["min_top1"]
    assert quantize["size_after_bytes"] < quantize["size_before_bytes"]
    assert verify["top1_agreement"] >= TINY_AWQ_GATES["served_min_top1"]
    assert gguf["passed"] is True and gguf["logprob_diff"] <= 0.15 and gguf["tokenizer_match"] == 1.0

    dep_id = job["result"]["deployment_id"]
    handle = deployment_handle(gateway, dep_id)
    with sqlite3.connect(gateway.data_dir / "gateway.db") as db:
        served_name = db.execute(
            "SELECT served_model_name FROM deployments WHERE id = ?", (dep_id.replace("-", ""),)
        ).fetchone()[0]
    direct = httpx.post(
        f"{handle['url']}/v1/completions",
        headers={"Authorization": f"Bearer {handle['api_key']}"},
        json={"model": served_name, "prompt": PROMPT, "max_tokens": 12, "temperature": 0},
        timeout=120,
    )
    assert direct.status_code == 200, direct.text
    awq_text = direct.json()["choices"][0]["text"]
    assert awq_text != lora_text  # int4 noise on the tiny model changes its greedy answer: it tells them apart
    before = served_requests(handle)
    assert complete(gateway, "promo-awq") == awq_text  # the tenant's name, now the AWQ deployment's answer
    assert served_requests(handle) == before + 1

    arts = {a["kind"]: a for a in admin.get(f"/admin/v1/jobs/{job['id']}/artifacts").json()["data"]}
    assert sorted(arts) == ["awq", "gguf", "merged"]
    assert arts["awq"]["size_bytes"] < arts["merged"]["size_bytes"]
    with admin.stream("GET", arts["gguf"]["download"]) as r:
        assert r.status_code == 200
        blob = r.read()
    with tarfile.open(fileobj=io.BytesIO(blob)) as tar:
        member = tar.getmember(f"{arts['gguf']['name']}/model-Q8_0.gguf")
        assert member.size == gguf["size_after_bytes"]
        head = tar.extractfile(member)
        assert head is not None and head.read(4) == b"GGUF"

    demote = admin.delete(f"/admin/v1/deployments/{dep_id}")
    assert demote.status_code == 202, demote.text
    done = wait_job(admin, demote.json()["id"], timeout_s=120)
    assert done["state"] == "succeeded", (done["error"], done["log_tail"])
    assert complete(gateway, "promo-awq") == lora_text  # the LoRA path again


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True
