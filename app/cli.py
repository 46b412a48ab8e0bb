"""`lora-gateway` command line: serve, migrate, and admin commands that talk to the admin API."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Any, BinaryIO

import httpx
import typer
from pydantic import SecretStr
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn

from app import security
from app.settings import Settings, get_settings

app = typer.Typer(help="LoRA Gateway: multi-tenant LoRA serving on vLLM.", no_args_is_help=True)
tenants_app = typer.Typer(help="Manage tenants.", no_args_is_help=True)
keys_app = typer.Typer(help="Manage tenants' API keys.", no_args_is_help=True)
adapters_app = typer.Typer(help="Manage LoRA adapters.", no_args_is_help=True)
app.add_typer(tenants_app, name="tenants")
app.add_typer(keys_app, name="keys")
promotions_app = typer.Typer(help="Promote hot adapters to dedicated deployments; the advice.", no_args_is_help=True)
jobs_app = typer.Typer(help="Promotion and demotion jobs.", no_args_is_help=True)
deployments_app = typer.Typer(help="Dedicated deployments of promoted adapters.", no_args_is_help=True)
backends_app = typer.Typer(help="Manage the vLLM backends the gateway places adapters on.", no_args_is_help=True)
base_models_app = typer.Typer(help="Manage base models.", no_args_is_help=True)
app.add_typer(adapters_app, name="adapters")
app.add_typer(backends_app, name="backends")
app.add_typer(base_models_app, name="base-models")
app.add_typer(promotions_app, name="promotions")
app.add_typer(jobs_app, name="jobs")
app.add_typer(deployments_app, name="deployments")

console = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)

ADMIN_KEY_FILE = "admin-api-key"


def admin_key_path(settings: Settings) -> Path:
    return settings.DATA_DIR / ADMIN_KEY_FILE


def ensure_admin_key(settings: Settings) -> tuple[str, bool]:
    """The configured admin key, else the one kept in DATA_DIR, else a new one saved there (0600)."""
    if settings.ADMIN_API_KEY is not None:
        return settings.ADMIN_API_KEY.get_secret_value(), False
    path = admin_key_path(settings)
    existing = security.read_secret_file(path)
    if existing:
        return existing, False
    key = security.generate_admin_key()
    security.write_secret_file(path, key)
    return key, True


def alembic_config(url: str | None = None) -> Any:
    from alembic.config import Config

    root = Path(__file__).resolve().parent.parent
    cfg = Config(str(root / "alembic.ini"))
    cfg.set_main_option("script_location", str(root / "migrations"))
    if url:
        cfg.attributes["url"] = url
    return cfg


@app.command()
def migrate(revision: str = "head") -> None:
    """Apply database migrations (alembic upgrade)."""
    from alembic import command

    settings = get_settings()
    command.upgrade(alembic_config(settings.DATABASE_URL), revision)
    console.print(f"[green]database at revision {revision}[/green]")


@app.command()
def serve(
    host: Annotated[str | None, typer.Option(help="Bind address (default GATEWAY_HOST)")] = None,
    port: Annotated[int | None, typer.Option(help="Port (default GATEWAY_PORT)")] = None,
    workers: int = 1,
    access_log: Annotated[bool, typer.Option(help="Log every request (costs ~15% CPU at full load)")] = False,
) -> None:
    """Run the gateway (uvicorn with uvloop and httptools)."""
    import uvicorn

    settings = get_settings()
    if workers > 1 and not settings.REDIS_URL:
        # Each worker would keep its own in-process residency: N placers evicting each other's adapters.
        err.print(
            "--workers > 1 needs GATEWAY_REDIS_URL: without Redis every worker keeps its own residency "
            "state, and they would load and evict adapters under each other"
        )
        raise typer.Exit(2)
    key, created = ensure_admin_key(settings)
    os.environ["GATEWAY_ADMIN_API_KEY"] = key  # the uvicorn factory builds its own Settings
    if workers > 1:
        _metrics_dir(settings)
    get_settings.cache_clear()
    host, port = host or settings.HOST, port or settings.PORT
    url = f"http://{host}:{port}"
    console.print(f"[bold]LoRA Gateway[/bold] on {url}  (database: {settings.DATABASE_URL.split('@')[-1]})")
    if created:  # shown once, when it is made; never again in a log
        console.print(f"admin API key (new, saved to {admin_key_path(settings)}): [bold]{key}[/bold]")
    elif settings.ADMIN_API_KEY is not None:
        console.print("admin API key: GATEWAY_ADMIN_API_KEY")
    else:
        console.print(f"admin API key: in {admin_key_path(settings)}")
    console.print(
        "next: lora-gateway tenants create acme  ->  lora-gateway keys create acme  ->  "
        "lora-gateway adapters upload acme NAME ./adapter-dir"
    )
    uvicorn.run(
        "app.main:app_factory",
        factory=True,
        host=host,
        port=port,
        workers=workers,
        loop="uvloop",
        http="httptools",
        log_level="info",
        access_log=access_log,
        timeout_graceful_shutdown=int(settings.SHUTDOWN_GRACE_S) or None,
    )


def _metrics_dir(settings: Settings) -> Path:
    """Several workers: prometheus-client's multiprocess mode, each worker writing its values to files in
    PROMETHEUS_MULTIPROC_DIR (default DATA_DIR/metrics), whose value files are removed here at start (old
    ones would count again), and any worker answering /metrics for all of them."""
    path = Path(os.environ.get("PROMETHEUS_MULTIPROC_DIR") or settings.DATA_DIR / "metrics").resolve()
    path.mkdir(parents=True, exist_ok=True)
    for old in path.glob("*.db"):  # only prometheus-client's own files, whatever else is there
        old.unlink()
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(path)  # read by the workers as they import prometheus_client
    return path


@app.command()
def demo(
    vllm_venv: Annotated[Path, typer.Option(help="venv made by scripts/setup-vllm-cpu.sh")] = Path(
        ".venv-vllm"
    ),
    vllm_port: Annotated[int, typer.Option(help="port for the vLLM CPU server")] = 8001,
) -> None:
    """Everything on embedded defaults: tiny model, vLLM (CPU build), gateway, demo tenant (make run)."""
    from alembic import command

    from app.devkit import demo as demo_mod

    settings = get_settings()
    command.upgrade(alembic_config(settings.DATABASE_URL), "head")  # run on its own, it needs the schema too
    key, _ = ensure_admin_key(settings)
    settings = settings.model_copy(update={"ADMIN_API_KEY": SecretStr(key)})
    demo_mod.main(settings, admin_key=key, vllm_venv=vllm_venv, vllm_port=vllm_port)


@app.command()
def worker() -> None:
    """Run promotion and demotion jobs (merge, quantize, launch, verify, switch) until stopped."""
    import asyncio
    import signal

    from app import logs
    from app.promotion.worker import serve_worker

    settings = get_settings()
    logs.configure(settings.LOG_LEVEL, settings.LOG_FORMAT)

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await serve_worker(settings, stop)

    asyncio.run(main())


def _ml_step(argv: list[str], python: str) -> None:
    """Runs an ML step in its own environment, showing its progress; exits with its status."""
    import asyncio

    from app.promotion.ml import protocol
    from app.promotion.runner import run_step
    from app.promotion.worker import REPO_ROOT

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO_ROOT)}
    with Progress("[progress.description]{task.description}", BarColumn(), console=err) as bar:
        task = bar.add_task(argv[1], total=1.0)

        def on_event(event: dict[str, Any]) -> None:
            if event["event"] == "progress":
                bar.update(task, completed=event["fraction"], description=f"{event['step']}: {event['message']}")

        run = asyncio.run(run_step([python, "-m", *argv], env=env, on_event=on_event))
    if run.result is not None:
        _print({k: v for k, v in run.result.items() if k not in ("event", "time")})
    if run.returncode != 0:
        err.print(run.log_tail[-4000:])
        err.print(
            "[red]gate failed[/red]" if run.returncode == protocol.GATE_FAILED else f"[red]failed ({run.returncode})[/red]"
        )
        raise typer.Exit(run.returncode or 1)


@app.command()
def merge(
    base: Annotated[Path, typer.Option(help="base model folder (Hugging Face layout)")],
    adapter: Annotated[Path, typer.Option(help="peft adapter folder")],
    out: Annotated[Path, typer.Option(help="where the merged model goes")],
    dtype: Annotated[str, typer.Option(help="saved dtype: auto (the base's), bfloat16, float16, float32")] = "auto",
    device: Annotated[str, typer.Option(help="auto (cuda if torch sees one), cpu, cuda")] = "auto",
) -> None:
    """Merge a LoRA adapter into its base model (peft merge_and_unload), with the merge gate."""
    import sys

    python = get_settings().ML_PYTHON or sys.executable
    _ml_step(["app.promotion.ml.merge", "--base", str(base), "--adapter", str(adapter), "--out", str(out),
              "--dtype", dtype, "--device", device], python)  # fmt: skip


@app.command()
def quantize(
    awq: Annotated[Path, typer.Option("--awq", help="merged model folder to AWQ-quantize (W4A16, group 128)")],
    out: Annotated[Path, typer.Option(help="where the quantized model goes")],
    calibration: Annotated[Path | None, typer.Option(help="calibration texts, one per line")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda")] = "auto",
) -> None:
    """AWQ-quantize a merged model with llm-compressor (in the quantizer's venv), with the quality gate."""
    argv = ["app.promotion.ml.quantize", "--model", str(awq), "--out", str(out), "--device", device]
    if calibration is not None:
        argv += ["--calibration", str(calibration)]
    _ml_step(argv, get_settings().QUANTIZER_PYTHON)


@app.command("export-gguf")
def export_gguf(
    model: Annotated[Path, typer.Argument(help="merged model folder")],
    out: Annotated[Path, typer.Option(help="output folder (absent or empty): gets model-<TYPE>.gguf")],
    type_: Annotated[str, typer.Option("--type", help="llama.cpp type: Q4_K_M, Q5_K_M, Q8_0, F16, ...")] = "Q4_K_M",
    pre_tokenizer: Annotated[
        str | None, typer.Option(help="the BPE pre-tokenizer of a tokenizer the converter does not know, e.g. gpt-2")
    ] = None,
    max_logprob_diff: Annotated[float | None, typer.Option(help="the gate: mean next-token log-prob difference")] = None,
) -> None:
    """Export a merged model to GGUF for llama.cpp (converter + quantizer in .venv-gguf), with its gate."""
    argv = ["app.promotion.ml.gguf", "--model", str(model), "--out", str(out), "--type", type_]
    if pre_tokenizer:
        argv += ["--pre-tokenizer", pre_tokenizer]
    if max_logprob_diff is not None:
        argv += ["--max-logprob-diff", str(max_logprob_diff)]
    _ml_step(argv, get_settings().GGUF_PYTHON)


# --- admin client ----------------------------------------------------------------------------------------

UrlOpt = Annotated[str, typer.Option("--url", envvar="GATEWAY_URL", help="Gateway base URL")]
KeyOpt = Annotated[
    str | None,
    typer.Option("--admin-key", envvar="GATEWAY_ADMIN_API_KEY", help="Admin key (default: DATA_DIR file)"),
]


def _client(url: str, admin_key: str | None, timeout: float = 30.0) -> httpx.Client:
    if admin_key is None:
        path = admin_key_path(get_settings())
        if not path.is_file():
            err.print("[red]no admin key: pass --admin-key or set GATEWAY_ADMIN_API_KEY[/red]")
            raise typer.Exit(2)
        admin_key = path.read_text().strip()
    return httpx.Client(
        base_url=url.rstrip("/") + "/admin/v1",
        headers={"Authorization": f"Bearer {admin_key}"},
        timeout=httpx.Timeout(timeout, read=max(timeout, 600.0)),
    )


def _check(resp: httpx.Response) -> Any:
    if resp.is_success:
        return resp.json() if resp.content else None
    try:
        message = resp.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = resp.text[:500]
    err.print(f"[red]error {resp.status_code}:[/red] {message}")
    raise typer.Exit(1)


def _print(data: Any) -> None:
    console.print_json(json.dumps(data))


@tenants_app.command("create")
def tenants_create(
    name: str,
    url: UrlOpt = "http://127.0.0.1:8080",
    admin_key: KeyOpt = None,
    display_name: str | None = None,
) -> None:
    """Create a tenant."""
    with _client(url, admin_key) as c:
        _print(_check(c.post("/tenants", json={"name": name, "display_name": display_name})))


@tenants_app.command("list")
def tenants_list(url: UrlOpt = "http://127.0.0.1:8080", admin_key: KeyOpt = None) -> None:
    """List tenants."""
    with _client(url, admin_key) as c:
        _print(_check(c.get("/tenants")))


@tenants_app.command("delete")
def tenants_delete(name: str, url: UrlOpt = "http://127.0.0.1:8080", admin_key: KeyOpt = None) -> None:
    """Delete a tenant, its keys and its adapters."""
    with _client(url, admin_key) as c:
        _check(c.delete(f"/tenants/{name}"))
    err.print(f"tenant {name} deleted")


@keys_app.command("list")
def keys_list(tenant: str, url: UrlOpt = "http://127.0.0.1:8080", admin_key: KeyOpt = None) -> None:
    """List a tenant's API keys (prefix, name, last use, revocation; never the key)."""
    with _client(url, admin_key) as c:
        _print(_check(c.get(f"/tenants/{tenant}/api-keys")))


@keys_app.command("revoke")
def keys_revoke(
    tenant: str,
    key_id: Annotated[str, typer.Argument(help="the key's id (from keys list)")],
    url: UrlOpt = "http://127.0.0.1:8080",
    admin_key: KeyOpt = None,
) -> None:
    """Revoke an API key: refused on every replica within GATEWAY_CACHE_TTL_S."""
    with _client(url, admin_key) as c:
        _print(_check(c.delete(f"/tenants/{tenant}/api-keys/{key_id}")))


@keys_app.command("create")
def keys_create(
    tenant: str, url: UrlOpt = "http://127.0.0.1:8080", admin_key: KeyOpt = None, name: str | None = None
) -> None:
    """Create an API key for a tenant; the key is shown once."""
    with _client(url, admin_key) as c:
        data = _check(c.post(f"/tenants/{tenant}/api-keys", json={"name": name}))
    _print(data)
    err.print("[yellow]store this key now: it is not shown again[/yellow]")


class _ProgressReader:
    """File wrapper that advances a progress bar as httpx streams it."""

    def __init__(self, f: BinaryIO, progress: Progress, task: Any) -> None:
        self._f, self._progress, self._task = f, progress, task

    def read(self, n: int = -1) -> bytes:
        chunk = self._f.read(n)
        self._progress.advance(self._task, len(chunk))
        return chunk

    def __getattr__(self, name: str) -> Any:
        return getattr(self._f, name)


def _upload_paths(path: Path) -> list[Path]:
    if path.is_dir():
        files = [path / "adapter_config.json", path / "adapter_model.safetensors"]
        if not files[1].exists() and (path / "adapter_model.bin").exists():
            err.print(
                "[red]adapter_model.bin is a pickle checkpoint, which the gateway refuses; re-save with "
                "save_pretrained(..., safe_serialization=True) to get adapter_model.safetensors[/red]"
            )
            raise typer.Exit(2)
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            err.print(f"[red]missing {', '.join(missing)}[/red]")
            raise typer.Exit(2)
        return files
    if not path.is_file():
        err.print(f"[red]{path} does not exist[/red]")
        raise typer.Exit(2)
    return [path]


@adapters_app.command("upload")
def adapters_upload(
    tenant: str,
    name: str,
    path: Annotated[Path, typer.Argument(help="peft adapter folder, or a .tar.gz/.zip of one")],
    url: UrlOpt = "http://127.0.0.1:8080",
    admin_key: KeyOpt = None,
    base_model: Annotated[str | None, typer.Option(help="Override base_model_name_or_path")] = None,
) -> None:
    """Upload a LoRA adapter (a new version if the name exists)."""
    paths = _upload_paths(path)
    total = sum(p.stat().st_size for p in paths)
    data = {"name": name, **({"base_model": base_model} if base_model else {})}
    with (
        _client(url, admin_key) as c,
        Progress(
            "[progress.description]{task.description}",
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            console=err,
            transient=True,
        ) as progress,
    ):
        task = progress.add_task(f"uploading {name}", total=total)
        handles = [p.open("rb") for p in paths]
        try:
            files = [
                ("file", (p.name, _ProgressReader(h, progress, task)))
                for p, h in zip(paths, handles, strict=True)
            ]
            resp = c.post(f"/tenants/{tenant}/adapters", data=data, files=files)  # type: ignore[arg-type]
        finally:
            for h in handles:
                h.close()
    _print(_check(resp))


@adapters_app.command("list")
def adapters_list(tenant: str, url: UrlOpt = "http://127.0.0.1:8080", admin_key: KeyOpt = None) -> None:
    """List a tenant's adapters."""
    with _client(url, admin_key) as c:
        _print(_check(c.get(f"/tenants/{tenant}/adapters")))


@adapters_app.command("show")
def adapters_show(
    adapter: Annotated[str, typer.Argument(help="adapter id, or TENANT/NAME (its newest version)")],
    url: UrlOpt = "http://127.0.0.1:8080",
    admin_key: KeyOpt = None,
) -> None:
    """One adapter's record."""
    with _client(url, admin_key) as c:
        _print(_check(c.get(f"/adapters/{_adapter_id(c, adapter)}")))


@adapters_app.command("delete")
def adapters_delete(
    adapter: Annotated[str, typer.Argument(help="adapter id, or TENANT/NAME (its newest version)")],
    url: UrlOpt = "http://127.0.0.1:8080",
    admin_key: KeyOpt = None,
) -> None:
    """Delete an adapter version: no longer served (every replica within GATEWAY_CACHE_TTL_S)."""
    with _client(url, admin_key) as c:
        adapter_id = _adapter_id(c, adapter)
        _check(c.delete(f"/adapters/{adapter_id}"))
    err.print(f"adapter {adapter_id} deleted")


@base_models_app.command("list")
def base_models_list(url: UrlOpt = "http://127.0.0.1:8080", admin_key: KeyOpt = None) -> None:
    """List base models."""
    with _client(url, admin_key) as c:
        _print(_check(c.get("/base-models")))


@backends_app.command("list")
def backends_list(url: UrlOpt = "http://127.0.0.1:8080", admin_key: KeyOpt = None) -> None:
    """List backends (their API keys are never shown)."""
    with _client(url, admin_key) as c:
        _print(_check(c.get("/backends")))


@backends_app.command("add")
def backends_add(
    name: str,
    backend_url: Annotated[str, typer.Argument(help="the vLLM server's base URL, e.g. http://vllm-0:8000")],
    base_model: Annotated[str, typer.Option(help="name of a registered base model")],
    gpu_slots: Annotated[int, typer.Option(help="vLLM --max-loras")],
    capacity: Annotated[int | None, typer.Option(help="vLLM --max-cpu-loras (default: gpu-slots)")] = None,
    max_lora_rank: Annotated[int, typer.Option(help="vLLM --max-lora-rank")] = 16,
    max_num_seqs: Annotated[int | None, typer.Option(help="vLLM --max-num-seqs")] = None,
    backend_key: Annotated[
        str | None, typer.Option(envvar="VLLM_API_KEY", help="the backend's --api-key (write-only)")
    ] = None,
    url: UrlOpt = "http://127.0.0.1:8080",
    admin_key: KeyOpt = None,
) -> None:
    """Register a vLLM server (started with --enable-lora) for a base model."""
    body: dict[str, Any] = {
        "name": name,
        "url": backend_url,
        "base_model": base_model,
        "gpu_slots": gpu_slots,
        "capacity": capacity,
        "max_lora_rank": max_lora_rank,
        "max_num_seqs": max_num_seqs,
        "api_key": backend_key,
    }
    with _client(url, admin_key) as c:
        _print(_check(c.post("/backends", json={k: v for k, v in body.items() if v is not None})))


@backends_app.command("update")
def backends_update(
    backend: Annotated[str, typer.Argument(help="backend id or name")],
    state: Annotated[str | None, typer.Option(help="active, draining or down")] = None,
    gpu_slots: int | None = None,
    capacity: int | None = None,
    max_lora_rank: int | None = None,
    max_num_seqs: int | None = None,
    url: UrlOpt = "http://127.0.0.1:8080",
    admin_key: KeyOpt = None,
) -> None:
    """Change a backend: drain it (state), or its slots and limits after restarting vLLM with new flags."""
    body = {
        "state": state,
        "gpu_slots": gpu_slots,
        "capacity": capacity,
        "max_lora_rank": max_lora_rank,
        "max_num_seqs": max_num_seqs,
    }
    with _client(url, admin_key) as c:
        _print(_check(c.patch(f"/backends/{backend}", json={k: v for k, v in body.items() if v is not None})))


@backends_app.command("remove")
def backends_remove(
    backend: Annotated[str, typer.Argument(help="backend id or name")],
    url: UrlOpt = "http://127.0.0.1:8080",
    admin_key: KeyOpt = None,
) -> None:
    """Unregister a backend (the vLLM server itself is left running)."""
    with _client(url, admin_key) as c:
        _check(c.delete(f"/backends/{backend}"))
    err.print(f"backend {backend} removed")


def _adapter_id(c: httpx.Client, ref: str) -> str:
    """An adapter id, or TENANT/NAME (its newest version)."""
    if "/" not in ref:
        return ref
    tenant, name = ref.split("/", 1)
    found = [a for a in _check(c.get(f"/tenants/{tenant}/adapters"))["data"] if a["name"] == name]
    if not found:
        err.print(f"[red]tenant {tenant!r} has no adapter {name!r}[/red]")
        raise typer.Exit(1)
    return str(max(found, key=lambda a: a["version"])["id"])


def _follow(c: httpx.Client, job_id: str, poll_s: float = 1.0) -> dict[str, Any]:
    """Shows the job's step and progress until it ends; its final state."""
    import time

    with Progress("[progress.description]{task.description}", BarColumn(), console=err, transient=True) as bar:
        task = bar.add_task("queued", total=1.0)
        while True:
            job: dict[str, Any] = _check(c.get(f"/jobs/{job_id}"))
            bar.update(task, completed=job["progress"], description=f"{job['state']}: {job['step'] or 'waiting'}")
            if job["state"] in ("succeeded", "failed", "cancelled"):
                return job
            time.sleep(poll_s)


def _job_summary(job: dict[str, Any]) -> None:
    for step in job["steps"]:
        seconds = f"{step['seconds']:.1f} s" if step.get("seconds") is not None else ""
        err.print(f"  {step['name']:<10} {step['state']:<12} {seconds}")
    if job["state"] != "succeeded":
        err.print(f"[red]{job['state']}[/red]: {job['error'] or ''}")
        raise typer.Exit(1)


@promotions_app.command("create")
def promotions_create(
    adapter: Annotated[str, typer.Argument(help="adapter id, or TENANT/NAME (its newest version)")],
    quantization: Annotated[str, typer.Option(help="awq (W4A16) or none")] = "awq",
    launcher: Annotated[str, typer.Option(help="local or kubernetes")] = "local",
    options: Annotated[
        str | None, typer.Option("--options", help="more of the request as JSON, e.g. '{\"gates\": {...}}'")
    ] = None,
    follow: Annotated[bool, typer.Option(help="show progress until the job ends")] = False,
    url: UrlOpt = "http://127.0.0.1:8080",
    admin_key: KeyOpt = None,
) -> None:
    """Promote an adapter: merge, quantize, launch a dedicated deployment, verify, switch its traffic."""
    body: dict[str, Any] = {"quantization": quantization, "launcher": launcher, **json.loads(options or "{}")}
    with _client(url, admin_key) as c:
        job = _check(c.post(f"/adapters/{_adapter_id(c, adapter)}/promotions", json=body))
        _print(job)
        if follow:
            _job_summary(_follow(c, job["id"]))


@promotions_app.command("advice")
def promotions_advice(
    window_s: Annotated[int, typer.Option(help="how far back traffic counts (s)")] = 3600,
    target: Annotated[str, typer.Option(help="gpu, or cpu for CPU/edge serving")] = "gpu",
    url: UrlOpt = "http://127.0.0.1:8080",
    admin_key: KeyOpt = None,
) -> None:
    """Adapters ranked by measured traffic, with the decision tree's advice (advice only)."""
    with _client(url, admin_key) as c:
        _print(_check(c.get("/promotions/advice", params={"window_s": window_s, "target": target})))


@jobs_app.command("list")
def jobs_list(url: UrlOpt = "http://127.0.0.1:8080", admin_key: KeyOpt = None) -> None:
    """List jobs, newest first."""
    with _client(url, admin_key) as c:
        _print(_check(c.get("/jobs")))


@jobs_app.command("show")
def jobs_show(
    job: str,
    follow: Annotated[bool, typer.Option(help="show progress until the job ends")] = False,
    url: UrlOpt = "http://127.0.0.1:8080",
    admin_key: KeyOpt = None,
) -> None:
    """A job's state, step, progress, per-step timings and log tail."""
    with _client(url, admin_key) as c:
        if follow:
            done = _follow(c, job)
            _print(done)
            _job_summary(done)
        else:
            _print(_check(c.get(f"/jobs/{job}")))


@jobs_app.command("cancel")
def jobs_cancel(job: str, url: UrlOpt = "http://127.0.0.1:8080", admin_key: KeyOpt = None) -> None:
    """Cancel a job (its running step is stopped; nothing is switched)."""
    with _client(url, admin_key) as c:
        _print(_check(c.post(f"/jobs/{job}/cancel")))


@jobs_app.command("artifacts")
def jobs_artifacts(
    job: str,
    download: Annotated[str | None, typer.Option(help="artifact name to download as a tar")] = None,
    out: Annotated[Path | None, typer.Option(help="where the tar goes (default: NAME.tar)")] = None,
    url: UrlOpt = "http://127.0.0.1:8080",
    admin_key: KeyOpt = None,
) -> None:
    """List a job's artifacts (size, sha256), or download one."""
    import hashlib
    import tarfile

    with _client(url, admin_key) as c:
        if download is None:
            _print(_check(c.get(f"/jobs/{job}/artifacts")))
            return
        target = out or Path(f"{download}.tar")
        partial = target.with_name(target.name + ".partial")
        with c.stream("GET", f"/jobs/{job}/artifacts/{download}") as resp:
            if not resp.is_success:
                resp.read()
                _check(resp)
            expected = resp.headers.get("x-artifact-sha256")
            with partial.open("wb") as f:
                for chunk in resp.iter_bytes():
                    f.write(chunk)
    with tarfile.open(partial) as tar:  # the digest is the manifest's: check it before keeping the file
        member = tar.extractfile(f"{download}/manifest.json")
        digest = hashlib.sha256(member.read()).hexdigest() if member is not None else None
    if expected and digest != expected:
        partial.unlink()
        err.print(f"[red]the download does not match its sha256 ({digest} != {expected})[/red]")
        raise typer.Exit(1)
    partial.rename(target)
    _print({"path": str(target), "sha256": digest})


@deployments_app.command("list")
def deployments_list(url: UrlOpt = "http://127.0.0.1:8080", admin_key: KeyOpt = None) -> None:
    """List dedicated deployments."""
    with _client(url, admin_key) as c:
        _print(_check(c.get("/deployments")))


@deployments_app.command("demote")
def deployments_demote(
    deployment: str,
    follow: Annotated[bool, typer.Option(help="show progress until the job ends")] = False,
    url: UrlOpt = "http://127.0.0.1:8080",
    admin_key: KeyOpt = None,
) -> None:
    """Demote: traffic back to the shared LoRA path first, then the deployment stops."""
    with _client(url, admin_key) as c:
        job = _check(c.delete(f"/deployments/{deployment}"))
        _print(job)
        if follow:
            _job_summary(_follow(c, job["id"]))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
