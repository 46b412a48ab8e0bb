"""Client disconnects cancel the upstream generation; a vLLM restart under the gateway does not surface
an error to the next request (the adapter is loaded again and the request retried once)."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from app.backends.launcher import VllmCpuServer
from tests.integration.conftest import (
    ADMIN_KEY,
    BASE,
    Gateway,
    generated_tokens,
    start_gateway,
    start_vllm,
    stop_process,
    upload,
)

pytestmark = pytest.mark.vllm

# One request of 4,000 tokens: seconds of generation here, far longer than a disconnect takes to reach
# vLLM even on a busy machine. One sequence, not n > 1: vLLM fans n out into child requests, and CI once
# saw such a generation (n = 8) run to its end after the gateway had dropped the connection; that did not
# reproduce in 20 tries under CPU load here, and a single sequence keeps vLLM's fan-out out of what this test measures.
LONG = {
    "messages": [{"role": "user", "content": "Hello!"}],
    "max_tokens": 4000,
    "ignore_eos": True,
}


def _counters(vllm: VllmCpuServer) -> tuple[float, float]:
    """(requests finished by reaching max_tokens, requests running) as vLLM reports them.

    vLLM 0.32 does not count aborted requests in request_success_total, so an aborted generation shows
    as a request that stops running without ever finishing."""
    text = httpx.get(vllm.base_url + "/metrics").text
    done = re.search(
        r'^vllm:request_success_total\{[^}]*finished_reason="length"[^}]*\} (\S+)', text, re.MULTILINE
    )
    running = re.search(r"^vllm:num_requests_running\{[^}]*\} (\S+)", text, re.MULTILINE)
    assert done and running, "vLLM exports neither counter"
    return float(done[1]), float(running[1])


def _assert_aborted(vllm: VllmCpuServer, finished_before: float, generated_before: float) -> None:
    # vLLM's running gauge drops as the API server lets go of a request, while its engine may still be
    # generating for it: the generated-token counter standing still is what shows the generation stopped.
    deadline = time.monotonic() + 10
    seen = generated_tokens(vllm)
    while True:
        time.sleep(0.5)
        now = generated_tokens(vllm)
        if now == seen and _counters(vllm)[1] == 0:
            break
        assert time.monotonic() < deadline, "the generation kept running"
        seen = now
    # Had it not been aborted, the generation would have run on (and finished) after this wait.
    time.sleep(2.0)
    assert _counters(vllm)[0] == finished_before, "vLLM finished the generation nobody was waiting for"
    assert generated_tokens(vllm) - generated_before < LONG["max_tokens"], "it generated all it was asked for"


class TestClientDisconnect:
    def test_streaming_disconnect_aborts_the_generation(self, gateway: Gateway, vllm: VllmCpuServer) -> None:
        finished, generated = _counters(vllm)[0], generated_tokens(vllm)
        headers = {"Authorization": f"Bearer {gateway.keys['acme']}"}
        with (
            httpx.Client(timeout=60) as c,
            c.stream(
                "POST",
                gateway.url + "/v1/chat/completions",
                headers=headers,
                json={"model": "support", "stream": True, **LONG},
            ) as resp,
        ):
            assert resp.status_code == 200
            lines = resp.iter_lines()
            for _ in range(3):
                next(lines)
        _assert_aborted(vllm, finished, generated)

    def test_non_streaming_disconnect_aborts_the_generation(
        self, gateway: Gateway, vllm: VllmCpuServer
    ) -> None:
        # Warm the adapter first so the timeout below hits the generation, not the load; it also shows
        # the counter moves when a request does finish.
        finished = _counters(vllm)[0]
        warm = gateway.tenant_client("acme").post(
            "/v1/chat/completions", json={"model": "support", **LONG, "max_tokens": 1}
        )
        assert warm.status_code == 200
        assert _counters(vllm)[0] == finished + 1
        finished += 1
        generated = generated_tokens(vllm)
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(
                gateway.url + "/v1/chat/completions",
                headers={"Authorization": f"Bearer {gateway.keys['acme']}"},
                json={"model": "support", **LONG},
                timeout=httpx.Timeout(10, read=0.1),
            )
        _assert_aborted(vllm, finished, generated)


@pytest.fixture(scope="module")
def restartable(tiny, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Gateway, VllmCpuServer]]:  # type: ignore[no-untyped-def]
    """A gateway of its own in front of a vLLM server of its own, so restarting it disturbs no other test."""
    root = tmp_path_factory.mktemp("restart")
    server = start_vllm(tiny, root / "vllm-1.log")
    proc, url, _ = start_gateway(root / "gw")
    admin = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=60)
    gw = Gateway(url=url, admin=admin, data_dir=root / "gw")
    try:
        admin.post("/admin/v1/base-models", json={"name": BASE, "path": str(tiny.base)}).raise_for_status()
        admin.post(
            "/admin/v1/backends",
            json={
                "name": "cpu",
                "url": server.base_url,
                "base_model": BASE,
                "gpu_slots": 4,
                "max_lora_rank": 8,
                "api_key": server.config.api_key,
            },
        ).raise_for_status()
        admin.post("/admin/v1/tenants", json={"name": "acme"}).raise_for_status()
        gw.keys["acme"] = admin.post("/admin/v1/tenants/acme/api-keys", json={}).json()["key"]
        upload(admin, "acme", "support", tiny.adapters[0])
        yield gw, server
    finally:
        admin.close()
        stop_process(proc)
        server.stop()


def test_vllm_restart_is_invisible_to_the_next_request(
    restartable: tuple[Gateway, VllmCpuServer], tiny
) -> None:  # type: ignore[no-untyped-def]
    gw, server = restartable
    client = openai.OpenAI(base_url=gw.url + "/v1", api_key=gw.keys["acme"], max_retries=0)
    ask = {
        "model": "support",
        "messages": [{"role": "user", "content": "Hi there"}],
        "max_tokens": 12,
        "temperature": 0,
    }
    before = client.chat.completions.create(**ask).choices[0].message.content  # type: ignore[call-overload]

    port = server.port
    server.stop()
    restarted = start_vllm(tiny, Path(str(server.log_path) + ".2"), port=port)  # same URL, empty adapter set
    try:
        assert [
            m["id"]
            for m in httpx.get(restarted.base_url + "/v1/models", headers=restarted.headers).json()["data"]
        ] == [BASE]
        after = client.chat.completions.create(**ask).choices[0].message.content  # type: ignore[call-overload]
        assert after == before
        stream = client.chat.completions.create(**ask, stream=True)  # type: ignore[call-overload]
        assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == before
    finally:
        restarted.stop()
