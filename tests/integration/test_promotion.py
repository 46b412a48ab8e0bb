"""Promotion end to end on the tiny model: upload -> promote (quantization none) -> a dedicated vLLM CPU
server -> the tenant's greedy output through the gateway is token for token the LoRA path's -> demote ->
the LoRA path again. The worker is the real `lora-gateway worker` process; the deployment a real vLLM.
AWQ (with a GGUF file) runs end to end in the switch drill (test_promotion_switch.py)."""

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


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True
