"""The worker under failure: a corrupt adapter, a failing gate, a quantizer crash, a deployment that never
becomes ready, a cancel mid-step, a worker killed mid-step. Each time: routing untouched, the job failed
(or resumed) with a readable error, no process left running, no half-written artifact.

The ML steps and the launched processes are real subprocesses. Where a fault cannot be caused for real
here (a quantizer dying of a signal, a vLLM that hangs before /health), a small script stands in for the
program, and the test says so."""

from __future__ import annotations

import asyncio
import os
import signal
import stat
import subprocess
import sys
import time
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select, update

from app.db.models import Deployment, Job, JobState, RoutingEpoch
from app.db.session import create_engine, create_sessionmaker
from app.devkit.tinymodel import TinyModel, build_tiny_model
from app.promotion import jobs
from app.promotion.launchers.local import LocalConfig, LocalLauncher
from app.promotion.worker import REPO_ROOT, Worker, worker_config
from app.settings import Settings
from tests.conftest import ADMIN_KEY
from tests.factories import registry


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> TinyModel:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-worker"), n_adapters=1, base_model_name="tiny-llama")


@pytest.fixture
def db_kind() -> str:
    return "sqlite"  # one database is enough for subprocess-heavy tests; claim races run on both below


def script(tmp_path: Path, name: str, body: str) -> str:
    path = tmp_path / name
    path.write_text(body)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return str(path)


async def setup_adapter(admin: httpx.AsyncClient, tiny: TinyModel) -> str:
    await registry.tenant(admin)
    resp = await admin.post("/admin/v1/base-models", json={"name": "tiny-llama", "path": str(tiny.base)})
    assert resp.status_code == 201, resp.text
    files = [("file", (p.name, p.read_bytes())) for p in sorted(tiny.adapters[0].glob("adapter_*"))]
    up = await admin.post("/admin/v1/tenants/acme/adapters", data={"name": "hot"}, files=files)
    assert up.status_code == 201, up.text
    return str(up.json()["id"])


async def promote(admin: httpx.AsyncClient, adapter: str, **body: Any) -> str:
    resp = await admin.post(f"/admin/v1/adapters/{adapter}/promotions", json={"quantization": "none", **body})
    assert resp.status_code == 202, resp.text
    return str(resp.json()["id"])


def make_worker(settings: Settings, *, vllm_python: str = "/bin/false", **overrides: Any) -> Worker:
    config = replace(worker_config(settings), lease_s=3.0, ready_timeout_s=4.0, **overrides)
    launcher = LocalLauncher(LocalConfig(python=vllm_python, log_dir=settings.DATA_DIR / "deployments"))
    sessionmaker = create_sessionmaker(create_engine(settings.DATABASE_URL))
    return Worker(sessionmaker, config, {"local": launcher})


async def job_of(admin: httpx.AsyncClient, job_id: str) -> dict[str, Any]:
    resp = await admin.get(f"/admin/v1/jobs/{job_id}")
    assert resp.status_code == 200
    return dict(resp.json())


def assert_nothing_half_written(settings: Settings) -> None:
    staging = settings.artifact_root / ".staging"
    assert not staging.exists() or not list(staging.iterdir())
    for kind in ("merged", "awq", "gguf"):
        for folder in (settings.artifact_root / kind).glob("*") if (settings.artifact_root / kind).exists() else ():
            assert (folder / "manifest.json").is_file(), f"unsealed artifact {folder}"


async def assert_routing_untouched(worker: Worker) -> None:
    async with worker.sessionmaker() as session:
        assert await session.scalar(select(func.count()).select_from(RoutingEpoch)) == 0
        active = await session.scalar(select(func.count()).select_from(Deployment).where(Deployment.active))
        assert active == 0


def ml_processes(marker: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
            except OSError:
                continue
            if marker in cmd and state != "Z":
                pids.append(int(entry.name))
    return pids


async def test_corrupt_adapter_fails_cleanly(admin: httpx.AsyncClient, settings: Settings, tiny: TinyModel) -> None:
    adapter = await setup_adapter(admin, tiny)
    for f in settings.store_root.rglob("adapter_model.safetensors"):
        f.chmod(0o644)
        f.write_bytes(b"\x00not a safetensors file" * 10)
    job_id = await promote(admin, adapter)
    worker = make_worker(settings)
    assert await worker.run_once()
    job = await job_of(admin, job_id)
    assert job["state"] == "failed"
    assert job["error"].startswith("merge: the step crashed"), job["error"]
    assert [s["state"] for s in job["steps"]] == ["failed"]
    assert job["log_tail"]  # what the step said before it died
    assert_nothing_half_written(settings)
    await assert_routing_untouched(worker)


async def test_failing_gate_stops_before_anything_is_switched(
    admin: httpx.AsyncClient, settings: Settings, tiny: TinyModel
) -> None:
    adapter = await setup_adapter(admin, tiny)
    job_id = await promote(admin, adapter, gates={"logits_tolerance": 1e-12})
    worker = make_worker(settings)
    assert await worker.run_once()
    job = await job_of(admin, job_id)
    assert job["state"] == "failed"
    assert "gate failed" in job["error"] and "merged logits differ" in job["error"], job["error"]
    figures = job["steps"][0]["figures"]
    assert figures["passed"] is False and figures["logits_max_abs_diff"] > 1e-12
    assert not (settings.artifact_root / "merged").exists() or not list((settings.artifact_root / "merged").iterdir())
    assert_nothing_half_written(settings)
    await assert_routing_untouched(worker)


async def test_gguf_gate_failure_stops_the_promotion_before_launch(
    admin: httpx.AsyncClient, settings: Settings, tiny: TinyModel
) -> None:
    # The real GGUF step (llama.cpp's converter, in .venv-gguf) with a gate no export can meet: F16 still
    # rounds the float32 weights. The admin asked for the file, so its failure fails the promotion.
    adapter = await setup_adapter(admin, tiny)
    job_id = await promote(
        admin, adapter, gguf={"quant_type": "f16", "pre_tokenizer": "gpt-2"}, gates={"gguf_max_logprob_diff": 1e-9}
    )
    worker = make_worker(settings, gguf_python=str(REPO_ROOT / ".venv-gguf" / "bin" / "python"))
    assert await worker.run_once()
    job = await job_of(admin, job_id)
    assert job["state"] == "failed", job
    assert job["error"].startswith("gguf: gate failed"), job["error"]
    assert [(s["name"], s["state"]) for s in job["steps"]] == [("merge", "done"), ("gguf", "failed")]
    figures = job["steps"][1]["figures"]
    assert figures["passed"] is False and figures["logprob_diff"] > 1e-9 and figures["type"] == "F16", figures
    assert not (settings.artifact_root / "gguf").exists() or not list((settings.artifact_root / "gguf").iterdir())
    assert (await admin.get("/admin/v1/deployments")).json()["data"] == []  # nothing launched
    assert_nothing_half_written(settings)
    await assert_routing_untouched(worker)


async def test_a_worker_without_the_gguf_environment_says_so(
    admin: httpx.AsyncClient, settings: Settings, tiny: TinyModel, tmp_path: Path
) -> None:
    adapter = await setup_adapter(admin, tiny)
    job_id = await promote(admin, adapter, gguf={"quant_type": "Q8_0"})
    worker = make_worker(settings, gguf_python=str(tmp_path / "no-venv" / "bin" / "python"))
    assert await worker.run_once()
    job = await job_of(admin, job_id)
    assert job["state"] == "failed"
    assert job["error"].startswith("gguf: this worker has no gguf environment"), job["error"]
    assert "make gguf" in job["error"]
    assert [(s["name"], s["state"]) for s in job["steps"]] == [("merge", "done"), ("gguf", "failed")]
    assert_nothing_half_written(settings)
    await assert_routing_untouched(worker)


async def test_promotion_options_are_checked_at_the_door(
    admin: httpx.AsyncClient, settings: Settings, tiny: TinyModel
) -> None:
    adapter = await setup_adapter(admin, tiny)
    for body, param in (
        ({"gguf": {"quant_type": "Q3_XYZ"}}, "gguf.quant_type"),
        ({"gguf": {"quant_type": "IQ2_XS"}}, "gguf.quant_type"),  # needs an importance matrix
        ({"gguf": {"pre_tokenizer": "../../etc"}}, "gguf.pre_tokenizer"),
        ({"gguf": {"pre_tokenizer": "gpt-3"}}, "gguf.pre_tokenizer"),  # well-formed, unknown to llama.cpp
        ({"gates": {"gguf_max_logprob_diff": 0}}, "gates.gguf_max_logprob_diff"),
    ):
        resp = await admin.post(f"/admin/v1/adapters/{adapter}/promotions", json={"quantization": "none", **body})
        assert resp.status_code == 400, (body, resp.text)
        error = resp.json()["error"]
        assert error["type"] == "invalid_request_error" and error["param"] == param, (body, error)
    assert (await admin.get("/admin/v1/jobs")).json()["data"] == []  # nothing queued


async def test_quantizer_crash(admin: httpx.AsyncClient, settings: Settings, tiny: TinyModel, tmp_path: Path) -> None:
    # Stand-in for the quantizer (a fault we cannot cause on demand in llm-compressor): it reports
    # progress, writes part of its output, then dies of SIGKILL as an out-of-memory kill would.
    crash = script(
        tmp_path,
        "crashing-quantizer",
        "#!/bin/sh\n"
        'out=""; while [ $# -gt 0 ]; do [ "$1" = --out ] && out=$2; shift; done\n'
        "echo '@@lgw {\"event\": \"progress\", \"step\": \"quantize\", \"fraction\": 0.3, \"message\": \"layer 1\"}'\n"
        'echo partial > "$out/model.safetensors"\n'
        "echo 'quantizing layer 1 of 2' >&2\n"
        "kill -9 $$\n",
    )
    adapter = await setup_adapter(admin, tiny)
    job_id = await promote(admin, adapter, quantization="awq")
    worker = make_worker(settings, quantizer_python=crash)
    assert await worker.run_once()
    job = await job_of(admin, job_id)
    assert job["state"] == "failed"
    assert job["error"].startswith("quantize: the step crashed (exit status -9)"), job["error"]
    assert "quantizing layer 1 of 2" in job["log_tail"]
    assert [s["name"] for s in job["steps"]] == ["merge", "quantize"]
    assert len(list((settings.artifact_root / "merged").iterdir())) == 1  # sealed, reusable by a retry
    assert not (settings.artifact_root / "awq").exists()
    assert_nothing_half_written(settings)
    await assert_routing_untouched(worker)


async def test_launch_that_never_becomes_ready(
    admin: httpx.AsyncClient, settings: Settings, tiny: TinyModel, tmp_path: Path
) -> None:
    # Stand-in for a vLLM that hangs before serving (a real one takes 30 s+ to get there): it never
    # opens its port.
    hang = script(tmp_path, "hanging-vllm", "#!/bin/sh\necho 'loading weights...'\nexec sleep 3600\n")
    adapter = await setup_adapter(admin, tiny)
    job_id = await promote(admin, adapter)
    worker = make_worker(settings, vllm_python=hang)
    assert await worker.run_once()
    job = await job_of(admin, job_id)
    assert job["state"] == "failed"
    assert job["error"].startswith("launch: vLLM was not ready after 4 s"), job["error"]
    assert "loading weights..." in job["error"]
    deps = (await admin.get("/admin/v1/deployments")).json()["data"]
    assert [(d["state"], d["active"]) for d in deps] == [("failed", False)]
    assert ml_processes("sleep 3600") == []  # the hung server was stopped
    await assert_routing_untouched(worker)


async def test_cancel_during_merge(admin: httpx.AsyncClient, settings: Settings, tiny: TinyModel) -> None:
    adapter = await setup_adapter(admin, tiny)
    job_id = await promote(admin, adapter)
    worker = make_worker(settings)  # its lease (3 s) is renewed, and the cancel seen, every second
    task = asyncio.create_task(worker.run_once())
    deadline = time.monotonic() + 30
    while not ml_processes(f"{job_id}-"):  # the merge subprocess, writing into this job's staging folder
        assert time.monotonic() < deadline and not task.done()
        await asyncio.sleep(0.05)
    cancel = await admin.post(f"/admin/v1/jobs/{job_id}/cancel")
    assert cancel.status_code == 202 and cancel.json()["cancel_requested"] is True
    assert await asyncio.wait_for(task, 30)
    job = await job_of(admin, job_id)
    assert job["state"] == "cancelled", job["error"]
    assert ml_processes(f"{job_id}-") == []
    assert_nothing_half_written(settings)
    again = await admin.post(f"/admin/v1/jobs/{job_id}/cancel")
    assert again.status_code == 409


def start_worker(settings: Settings, log: Path) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    env |= {
        "GATEWAY_DATABASE_URL": settings.DATABASE_URL,
        "GATEWAY_DATA_DIR": str(settings.DATA_DIR),
        "GATEWAY_ADMIN_API_KEY": ADMIN_KEY,
        "GATEWAY_JOB_LEASE_S": "3",
        "GATEWAY_WORKER_POLL_S": "0.2",
        "GATEWAY_LOCAL_VLLM_PYTHON": "/bin/false",  # the launch fails at once: this test is about the merge
    }
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "app.cli", "worker"], env=env, stdout=out, stderr=subprocess.STDOUT, cwd=REPO_ROOT
        )


async def test_worker_killed_mid_step_is_resumed(
    admin: httpx.AsyncClient, settings: Settings, tiny: TinyModel, tmp_path: Path
) -> None:
    adapter = await setup_adapter(admin, tiny)
    job_id = await promote(admin, adapter)
    first = start_worker(settings, tmp_path / "worker.log")
    try:
        deadline = time.monotonic() + 60
        while not (merging := ml_processes(f"{job_id}-")):
            assert time.monotonic() < deadline and first.poll() is None, (tmp_path / "worker.log").read_text()
            await asyncio.sleep(0.05)
        first.send_signal(signal.SIGKILL)
        first.wait()
        deadline = time.monotonic() + 5
        while set(merging) & set(ml_processes(f"{job_id}-")):
            assert time.monotonic() < deadline, "the merge outlived its worker"
            await asyncio.sleep(0.05)
    finally:
        first.kill()
    assert (await job_of(admin, job_id))["state"] == "running"  # its lease still runs out
    second = start_worker(settings, tmp_path / "worker.log")
    try:
        deadline = time.monotonic() + 90
        while (job := await job_of(admin, job_id))["state"] == "running":
            assert time.monotonic() < deadline, (tmp_path / "worker.log").read_text()
            await asyncio.sleep(0.2)
    finally:
        second.terminate()
        second.wait(20)
    assert job["attempts"] == 2
    assert [(s["name"], s["state"]) for s in job["steps"]] == [
        ("merge", "interrupted"),
        ("merge", "done"),
        ("launch", "failed"),
    ]
    assert job["state"] == "failed" and job["error"].startswith("launch: vLLM exited before it was ready")
    assert len(list((settings.artifact_root / "merged").iterdir())) == 1
    assert_nothing_half_written(settings)


@pytest.mark.parametrize("kind", ["postgres", "sqlite"])
async def test_claims_are_exclusive_and_expired_leases_taken_over(
    kind: str, migrated: dict[str, str]
) -> None:
    engine = create_engine(migrated[kind])
    sessionmaker = create_sessionmaker(engine)
    try:
        async with sessionmaker() as session:
            job = await jobs.enqueue(session, kind=jobs.PROMOTE, adapter_id=None, params={})
            await session.commit()
            job_id = job.id

        async def claim(owner: str) -> Job | None:
            async with sessionmaker() as session:
                return await jobs.claim(session, owner=owner, lease_s=30)

        got = await asyncio.gather(*(claim(f"w{i}") for i in range(6)))
        winners = [j for j in got if j is not None and j.id == job_id]
        assert len(winners) == 1 and winners[0].attempts == 1
        owner = winners[0].lease_owner
        assert await claim("late") is None  # held: nobody else gets it
        async with sessionmaker() as session:  # its worker stops renewing: the lease runs out
            await session.execute(update(Job).where(Job.id == job_id).values(lease_until=jobs.now() - timedelta(seconds=1)))
            await session.commit()
        taken = await claim("rescuer")
        assert taken is not None and taken.id == job_id and taken.attempts == 2
        async with sessionmaker() as session:
            held, _ = await jobs.renew(session, job_id=job_id, owner=str(owner), lease_s=30, changes={})
            assert not held  # the first worker learns it lost the job and stops
            assert await jobs.finish(session, job_id=job_id, owner="rescuer", state=JobState.SUCCEEDED, changes={})
            await session.execute(Job.__table__.delete().where(Job.id == job_id))
            await session.commit()
    finally:
        await engine.dispose()
