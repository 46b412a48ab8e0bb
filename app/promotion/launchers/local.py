"""Dedicated deployments as local vLLM processes (`make run`, tests, a single GPU host).

The server runs in its own session and process group and outlives the worker that started it (a
deployment is not a job's child: a restarted worker finds it by the pid and command line recorded in the
deployment row). Started without --enable-lora: a merged model is never a LoRA base.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shlex
import signal
import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from app.backends.launcher import BASE_ENV, _free_port, group_members, signal_group
from app.promotion.launchers.base import DeploymentSpec, Launched, LaunchError

_MARK = "--served-model-name"


@dataclass(frozen=True)
class LocalConfig:
    python: str  # the interpreter of the environment vLLM is installed in
    log_dir: Path
    host: str = "127.0.0.1"
    extra_args: tuple[str, ...] = ()
    env: Mapping[str, str] = field(default_factory=dict)
    stop_timeout_s: float = 20.0


class LocalLauncher:
    name = "local"

    def __init__(self, config: LocalConfig) -> None:
        self.config = config
        self._children: dict[int, subprocess.Popen[bytes]] = {}  # started here: reaped here

    def command(self, spec: DeploymentSpec, port: int) -> list[str]:
        cfg = self.config
        # vLLM's CPU kernels for W4A16 (cpu_gemm_wna16) take bfloat16 activations only; GPUs' Marlin takes both.
        dtype = spec.dtype or ("bfloat16" if spec.quantized else None)
        return [
            cfg.python, "-m", "vllm.entrypoints.openai.api_server",
            "--model", spec.model_dir,
            _MARK, spec.served_model_name,
            "--host", cfg.host,
            "--port", str(port),
            *(("--tensor-parallel-size", str(spec.tensor_parallel_size)) if spec.tensor_parallel_size > 1 else ()),
            *(("--max-model-len", str(spec.max_model_len)) if spec.max_model_len else ()),
            *(("--dtype", dtype) if dtype else ()),
            *(
                ("--kv-cache-memory-bytes", str(int(spec.resources["kv_cache_bytes"])))
                if "kv_cache_bytes" in spec.resources
                else ()
            ),
            *cfg.extra_args,
            *spec.extra_args,
        ]  # fmt: skip

    def _environment(self, spec: DeploymentSpec) -> dict[str, str]:
        env = {**os.environ, **BASE_ENV, **self.config.env}
        env.pop("VLLM_ALLOW_RUNTIME_LORA_UPDATING", None)  # no LoRA on a dedicated deployment
        env.pop("VLLM_API_KEY", None)
        if spec.api_key:
            env["VLLM_API_KEY"] = spec.api_key  # not on the command line, where `ps` would show it
        if "kv_cache_bytes" in spec.resources:
            env.pop("VLLM_CPU_KVCACHE_SPACE", None)  # it would override --kv-cache-memory-bytes
        return env

    def _spawn(self, spec: DeploymentSpec) -> Launched:
        self.config.log_dir.mkdir(parents=True, exist_ok=True)
        port = _free_port(self.config.host)
        log_path = self.config.log_dir / f"deployment-{spec.deployment_id}.log"
        command = self.command(spec, port)
        with log_path.open("ab") as log:
            log.write(f"$ {shlex.join(command)}\n".encode())
            log.flush()
            proc = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self._environment(spec),
                start_new_session=True,
            )
        self._children[proc.pid] = proc
        return Launched(
            url=f"http://{self.config.host}:{port}",
            ref={"pid": proc.pid, "log": str(log_path), "served_model_name": spec.served_model_name},
        )

    async def launch(self, spec: DeploymentSpec) -> Launched:
        return await asyncio.to_thread(self._spawn, spec)

    def _running(self, launched: Launched) -> bool:
        pid = int(launched.ref["pid"])
        child = self._children.get(pid)
        if child is not None:
            return child.poll() is None
        # Not started by this process (a worker restarted): the pid must still be that server, not a
        # process that reused its number.
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            return False
        name = str(launched.ref.get("served_model_name", "")).encode()
        return state != "Z" and _MARK.encode() in cmdline and name in cmdline

    async def alive(self, launched: Launched) -> bool:
        return self._running(launched)

    def log_tail(self, launched: Launched, lines: int = 30) -> str:
        try:
            text = Path(launched.ref["log"]).read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    async def wait_ready(self, launched: Launched, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        async with httpx.AsyncClient(timeout=httpx.Timeout(5.0)) as client:
            while True:
                if not self._running(launched):
                    raise LaunchError(f"vLLM exited before it was ready:\n{self.log_tail(launched)}")
                with contextlib.suppress(httpx.TransportError):
                    if (await client.get(f"{launched.url}/health")).status_code == 200:
                        return
                if time.monotonic() >= deadline:
                    raise LaunchError(
                        f"vLLM was not ready after {timeout_s:g} s:\n{self.log_tail(launched)}"
                    )
                await asyncio.sleep(0.5)

    def _stop(self, launched: Launched) -> None:
        pid = int(launched.ref["pid"])
        if not self._running(launched) and not group_members(pid):
            self._children.pop(pid, None)
            return
        deadline = time.monotonic() + self.config.stop_timeout_s
        signal_group(pid, signal.SIGTERM)
        while group_members(pid) and time.monotonic() < deadline:
            child = self._children.get(pid)
            if child is not None:
                child.poll()  # reap the leader, so it does not linger as a zombie
            time.sleep(0.1)
        signal_group(pid, signal.SIGKILL)
        child = self._children.pop(pid, None)
        if child is not None:
            child.wait()

    async def stop(self, launched: Launched) -> None:
        await asyncio.to_thread(self._stop, launched)
