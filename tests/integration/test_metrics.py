"""/metrics after real traffic through the gateway to the vLLM CPU backend: each request counted once
under the tenant's own model name, tokens equal to the usage the client received, the streaming latency
series and the gateway's overhead populated; and the endpoint closed to anyone without the metrics token."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.conftest import ADMIN_KEY, BASE, Gateway, start_gateway, stop_process
from tests.integration.fleet import REDIS_URL

pytestmark = pytest.mark.vllm

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]
MSG = [{"role": "user", "content": "Hello! How are you today?"}]


def scrape(gw: Gateway) -> Samples:
    resp = httpx.get(f"{gw.url}/metrics", headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=10)
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"].startswith("text/plain")
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(resp.text)
        for s in family.samples
    }


def total(samples: Samples, name: str, labels: Mapping[str, str]) -> float:
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= ls)


def test_series_move_as_the_traffic_did(gateway: Gateway) -> None:
    before = scrape(gateway)
    with gateway.tenant_client("acme") as c:
        chat = c.post(
            "/v1/chat/completions", json={"model": "support", "messages": MSG, "max_tokens": 8, "temperature": 0}
        )
        assert chat.status_code == 200, chat.text
        chat_usage = chat.json()["usage"]
        events = []
        with c.stream(
            "POST", "/v1/completions",
            json={"model": "legal", "prompt": "The gateway", "max_tokens": 6, "temperature": 0, "stream": True,
                  "stream_options": {"include_usage": True}},
        ) as s:  # fmt: skip
            assert s.status_code == 200
            events = [json.loads(line[6:]) for line in s.iter_lines() if line.startswith("data: {")]
        stream_usage = events[-1]["usage"]
        missing = c.post("/v1/chat/completions", json={"model": "no-such-adapter", "messages": MSG})
        assert missing.status_code == 404
    after = scrape(gateway)

    def moved(name: str, **labels: str) -> float:
        return total(after, name, labels) - total(before, name, labels)

    acme = {"tenant": "acme"}
    assert moved("gateway_requests_total", **acme, gen_ai_request_model="support", status="200", error_type="") == 1
    assert moved("gateway_requests_total", **acme, gen_ai_request_model="legal", status="200", error_type="") == 1
    # A name that resolves to nothing is no label of its own (a client could invent any number).
    assert moved("gateway_requests_total", **acme, gen_ai_request_model="", status="404", error_type="model_not_found") == 1
    assert moved("gateway_requests_total") == 3
    assert not [ls for _, ls in after if ("gen_ai_request_model", "no-such-adapter") in ls]
    # Tokens: exactly the usage each client was given.
    for model, usage in (("support", chat_usage), ("legal", stream_usage)):
        assert moved("gateway_tokens_total", **acme, gen_ai_request_model=model, gen_ai_token_type="input") == usage["prompt_tokens"]
        assert moved("gateway_tokens_total", **acme, gen_ai_request_model=model, gen_ai_token_type="output") == usage["completion_tokens"]
    # The GenAI server series, under the tenant's model names.
    duration = "gen_ai_server_request_duration_seconds_count"
    assert moved(duration, gen_ai_operation_name="chat", gen_ai_request_model="support", error_type="") == 1
    assert moved(duration, gen_ai_operation_name="text_completion", gen_ai_request_model="legal", error_type="") == 1
    assert moved(duration, gen_ai_operation_name="chat", gen_ai_request_model="", error_type="model_not_found") == 1
    ttft = "gen_ai_server_time_to_first_token_seconds"
    assert moved(f"{ttft}_count", gen_ai_request_model="legal") == 1
    assert moved(f"{ttft}_count", gen_ai_request_model="support") == 0  # not streamed
    assert moved("gen_ai_server_time_per_output_token_seconds_count", gen_ai_request_model="legal") == 1
    assert 0 < moved(f"{ttft}_sum", gen_ai_request_model="legal") <= moved(
        "gen_ai_server_request_duration_seconds_sum", gen_ai_request_model="legal"
    )
    # The gateway's own time: every request, a small part of the whole.
    assert moved("gateway_overhead_seconds_count") == 3
    overhead = moved("gateway_overhead_seconds_sum")
    whole = moved("gen_ai_server_request_duration_seconds_sum")
    print(f"\noverhead {overhead * 1000:.2f} ms of {whole * 1000:.1f} ms for 3 requests")  # noqa: T201
    assert 0 < overhead < whole
    assert moved("gateway_placement_wait_seconds_count", outcome="placed") == 2
    assert moved("gateway_requests_total", backend="cpu-1") == 2  # the 404 never reached one
    assert moved("gateway_requests_total", backend="") == 1


def test_metrics_needs_the_metrics_token(gateway: Gateway) -> None:
    for headers in ({}, {"Authorization": f"Bearer {gateway.keys['acme']}"}, {"Authorization": "Bearer " + "x" * 40}):
        resp = httpx.get(f"{gateway.url}/metrics", headers=headers, timeout=10)
        assert resp.status_code == 401, headers
        assert resp.json()["error"]["code"] == "invalid_api_key"
        assert "gateway_requests" not in resp.text


def test_residency_series_record_loads_and_evictions(gateway: Gateway) -> None:
    """Two slots for three adapters, asked for in turn: each request past the first two loads its adapter
    and evicts the least recently used one. The loads, their latency, the evictions and the cache misses
    are counted; the fleet gauges show the backend's slots and adapters; the gateway's own log has a
    JSON line per load with its time."""
    before = scrape(gateway)
    backend = gateway.admin.get("/admin/v1/backends").json()["data"][0]
    assert backend["name"] == "cpu-1"
    resize = {"gpu_slots": 2, "capacity": 2}
    resp = gateway.admin.patch(f"/admin/v1/backends/{backend['id']}", json=resize)
    assert resp.status_code == 200, resp.text
    try:
        # Earlier tests may have left more adapters there than two: the reconciler trims the backend to
        # its new capacity within one round (GATEWAY_RECONCILE_INTERVAL_S, 15 s); the fleet gauge tells.
        deadline = time.monotonic() + 45
        while total(scrape(gateway), "gateway_backend_adapters", {"backend": "cpu-1"}) > 2:
            assert time.monotonic() < deadline, "the backend was not trimmed to its new capacity"
            time.sleep(1)
        order = [("acme", "support"), ("acme", "legal"), ("globex", "support")] * 2
        for tenant, model in order:
            with gateway.tenant_client(tenant) as c:
                r = c.post("/v1/completions", json={"model": model, "prompt": "Hi", "max_tokens": 2})
                assert r.status_code == 200, r.text
        time.sleep(5.5)  # the fleet gauges are read at most every 5 s
        after = scrape(gateway)
    finally:
        restore = {"gpu_slots": backend["gpu_slots"], "capacity": backend["capacity"]}
        assert gateway.admin.patch(f"/admin/v1/backends/{backend['id']}", json=restore).status_code == 200

    def moved(name: str, **labels: str) -> float:
        return total(after, name, labels) - total(before, name, labels)

    loads = moved("gateway_adapter_loads_total", backend="cpu-1", outcome="ok")
    evictions = moved("gateway_adapter_evictions_total", backend="cpu-1")
    trimmed = moved("gateway_adapter_unloads_total", backend="cpu-1", reason="trimmed")
    print(f"\n6 requests, 3 adapters, 2 slots: {loads:.0f} loads, {evictions:.0f} evictions, {trimmed:.0f} trimmed")  # noqa: T201
    assert loads >= 4  # a, b, c (evicts a), a (evicts b), b (evicts c), c (evicts a): the first two may be live
    assert evictions >= 3 and evictions + trimmed >= loads - 2
    assert moved("gateway_adapter_unloads_total", backend="cpu-1", reason="evicted") == evictions
    assert moved("gateway_adapter_load_duration_seconds_count", backend="cpu-1") == loads
    assert 0 < moved("gateway_adapter_load_duration_seconds_sum", backend="cpu-1") < 30 * loads
    assert moved("gateway_adapter_cache_total", result="miss") >= loads
    assert moved("gateway_adapter_cache_total") == 6
    assert total(after, "gateway_backend_slots", {"backend": "cpu-1", "base_model": BASE}) == 2
    assert total(after, "gateway_backend_up", {"backend": "cpu-1"}) == 1
    assert 1 <= total(after, "gateway_backend_adapters", {"backend": "cpu-1"}) <= 2
    assert total(after, "gateway_adapters_registered", {"base_model": BASE}) >= 3
    assert moved("gateway_store_duration_seconds_count", store="memory", op="touch") >= 6
    assert moved("gateway_db_duration_seconds_count", op="select") > 0  # the registry's reloads
    # The gateway's own log (stderr, not a terminal: JSON lines): one line per load, with its time.
    records = [json.loads(line) for line in gateway.log.read_text().splitlines() if line.startswith("{")]
    timed = [r for r in records if r.get("event") == "adapter loaded" and r.get("backend") == "cpu-1"]
    assert len(timed) >= loads and all(0 < float(r["load_s"]) < 30 for r in timed)
    assert not [r for r in records if ADMIN_KEY in json.dumps(r) or gateway.keys["acme"] in json.dumps(r)]


def not_found(url: str, key: str) -> int:
    r = httpx.post(
        f"{url}/v1/chat/completions",
        json={"model": "nothing-here", "messages": MSG},
        headers={"Authorization": f"Bearer {key}"},
    )
    return r.status_code


def test_several_workers_share_one_exposition(tmp_path: Path) -> None:
    """`serve --workers 2`: prometheus-client's multiprocess mode. Whichever worker answers the scrape,
    the counts are the sums over both workers (each request counted once)."""
    prefix = f"lgw-mp-{os.getpid()}"
    proc, url, _ = start_gateway(
        tmp_path, {"GATEWAY_REDIS_URL": REDIS_URL, "GATEWAY_REDIS_PREFIX": prefix}, ["--workers", "2"]
    )
    try:
        admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
        assert httpx.post(f"{url}/admin/v1/tenants", json={"name": "acme"}, headers=admin).status_code == 201
        key = httpx.post(f"{url}/admin/v1/tenants/acme/api-keys", json={}, headers=admin).json()["key"]
        n = 0
        pids: set[str] = set()
        deadline = time.monotonic() + 30
        with ThreadPoolExecutor(8) as pool:
            # New connections, several at once, until both workers have counted some (the kernel spreads
            # them over the workers, not always evenly): bounded by the deadline.
            while len(pids) < 2 and time.monotonic() < deadline:
                codes = list(pool.map(lambda _: not_found(url, key), range(16)))
                assert codes == [404] * 16
                n += 16
                pids = {p.name.rsplit("_", 1)[-1] for p in (tmp_path / "metrics").glob("counter_*.db")}
        assert len(pids) == 2, pids
        for _ in range(4):  # whichever worker answers
            resp = httpx.get(f"{url}/metrics", headers=admin, timeout=10)
            assert resp.status_code == 200
            samples = {
                (s.name, frozenset(s.labels.items())): s.value
                for family in text_string_to_metric_families(resp.text)
                for s in family.samples
            }
            assert total(samples, "gateway_requests_total", {"status": "404", "tenant": "acme"}) == n
            assert total(samples, "gateway_overhead_seconds_count", {}) == n
    finally:
        stop_process(proc)
