"""/metrics after real traffic through the gateway to the vLLM CPU backend: each request counted once
under the tenant's own model name, tokens equal to the usage the client received, the streaming latency
series and the gateway's overhead populated; and the endpoint closed to anyone without the metrics token."""

from __future__ import annotations

import json
from collections.abc import Mapping

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.conftest import ADMIN_KEY, Gateway

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
