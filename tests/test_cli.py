"""The `lora-gateway` CLI end to end: migrate, serve, and admin commands against the running server."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.factories.adapters import TINY_LAYERS, TINY_SHAPES, adapter_files, tar_gz, write_adapter

CLI = [sys.executable, "-m", "app.cli"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, dict[str, str]]]:
    """A real `lora-gateway serve` on the embedded SQLite default, with a generated admin key."""
    data = tmp_path_factory.mktemp("cli") / "data"
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    env |= {
        "GATEWAY_DATA_DIR": str(data),
        "GATEWAY_PORT": str(port),
        "GATEWAY_URL": f"http://127.0.0.1:{port}",
    }
    subprocess.run([*CLI, "migrate"], env=env, check=True, capture_output=True)
    log = open(data.parent / "serve.log", "w")  # noqa: SIM115 (kept open for the server's lifetime)
    proc = subprocess.Popen([*CLI, "serve"], env=env, stdout=log, stderr=subprocess.STDOUT)
    url = env["GATEWAY_URL"]
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"{url}/healthz").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None, (data.parent / "serve.log").read_text()
            assert time.monotonic() < deadline, "gateway did not become ready"
            time.sleep(0.2)
        yield url, env
    finally:
        proc.terminate()
        proc.wait(10)
        log.close()


def _wait_up(url: str, proc: subprocess.Popen[str] | subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 30
    while True:
        try:
            if httpx.get(f"{url}/healthz").status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert proc.poll() is None and time.monotonic() < deadline, "gateway did not start"
        time.sleep(0.2)


def cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], check=False, env=env, capture_output=True, text=True, timeout=60)


def test_serve_generates_and_prints_an_admin_key(gateway: tuple[str, dict[str, str]]) -> None:
    url, env = gateway
    key_file = Path(env["GATEWAY_DATA_DIR"]) / "admin-api-key"
    key = key_file.read_text().strip()
    assert oct(key_file.stat().st_mode & 0o777) == "0o600"
    assert key in (Path(env["GATEWAY_DATA_DIR"]).parent / "serve.log").read_text()
    assert httpx.get(f"{url}/admin/v1/tenants", headers={"Authorization": f"Bearer {key}"}).status_code == 200
    assert httpx.get(f"{url}/admin/v1/tenants").status_code == 401


def test_serve_prints_the_key_only_when_it_makes_it(gateway: tuple[str, dict[str, str]]) -> None:
    """A second serve on the same data dir reads the saved key and prints where it is, not the key; and
    several workers without Redis are refused before anything starts."""
    _, env = gateway
    key = (Path(env["GATEWAY_DATA_DIR"]) / "admin-api-key").read_text().strip()
    refused = cli(env, "serve", "--workers", "2")
    assert refused.returncode == 2 and "GATEWAY_REDIS_URL" in refused.stderr
    port = _free_port()
    again = subprocess.Popen(
        [*CLI, "serve", "--port", str(port)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        _wait_up(f"http://127.0.0.1:{port}", again)
    finally:
        again.terminate()
        out, _ = again.communicate(timeout=15)
    assert "admin API key: in " in out and key not in out


def test_sigterm_drains_before_the_server_stops(gateway: tuple[str, dict[str, str]]) -> None:
    """SIGTERM: /readyz says draining at once while requests are still served for GATEWAY_DRAIN_S,
    then the process exits on its own."""
    _, env = gateway
    port = _free_port()
    proc = subprocess.Popen(
        [*CLI, "serve", "--port", str(port)],
        env={**env, "GATEWAY_DRAIN_S": "2"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_up(url, proc)
        assert "shutdown" not in httpx.get(f"{url}/readyz").json()["checks"]
        proc.send_signal(signal.SIGTERM)
        t = time.monotonic()
        time.sleep(0.3)
        ready = httpx.get(f"{url}/readyz")
        assert ready.status_code == 503 and ready.json()["checks"]["shutdown"] == "draining"
        assert httpx.get(f"{url}/v1/models").status_code == 401  # still serving requests
        assert proc.wait(15) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal it handled
        assert time.monotonic() - t >= 1.9  # not before the drain period
    finally:
        if proc.poll() is None:
            proc.kill()


def test_admin_commands(gateway: tuple[str, dict[str, str]], tmp_path: Path) -> None:
    url, env = gateway
    key = (Path(env["GATEWAY_DATA_DIR"]) / "admin-api-key").read_text().strip()

    made = cli(env, "tenants", "create", "acme")
    assert made.returncode == 0, made.stderr
    assert json.loads(made.stdout)["name"] == "acme"

    keys = cli(env, "keys", "create", "acme", "--name", "laptop")
    assert keys.returncode == 0, keys.stderr
    secret = json.loads(keys.stdout)["key"]
    assert "not shown again" in keys.stderr
    assert httpx.get(f"{url}/v1/models", headers={"Authorization": f"Bearer {secret}"}).status_code == 200

    admin = {"Authorization": f"Bearer {key}"}
    body = {
        "name": "tiny-llama",
        "path": "/m",
        "hidden_size": 64,
        "num_layers": TINY_LAYERS,
        "module_shapes": TINY_SHAPES,
    }
    assert httpx.post(f"{url}/admin/v1/base-models", json=body, headers=admin).status_code == 201

    folder = write_adapter(tmp_path / "support", adapter_files())
    up = cli(env, "adapters", "upload", "acme", "support", str(folder))
    assert up.returncode == 0, up.stderr
    assert json.loads(up.stdout)["version"] == 1

    archive = tmp_path / "support.tar.gz"
    archive.write_bytes(tar_gz(adapter_files(seed=5)))
    up2 = cli(env, "adapters", "upload", "acme", "support", str(archive))
    assert up2.returncode == 0, up2.stderr
    assert json.loads(up2.stdout)["version"] == 2

    listed = cli(env, "adapters", "list", "acme")
    assert [a["version"] for a in json.loads(listed.stdout)["data"]] == [1, 2]


def test_cli_reports_api_errors(gateway: tuple[str, dict[str, str]], tmp_path: Path) -> None:
    _, env = gateway
    dup = cli(env, "tenants", "create", "dup")
    assert dup.returncode == 0
    again = cli(env, "tenants", "create", "dup")
    assert again.returncode == 1
    assert "409" in again.stderr and "already exists" in again.stderr

    bad = cli(env, "tenants", "create", "x", "--admin-key", "wrong-wrong-wrong-wrong")
    assert bad.returncode == 1 and "401" in bad.stderr

    missing = cli(env, "adapters", "upload", "dup", "a", str(tmp_path / "nope"))
    assert missing.returncode == 2 and "does not exist" in missing.stderr

    bin_dir = tmp_path / "pickled"
    bin_dir.mkdir()
    (bin_dir / "adapter_config.json").write_text("{}")
    (bin_dir / "adapter_model.bin").write_bytes(b"\x80")
    refused = cli(env, "adapters", "upload", "dup", "a", str(bin_dir))
    assert refused.returncode == 2 and "pickle" in refused.stderr


def test_promotion_commands(gateway: tuple[str, dict[str, str]], tmp_path: Path) -> None:
    """The promotion commands against a gateway with no worker running: the job waits in the queue,
    where it can be shown and cancelled; the worker's side is in tests/integration/test_promotion.py."""
    url, env = gateway
    admin = {"Authorization": f"Bearer {(Path(env['GATEWAY_DATA_DIR']) / 'admin-api-key').read_text().strip()}"}
    body = {"name": "tiny-llama", "path": "/m", "hidden_size": 64, "num_layers": TINY_LAYERS, "module_shapes": TINY_SHAPES}
    assert httpx.post(f"{url}/admin/v1/base-models", json=body, headers=admin).status_code in (201, 409)
    assert cli(env, "tenants", "create", "promo").returncode == 0
    folder = write_adapter(tmp_path / "hot", adapter_files())
    assert cli(env, "adapters", "upload", "promo", "hot", str(folder)).returncode == 0

    made = cli(env, "promotions", "create", "promo/hot", "--quantization", "none", "--options", '{"max_model_len": 256}')
    assert made.returncode == 0, made.stderr
    job = json.loads(made.stdout)
    assert (job["state"], job["params"]["quantization"], job["params"]["max_model_len"]) == ("queued", "none", 256)
    shown = json.loads(cli(env, "jobs", "show", job["id"]).stdout)
    assert shown["id"] == job["id"] and shown["steps"] == []
    assert job["id"] in {j["id"] for j in json.loads(cli(env, "jobs", "list").stdout)["data"]}
    again = cli(env, "promotions", "create", "promo/hot")
    assert again.returncode == 1 and "409" in again.stderr  # one job per adapter at a time
    cancelled = cli(env, "jobs", "cancel", job["id"])
    assert cancelled.returncode == 0 and json.loads(cancelled.stdout)["cancel_requested"] is True
    assert json.loads(cli(env, "deployments", "list").stdout)["data"] == []
    advice = cli(env, "promotions", "advice", "--window-s", "600")
    assert advice.returncode == 0, advice.stderr
    assert json.loads(advice.stdout)["object"] == "promotion.advice"

    unknown = cli(env, "promotions", "create", "promo/nope")
    assert unknown.returncode == 1 and "has no adapter 'nope'" in unknown.stderr
    bad = cli(env, "promotions", "create", "promo/hot", "--quantization", "gptq")
    assert bad.returncode == 1 and "400" in bad.stderr


def test_operator_commands(gateway: tuple[str, dict[str, str]], tmp_path: Path) -> None:
    """What operators do day to day: keys listed and revoked, adapters shown and deleted, backends
    registered, drained and removed, a tenant deleted; each through the admin API, checked there."""
    url, env = gateway
    admin = {"Authorization": f"Bearer {(Path(env['GATEWAY_DATA_DIR']) / 'admin-api-key').read_text().strip()}"}
    body = {"name": "tiny-llama", "path": "/m", "hidden_size": 64, "num_layers": TINY_LAYERS, "module_shapes": TINY_SHAPES}
    assert httpx.post(f"{url}/admin/v1/base-models", json=body, headers=admin).status_code in (201, 409)
    assert cli(env, "tenants", "create", "ops").returncode == 0
    secret = json.loads(cli(env, "keys", "create", "ops", "--name", "ci").stdout)["key"]
    listed = cli(env, "keys", "list", "ops")
    assert listed.returncode == 0, listed.stderr
    (entry,) = json.loads(listed.stdout)["data"]
    assert entry["name"] == "ci" and secret not in listed.stdout  # the key itself is never listed
    revoked = cli(env, "keys", "revoke", "ops", entry["id"])
    assert revoked.returncode == 0, revoked.stderr
    assert json.loads(revoked.stdout)["revoked_at"]
    assert httpx.get(f"{url}/v1/models", headers={"Authorization": f"Bearer {secret}"}).status_code == 401

    folder = write_adapter(tmp_path / "faq", adapter_files())
    assert cli(env, "adapters", "upload", "ops", "faq", str(folder)).returncode == 0
    shown = cli(env, "adapters", "show", "ops/faq")
    assert shown.returncode == 0 and json.loads(shown.stdout)["name"] == "faq"
    deleted = cli(env, "adapters", "delete", "ops/faq")
    assert deleted.returncode == 0, deleted.stderr
    assert json.loads(cli(env, "adapters", "list", "ops").stdout)["data"] == []
    assert cli(env, "adapters", "delete", "ops/faq").returncode == 1  # gone

    added = cli(
        env, "backends", "add", "cli-gpu", "http://127.0.0.1:9", "--base-model", "tiny-llama",
        "--gpu-slots", "2", "--capacity", "4", "--backend-key", "vllm-secret-123",
    )  # fmt: skip
    assert added.returncode == 0, added.stderr
    made = json.loads(added.stdout)
    assert (made["gpu_slots"], made["capacity"], made["api_key_set"]) == (2, 4, True)
    assert "vllm-secret-123" not in added.stdout
    assert "cli-gpu" in {b["name"] for b in json.loads(cli(env, "backends", "list").stdout)["data"]}
    drained = cli(env, "backends", "update", "cli-gpu", "--state", "draining")
    assert drained.returncode == 0 and json.loads(drained.stdout)["state"] == "draining"
    bad = cli(env, "backends", "update", "cli-gpu", "--capacity", "1")  # below its slots
    assert bad.returncode == 1 and ("400" in bad.stderr or "422" in bad.stderr), bad.stderr
    assert cli(env, "backends", "remove", "cli-gpu").returncode == 0
    assert "cli-gpu" not in {b["name"] for b in json.loads(cli(env, "backends", "list").stdout)["data"]}
    assert "tiny-llama" in {m["name"] for m in json.loads(cli(env, "base-models", "list").stdout)["data"]}

    assert cli(env, "tenants", "delete", "ops").returncode == 0
    assert "ops" not in {t["name"] for t in json.loads(cli(env, "tenants", "list").stdout)["data"]}
