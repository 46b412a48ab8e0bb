"""`lora-gateway demo` (what `make run` starts): on a fresh data dir it migrates, serves a tenant's adapter
through vLLM, and SIGTERM or Ctrl-C stops vLLM with it (no orphan server keeps the port and 2 GiB)."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

pytestmark = pytest.mark.vllm

REPO = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
        return True
    except OSError:
        return False


def test_demo_refuses_a_taken_port(tmp_path: Path) -> None:
    """Another server on vLLM's port: the demo refuses at once, instead of registering that server as its
    backend while its own vLLM dies on bind."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        vllm_port = taken.getsockname()[1]
        env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
        env |= {"GATEWAY_DATA_DIR": str(tmp_path / "data"), "GATEWAY_PORT": str(_free_port())}
        out = subprocess.run(
            [sys.executable, "-m", "app.cli", "demo", "--vllm-port", str(vllm_port)],
            check=False,
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=240,
        )
    assert out.returncode != 0
    assert f"port {vllm_port} (vLLM) is taken" in out.stdout + out.stderr
    assert "starting vLLM" not in out.stdout


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, None], ids=["SIGTERM", "SIGINT", "vLLM-dies"])
def test_demo_serves_and_stops_vllm_with_it(tmp_path: Path, sig: signal.Signals | None) -> None:
    """None: vLLM itself dies after start-up; the demo must say so and stop, not serve 503s quietly."""
    venv = Path(os.environ.get("GATEWAY_VLLM_VENV", REPO / ".venv-vllm"))
    if not (venv / "bin" / "python").exists():
        pytest.skip(f"no vLLM CPU venv at {venv}: run scripts/setup-vllm-cpu.sh")
    port, vllm_port = _free_port(), _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    env |= {"GATEWAY_DATA_DIR": str(tmp_path / "data"), "GATEWAY_PORT": str(port)}
    log_path = tmp_path / "demo.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "app.cli",
                "demo",
                "--vllm-venv",
                str(venv),
                "--vllm-port",
                str(vllm_port),
            ],
            cwd=REPO,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 240
        while "Ctrl-C stops" not in log_path.read_text():
            assert proc.poll() is None, log_path.read_text()[-3000:]
            assert time.monotonic() < deadline, "the demo did not come up"
            time.sleep(1)
        key = re.search(r"tenant API key: (\S+)", log_path.read_text())
        assert key, log_path.read_text()
        resp = httpx.post(
            f"http://127.0.0.1:{port}/v1/chat/completions",
            headers={"Authorization": f"Bearer {key[1]}"},
            json={"model": "support", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4},
            timeout=60,
        )
        assert resp.status_code == 200, resp.text
        assert resp.json()["model"] == "support"
        assert _listening(vllm_port)
        if sig is None:
            subprocess.run(["pkill", "-KILL", "-f", "--", f"--port {vllm_port}"], check=True)
            proc.wait(timeout=30)
            assert "vLLM exited" in log_path.read_text(), log_path.read_text()[-2000:]
        else:
            proc.send_signal(sig)
            proc.wait(timeout=60)
        deadline = time.monotonic() + 30
        while _listening(vllm_port):
            assert time.monotonic() < deadline, "vLLM kept running after the demo stopped"
            time.sleep(0.5)
    finally:
        if proc.poll() is None:
            proc.kill()
