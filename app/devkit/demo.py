"""`lora-gateway demo` (what `make run` starts): the whole product on embedded defaults, offline.

Builds the tiny model and two demo adapters if missing, starts vLLM's CPU build on it, starts the
gateway (SQLite), registers base model, backend, a demo tenant and its adapters through the admin API,
and prints a working API key with an `openai` snippet. Idempotent across runs."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import signal
import socket
from collections.abc import Iterator
from pathlib import Path

import httpx
import uvicorn
from rich.console import Console

from app import logs, security
from app.backends.launcher import VllmCpuConfig, VllmCpuServer
from app.main import create_app
from app.settings import Settings

BASE = "tiny-llama"
TENANT = "demo"
ADAPTERS = ("support", "legal")
console = Console(soft_wrap=True)


async def _ok(resp: httpx.Response, *allowed: int) -> httpx.Response:
    if resp.is_success or resp.status_code in allowed:
        return resp
    raise RuntimeError(f"{resp.request.method} {resp.request.url.path}: {resp.status_code} {resp.text}")


def _adapter_files(folder: Path) -> list[tuple[str, tuple[str, bytes]]]:
    return [("file", (p.name, p.read_bytes())) for p in sorted(folder.glob("adapter_*"))]


async def _register(
    admin: httpx.AsyncClient, model_dir: Path, adapter_dirs: tuple[Path, ...], vllm_url: str, vllm_key: str
) -> None:
    await _ok(await admin.post("/base-models", json={"name": BASE, "path": str(model_dir)}), 409)
    backend = await admin.get("/backends/demo-cpu")
    if backend.status_code == 200 and backend.json()["url"] != vllm_url:
        await _ok(await admin.delete("/backends/demo-cpu"))
    await _ok(
        await admin.post(
            "/backends",
            json={
                "name": "demo-cpu",
                "url": vllm_url,
                "base_model": BASE,
                "gpu_slots": 4,
                "max_lora_rank": 8,
                "capacity": 8,
                "api_key": vllm_key,
            },
        ),
        409,
    )
    # Registered by an earlier run: this run's vLLM has a new token.
    await _ok(await admin.patch("/backends/demo-cpu", json={"api_key": vllm_key}))
    await _ok(await admin.post("/tenants", json={"name": TENANT, "display_name": "Demo tenant"}), 409)
    existing = {a["name"] for a in (await admin.get(f"/tenants/{TENANT}/adapters")).json()["data"]}
    for name, folder in zip(ADAPTERS, adapter_dirs, strict=True):
        if name in existing:
            continue
        files = await asyncio.to_thread(_adapter_files, folder)
        await _ok(await admin.post(f"/tenants/{TENANT}/adapters", data={"name": name}, files=files))


async def _demo_key(admin: httpx.AsyncClient, gateway_url: str, key_file: Path) -> str:
    """The demo tenant's key, kept (0600) beside the database so re-runs print the same working key."""
    key = await asyncio.to_thread(security.read_secret_file, key_file)
    if key:
        async with httpx.AsyncClient() as c:
            if (
                await c.get(f"{gateway_url}/v1/models", headers={"Authorization": f"Bearer {key}"})
            ).status_code == 200:
                return key
    created = await _ok(await admin.post(f"/tenants/{TENANT}/api-keys", json={"name": "make-run"}))
    key = str(created.json()["key"])
    await asyncio.to_thread(security.write_secret_file, key_file, key)
    return key


def _snippet(url: str, key: str) -> str:
    return f'''from openai import OpenAI

client = OpenAI(base_url="{url}/v1", api_key="{key}")
response = client.chat.completions.create(
    model="support",
    messages=[{{"role": "user", "content": "My billing invoice shows the wrong amount."}}],
    max_tokens=32,
)
print(response.choices[0].message.content)'''


async def run_demo(settings: Settings, *, admin_key: str, vllm_venv: Path, vllm_port: int) -> None:
    from app.devkit.tinymodel import build_tiny_model  # torch & co. only here, never in the gateway

    data = settings.DATA_DIR
    console.print("building the tiny demo model and adapters (first run only) ...")
    tiny = await asyncio.to_thread(
        build_tiny_model, data / "demo-model", n_adapters=len(ADAPTERS), base_model_name=BASE
    )

    vllm = VllmCpuServer(
        VllmCpuConfig(
            model=tiny.base,
            served_model_name=BASE,
            venv=vllm_venv,
            port=vllm_port,
            max_loras=4,
            max_lora_rank=8,
            max_cpu_loras=8,
            kv_cache_bytes=64 << 20,
            log_path=data / "vllm.log",
            # vLLM's runtime LoRA API loads any path it is given: only the gateway may call it.
            api_key=secrets.token_urlsafe(32),
        )
    )
    for what, host, port in (("vLLM", "127.0.0.1", vllm_port), ("the gateway", settings.HOST, settings.PORT)):
        if not _port_free(host, port):
            # Never register whatever else answers there as our backend (or serve beside it).
            raise SystemExit(
                f"port {port} ({what}) is taken by another process: stop it, or choose other ports "
                "(make run PORT=8090 VLLM_PORT=8011)"
            )
    console.print(f"starting vLLM (CPU build) on port {vllm_port}; log: {data / 'vllm.log'} ...")
    vllm.start()
    server = _Server(
        uvicorn.Config(
            create_app(settings),
            host=settings.HOST,
            port=settings.PORT,
            loop="none",
            http="httptools",
            log_level="warning",
        )
    )
    logs.configure(settings.LOG_LEVEL, settings.LOG_FORMAT)  # after uvicorn's own set-up: ours wins
    # Ctrl-C or SIGTERM ends the gateway; the finally below then stops vLLM too.
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, server.handle_exit, sig, None)
    serving = asyncio.create_task(server.serve())
    url = f"http://{settings.HOST}:{settings.PORT}"
    try:
        while not server.started:
            if serving.done():
                serving.result()
                raise RuntimeError("the gateway stopped during start-up")
            await asyncio.sleep(0.1)
        async with httpx.AsyncClient(
            base_url=f"{url}/admin/v1", headers={"Authorization": f"Bearer {admin_key}"}, timeout=120
        ) as admin:
            assert vllm.config.api_key is not None
            await _register(admin, tiny.base, tiny.adapters, vllm.base_url, vllm.config.api_key)
            key = await _demo_key(admin, url, data / "demo-api-key")
        await vllm.wait_ready_async()
        console.print(
            f"\n[bold green]LoRA Gateway is serving {BASE} with adapters {', '.join(ADAPTERS)}[/bold green]"
        )
        console.print(f"gateway:        {url}   (vLLM: {vllm.base_url}, ready in {vllm.startup_s:.0f} s)")
        console.print(f"admin API key:  {admin_key}")
        console.print(f"tenant API key: {key}   (tenant '{TENANT}')\n")
        console.print(f"curl {url}/v1/models -H 'Authorization: Bearer {key}'\n")
        console.print(_snippet(url, key), highlight=False)
        console.print("\nCtrl-C stops the gateway and vLLM.")
        watch = asyncio.create_task(_watch(vllm, server, data / "vllm.log"))
        try:
            await serving
        finally:
            watch.cancel()
    finally:
        server.should_exit = True
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await asyncio.wait_for(serving, 10)
        vllm.stop()


def _port_free(host: str, port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


async def _watch(vllm: VllmCpuServer, server: uvicorn.Server, log: Path) -> None:
    """vLLM died after start-up: say so and stop, rather than serve 503s without a word."""
    while vllm.returncode is None:  # noqa: ASYNC110 - a child process exit has no awaitable here
        await asyncio.sleep(1)
    console.print(f"[bold red]vLLM exited (status {vllm.returncode}); its log: {log}. Stopping.[/bold red]")
    server.should_exit = True


class _Server(uvicorn.Server):
    """uvicorn, minus its signal capture: it re-raises the signal once the server is down, which ends the
    event loop before the demo could stop vLLM (a KeyboardInterrupt inside a task leaves the loop at
    once). The demo installs its own handlers instead."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def main(settings: Settings, *, admin_key: str, vllm_venv: Path, vllm_port: int) -> None:
    import uvloop

    uvloop.run(run_demo(settings, admin_key=admin_key, vllm_venv=vllm_venv, vllm_port=vllm_port))
