"""Settlement and metering against the vLLM CPU server: a token-limited tenant on a gateway whose limits
live in Redis (read back here: the tokens charged), through every way a response can end, and the
usage endpoint's totals against the usage the clients were given, across a clean restart and a kill."""

from __future__ import annotations

import json
import os
import signal
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import redis

from app.backends.launcher import VllmCpuServer
from tests.integration.conftest import ADMIN_KEY, BASE, VLLM_KEY, start_gateway, stop_process, upload
from tests.integration.fleet import REDIS_URL

pytestmark = pytest.mark.vllm

MSG = [{"role": "user", "content": "Tell me about the gateway and its limits."}]
TPM = 1_000_000  # never refuses: what is measured is the charge


@dataclass
class Stack:
    url: str
    key: str
    tenant_hex: str
    prefix: str
    data_dir: Path
    env: dict[str, str]
    proc: object
    seen: int | None = None  # tokens the settlement test's clients were given (and charged)


def _register(url: str, vllm: VllmCpuServer, tiny) -> tuple[str, str]:  # type: ignore[no-untyped-def]
    admin = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=60)
    with admin:
        assert admin.post("/admin/v1/base-models", json={"name": BASE, "path": str(tiny.base)}).is_success
        backend = {
            "name": "cpu-1", "url": vllm.base_url, "base_model": BASE, "gpu_slots": 4, "max_lora_rank": 8,
            "capacity": 8, "api_key": VLLM_KEY,
        }  # fmt: skip
        assert admin.post("/admin/v1/backends", json=backend).is_success
        made = admin.post("/admin/v1/tenants", json={"name": "metered", "limits": {"tokens_per_minute": TPM}})
        assert made.is_success, made.text
        upload(admin, "metered", "support", tiny.adapters[0])
        key = admin.post("/admin/v1/tenants/metered/api-keys", json={}).json()["key"]
        return key, uuid.UUID(made.json()["id"]).hex


@pytest.fixture(scope="module")
def stack(vllm: VllmCpuServer, tiny, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:  # type: ignore[no-untyped-def]
    data_dir = tmp_path_factory.mktemp("settle")
    prefix = f"lgw-settle-{uuid.uuid4().hex[:8]}"
    # Shares off: each charge is read off the store's counters as it lands (a share's settle into the share
    # itself, tests/limits/test_allotment.py, and reach the store only when it gives back).
    env = {
        "GATEWAY_REDIS_URL": REDIS_URL, "GATEWAY_REDIS_PREFIX": prefix, "GATEWAY_USAGE_FLUSH_S": "1",
        "GATEWAY_LIMITS_LOCAL_SHARE": "0",
    }  # fmt: skip
    proc, url, _ = start_gateway(data_dir, env)
    key, tenant_hex = _register(url, vllm, tiny)
    s = Stack(url, key, tenant_hex, prefix, data_dir, env, proc)
    try:
        yield s
    finally:
        stop_process(s.proc)  # type: ignore[arg-type]
        r = redis.Redis.from_url(REDIS_URL)
        for k in r.scan_iter(match=f"{prefix}:*"):
            r.delete(k)


def charged(s: Stack) -> int:
    """Tokens counted against the tenant now: its two windows (the test runs well inside two minutes)."""
    r = redis.Redis.from_url(REDIS_URL)
    key = f"{s.prefix}:lim:{{{s.tenant_hex}}}:c:t:{s.tenant_hex}"
    tc, tp = r.hmget(key, "tc", "tp")
    return int(float(tc or 0)) + int(float(tp or 0))


def settled(s: Stack, before: int, timeout_s: float = 5.0) -> int:
    """The charge added since `before`, once settlement (a background call) has landed."""
    deadline = time.monotonic() + timeout_s
    last = charged(s) - before
    while time.monotonic() < deadline:
        time.sleep(0.2)
        now = charged(s) - before
        if now == last:
            return now
        last = now
    return last


def client(s: Stack) -> httpx.Client:
    return httpx.Client(base_url=s.url, headers={"Authorization": f"Bearer {s.key}"}, timeout=120)


def stream_usage(resp: httpx.Response) -> tuple[dict[str, int] | None, list[dict[str, object]]]:
    events = [json.loads(line[6:]) for line in resp.iter_lines() if line.startswith("data: {")]
    finals = [e["usage"] for e in events if not e.get("choices") and e.get("usage")]
    return (finals[-1] if finals else None), events


def test_every_ending_is_charged_what_the_backend_reported(stack: Stack) -> None:
    got: list[int] = []  # each request's total, as its client was told
    with client(stack) as c:
        # A whole response.
        before = charged(stack)
        r = c.post("/v1/chat/completions", json={"model": "support", "messages": MSG, "max_tokens": 12})
        assert r.status_code == 200, r.text
        usage = r.json()["usage"]
        assert settled(stack, before) == usage["total_tokens"]
        got.append(usage["total_tokens"])
        prompt = usage["prompt_tokens"]
        # Streams: usage asked for; n = 2 (vLLM counts each choice); per-chunk usage asked by the client.
        for extra in ({}, {"n": 2}, {"stream_options": {"include_usage": True, "continuous_usage_stats": True}}):
            body = {"model": "support", "messages": MSG, "max_tokens": 10, "stream": True,
                    "stream_options": {"include_usage": True}, **extra}  # fmt: skip
            before = charged(stack)
            with c.stream("POST", "/v1/chat/completions", json=body) as s:
                assert s.status_code == 200
                final, events = stream_usage(s)
            assert final is not None, extra
            per_chunk = [e for e in events if e.get("choices") and e.get("usage")]
            # The per-chunk usage the gateway asks for reaches the client only when it asked for it.
            assert bool(per_chunk) == ("continuous_usage_stats" in body["stream_options"]), extra
            if extra.get("n") == 2:
                assert {e["choices"][0]["index"] for e in events if e.get("choices")} == {0, 1}
            assert settled(stack, before) == final["total_tokens"], extra
            got.append(final["total_tokens"])
        # The client leaves after three chunks of a long answer: charged what vLLM had reported by the
        # last chunk the gateway passed on (at least the prompt and the chunks read), far less than reserved.
        body = {"model": "support", "messages": MSG, "max_tokens": 300, "ignore_eos": True, "stream": True}
        before = charged(stack)
        with c.stream("POST", "/v1/chat/completions", json=body) as s:
            assert s.status_code == 200
            read = 0
            for line in s.iter_lines():
                if line.startswith("data: {"):
                    read += 1
                    if read == 3:
                        break
        left = settled(stack, before, timeout_s=10)
        print(f"\nclient left after {read} chunks: charged {left} (prompt {prompt}, max_tokens 300)")  # noqa: T201
        assert prompt + 1 <= left < prompt + 300
    assert sum(got) > 0
    stack.seen = sum(got) + left


def usage_total(s: Stack) -> dict[str, int]:
    resp = httpx.get(
        f"{s.url}/admin/v1/tenants/metered/usage", params={"group_by": "adapter"},
        headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=30,
    )  # fmt: skip
    assert resp.status_code == 200, resp.text
    return dict(resp.json()["totals"])


def restart(s: Stack, sig: int) -> None:
    proc = s.proc
    if sig == signal.SIGKILL:
        os.kill(proc.pid, signal.SIGKILL)  # type: ignore[attr-defined]
        proc.wait(10)  # type: ignore[attr-defined]
    else:
        stop_process(proc)  # type: ignore[arg-type]
    s.proc, s.url, _ = start_gateway(s.data_dir, s.env)


def test_metered_usage_equals_what_clients_were_given_across_restarts(stack: Stack) -> None:
    """After the settlement test's requests: the usage endpoint's tokens equal what the clients were
    told (and the charge for the client that left). A SIGTERM restart loses nothing (flushed on the way
    out); a SIGKILL loses at most GATEWAY_USAGE_FLUSH_S (1 s here) of usage: requests older than that
    are all there."""
    seen = stack.seen
    if seen is None:
        pytest.skip("runs after test_every_ending_is_charged_what_the_backend_reported")
    before = usage_total(stack)
    assert before["requests"] == 5
    assert before["total_tokens"] == seen
    restart(stack, signal.SIGTERM)
    assert usage_total(stack) == before
    with client(stack) as c:
        r = c.post("/v1/chat/completions", json={"model": "support", "messages": MSG, "max_tokens": 5})
        assert r.status_code == 200
        added = r.json()["usage"]["total_tokens"]
    time.sleep(2.5)  # more than one flush interval
    restart(stack, signal.SIGKILL)
    after = usage_total(stack)
    assert after["requests"] == before["requests"] + 1
    assert after["total_tokens"] == before["total_tokens"] + added
