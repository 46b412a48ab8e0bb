"""Tenant limits through the real app (in-process limit store here; Redis's in tests/limits and across
replicas in tests/integration/test_limits.py): the admin API, the caps, the 429s and their headers,
settlement to the backend's usage, the metered usage and its export. The upstream is the scripted one,
for what vLLM cannot be made to do on demand (a stream that dies, a request held open)."""

from __future__ import annotations

import asyncio
import csv
import io
import re
from datetime import datetime, timedelta

import httpx

from tests.factories import registry
from tests.factories.adapters import adapter_files, multipart
from tests.fixtures.faulty_upstream import Script

CHAT = "/v1/chat/completions"
HI = [{"role": "user", "content": "hi"}]


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def limit(admin: httpx.AsyncClient, tenant: str = "acme", **limits: int) -> None:
    resp = await admin.patch(f"/admin/v1/tenants/{tenant}", json={"limits": limits})
    assert resp.status_code == 200, resp.text
    assert resp.json()["limits"] == {**dict.fromkeys(LIMIT_FIELDS), **limits}


LIMIT_FIELDS = (
    "requests_per_minute", "tokens_per_minute", "concurrent_requests", "max_tokens", "max_n", "max_prompt_bytes",
)  # fmt: skip


async def test_limits_are_set_read_and_cleared_through_the_admin_api(admin: httpx.AsyncClient, tenant_key: str) -> None:
    await limit(admin, requests_per_minute=60, tokens_per_minute=10_000)
    keys = (await admin.get("/admin/v1/tenants/acme/api-keys")).json()["data"]
    resp = await admin.patch(f"/admin/v1/tenants/acme/api-keys/{keys[0]['id']}", json={"limits": {"max_n": 2}})
    assert resp.status_code == 200 and resp.json()["limits"]["max_n"] == 2
    for bad in ({"requests_per_minute": 0}, {"tokens_per_minute": -5}, {"rpm": 3}, {"max_n": "two"}):
        resp = await admin.patch("/admin/v1/tenants/acme", json={"limits": bad})
        assert resp.status_code in (400, 422), bad
        assert resp.json()["error"]["type"] == "invalid_request_error"
    cleared = await admin.patch("/admin/v1/tenants/acme", json={"limits": None})
    assert cleared.status_code == 200 and cleared.json()["limits"] is None
    made = await admin.post("/admin/v1/tenants", json={"name": "limited", "limits": {"concurrent_requests": 3}})
    assert made.status_code == 201 and made.json()["limits"]["concurrent_requests"] == 3


async def test_requests_per_minute_answer_429_with_openai_headers(
    admin: httpx.AsyncClient, client: httpx.AsyncClient, tenant_key: str
) -> None:
    await limit(admin, requests_per_minute=3)
    seen = []
    for _ in range(3):
        resp = await client.post(CHAT, json={"model": "support", "messages": HI}, headers=auth(tenant_key))
        assert resp.status_code == 200, resp.text
        assert resp.headers["x-ratelimit-limit-requests"] == "3"
        assert re.fullmatch(r"\d+m\d+s|\d+s|\d+ms", resp.headers["x-ratelimit-reset-requests"])
        seen.append(int(resp.headers["x-ratelimit-remaining-requests"]))
    assert seen == [2, 1, 0]
    refused = await client.post(CHAT, json={"model": "support", "messages": HI}, headers=auth(tenant_key))
    assert refused.status_code == 429
    error = refused.json()["error"]
    assert (error["type"], error["code"]) == ("requests", "rate_limit_exceeded")  # as OpenAI types them
    assert "requests per minute" in error["message"]
    assert 1 <= int(refused.headers["retry-after"]) <= 120
    assert refused.headers["x-ratelimit-remaining-requests"] == "0"
    # Another tenant of the same gateway is not limited by acme's.
    await registry.tenant(admin, "globex")
    other = (await registry.api_key(admin, "globex"))["key"]
    resp = await client.post(CHAT, json={"model": "tiny-llama", "messages": HI}, headers=auth(other))
    assert resp.status_code == 200 and "x-ratelimit-limit-requests" not in resp.headers
    metrics = (await client.get("/metrics", headers=admin.headers)).text
    assert 'gateway_rate_limited_total{limit="requests",tenant="acme"} 1.0' in metrics


async def test_a_key_limit_applies_on_top_of_the_tenant_limit(
    admin: httpx.AsyncClient, client: httpx.AsyncClient, tenant_key: str
) -> None:
    await limit(admin, requests_per_minute=100)
    second = (await registry.api_key(admin))["key"]
    key_id = next(k["id"] for k in (await admin.get("/admin/v1/tenants/acme/api-keys")).json()["data"] if second.startswith(k["prefix"]))
    resp = await admin.patch(f"/admin/v1/tenants/acme/api-keys/{key_id}", json={"limits": {"requests_per_minute": 1}})
    assert resp.status_code == 200
    body = {"model": "support", "messages": HI}
    first = await client.post(CHAT, json=body, headers=auth(second))
    assert first.status_code == 200 and first.headers["x-ratelimit-limit-requests"] == "1"  # the tighter
    assert (await client.post(CHAT, json=body, headers=auth(second))).status_code == 429
    other = await client.post(CHAT, json=body, headers=auth(tenant_key))  # the tenant's other key
    assert other.status_code == 200 and other.headers["x-ratelimit-remaining-requests"] == str(100 - 2)


async def test_an_adapter_limit_applies_to_that_adapter_on_top_of_the_tenants(
    admin: httpx.AsyncClient, client: httpx.AsyncClient, tenant_key: str, script: Script
) -> None:
    await limit(admin, requests_per_minute=100)
    (support,) = (await admin.get("/admin/v1/tenants/acme/adapters")).json()["data"]
    resp = await admin.patch(f"/admin/v1/adapters/{support['id']}", json={"limits": {"requests_per_minute": 2, "max_n": 1}})
    assert resp.status_code == 200 and resp.json()["limits"]["requests_per_minute"] == 2, resp.text
    assert resp.json()["pinned"] is False  # the rest of the adapter as it was
    body = {"model": "support", "messages": HI}
    assert (await client.post(CHAT, json={**body, "n": 2}, headers=auth(tenant_key))).status_code == 400  # its cap
    for remaining in ("1", "0"):
        ok = await client.post(CHAT, json=body, headers=auth(tenant_key))
        assert ok.status_code == 200 and ok.headers["x-ratelimit-remaining-requests"] == remaining  # the tightest
    refused = await client.post(CHAT, json=body, headers=auth(tenant_key))
    assert refused.status_code == 429 and refused.json()["error"]["type"] == "requests"
    # The tenant's other models are held only to the tenant's limit, which counted the adapter's two.
    base = await client.post(CHAT, json={"model": "tiny-llama", "messages": HI}, headers=auth(tenant_key))
    assert base.status_code == 200 and base.headers["x-ratelimit-remaining-requests"] == str(100 - 3)
    # A new version keeps the operator's limits on the adapter; null removes them.
    up = await admin.post("/admin/v1/tenants/acme/adapters", data={"name": "support"}, files=multipart(adapter_files()))
    assert up.status_code == 201 and up.json()["version"] == 2 and up.json()["limits"]["requests_per_minute"] == 2
    # Counted by name: the new version answers for the two its first one served this minute.
    assert (await client.post(CHAT, json=body, headers=auth(tenant_key))).status_code == 429
    # Naming the first version is no way around them: the limits are the adapter's, every version's.
    assert (await client.post(CHAT, json={**body, "model": "support@1"}, headers=auth(tenant_key))).status_code == 429
    cleared = await admin.patch(f"/admin/v1/adapters/{up.json()['id']}", json={"limits": None})
    assert (await admin.get(f"/admin/v1/adapters/{support['id']}")).json()["limits"] is None
    assert cleared.status_code == 200 and cleared.json()["limits"] is None
    again = await client.post(CHAT, json=body, headers=auth(tenant_key))
    assert again.status_code == 200 and again.headers["x-ratelimit-remaining-requests"] == str(100 - 4)
    bad = await admin.patch(f"/admin/v1/adapters/{up.json()['id']}", json={"limits": {"requests_per_minute": 0}})
    assert bad.status_code in (400, 422) and bad.json()["error"]["type"] == "invalid_request_error"


async def test_caps_are_checked_on_the_body(
    admin: httpx.AsyncClient, client: httpx.AsyncClient, tenant_key: str, script: Script
) -> None:
    await limit(admin, max_tokens=50, max_n=2, max_prompt_bytes=20, tokens_per_minute=100_000)
    cases = [
        ({"max_tokens": 51}, "max_tokens"),
        ({"max_completion_tokens": 51}, "max_completion_tokens"),
        ({"n": 3}, "n"),
        ({"messages": [{"role": "user", "content": "x" * 21}]}, "messages"),
        ({"max_tokens": 0}, "max_tokens"),
    ]
    for extra, param in cases:
        resp = await client.post(CHAT, json={"model": "support", "messages": HI, **extra}, headers=auth(tenant_key))
        assert resp.status_code == 400, (extra, resp.text)
        assert resp.json()["error"]["param"] == param
    assert script.bodies == []  # nothing reached the backend
    ok = await client.post(CHAT, json={"model": "support", "messages": HI, "n": 2}, headers=auth(tenant_key))
    assert ok.status_code == 200, ok.text
    assert script.bodies[-1]["max_tokens"] == 50  # put in: the completion cannot outgrow its reservation


async def test_tokens_are_reserved_then_settled_to_what_the_backend_reported(
    admin: httpx.AsyncClient, client: httpx.AsyncClient, tenant_key: str
) -> None:
    await limit(admin, tokens_per_minute=1000)
    body = {"model": "support", "messages": HI, "max_tokens": 400}
    first = await client.post(CHAT, json=body, headers=auth(tenant_key))
    assert first.status_code == 200
    reserved = 1000 - int(first.headers["x-ratelimit-remaining-tokens"])
    assert reserved >= 400  # the prompt's bound plus max_tokens
    # The backend said 4 tokens: the next request sees 1000 - 4 - its own reservation left, not - 2x.
    second = await client.post(CHAT, json=body, headers=auth(tenant_key))
    assert second.status_code == 200
    assert int(second.headers["x-ratelimit-remaining-tokens"]) == 1000 - 4 - reserved
    too_large = await client.post(CHAT, json={**body, "max_tokens": 2000}, headers=auth(tenant_key))
    assert too_large.status_code == 429 and "request too large" in too_large.json()["error"]["message"]
    assert "retry-after" not in too_large.headers  # waiting would not help


async def test_a_stream_cut_short_is_charged_what_its_chunks_reported(
    admin: httpx.AsyncClient, client: httpx.AsyncClient, tenant_key: str, script: Script
) -> None:
    """The backend dies after two tokens (a fault the scripted upstream injects): the gateway asked for
    per-chunk usage, so it charges 3 + 2, and the client did not get usage it did not ask for."""
    await limit(admin, tokens_per_minute=1000)
    script.mode = "die_mid_stream"
    body = {"model": "support", "messages": HI, "max_tokens": 100, "stream": True}
    resp = await client.post(CHAT, json=body, headers=auth(tenant_key))
    assert resp.status_code == 200
    assert '"usage"' not in resp.text and "backend_error" in resp.text
    assert script.bodies[-1]["stream_options"] == {"include_usage": True, "continuous_usage_stats": True}
    reserved = 1000 - int(resp.headers["x-ratelimit-remaining-tokens"])
    script.mode = "ok"
    after = await client.post(CHAT, json={**body, "stream": False}, headers=auth(tenant_key))
    assert int(after.headers["x-ratelimit-remaining-tokens"]) == 1000 - 5 - reserved


async def test_refused_and_failed_requests_give_their_reservation_back(
    admin: httpx.AsyncClient, client: httpx.AsyncClient, tenant_key: str, script: Script
) -> None:
    await limit(admin, tokens_per_minute=1000, concurrent_requests=1)
    script.mode = "error_500"
    body = {"model": "support", "messages": HI, "max_tokens": 100}
    failed = await client.post(CHAT, json=body, headers=auth(tenant_key))
    assert failed.status_code == 502
    assert "x-ratelimit-remaining-tokens" in failed.headers  # admitted, then failed: headers still told
    script.mode = "ok"
    ok = await client.post(CHAT, json=body, headers=auth(tenant_key))
    assert ok.status_code == 200  # the failed one's concurrency place was freed
    reserved = 1000 - int(ok.headers["x-ratelimit-remaining-tokens"])
    again = await client.post(CHAT, json=body, headers=auth(tenant_key))
    assert int(again.headers["x-ratelimit-remaining-tokens"]) == 1000 - 4 - reserved  # the 502 cost nothing


async def test_concurrent_requests(admin: httpx.AsyncClient, client: httpx.AsyncClient, tenant_key: str, script: Script) -> None:
    await limit(admin, concurrent_requests=2)
    script.answer_delay_s = 0.5
    body = {"model": "support", "messages": HI}
    results = await asyncio.gather(*(client.post(CHAT, json=body, headers=auth(tenant_key)) for _ in range(4)))
    codes = sorted(r.status_code for r in results)
    assert codes == [200, 200, 429, 429], codes
    refused = next(r for r in results if r.status_code == 429)
    assert "concurrent" in refused.json()["error"]["message"]
    script.answer_delay_s = 0
    assert (await client.post(CHAT, json=body, headers=auth(tenant_key))).status_code == 200


async def test_usage_is_metered_per_adapter_key_and_hour_and_exported(
    admin: httpx.AsyncClient, client: httpx.AsyncClient, tenant_key: str
) -> None:
    second = (await registry.api_key(admin))["key"]
    got = {"prompt": 0, "completion": 0}
    for key, model in ((tenant_key, "support"), (tenant_key, "support"), (second, "tiny-llama")):
        resp = await client.post(CHAT, json={"model": model, "messages": HI}, headers=auth(key))
        assert resp.status_code == 200
        got["prompt"] += resp.json()["usage"]["prompt_tokens"]
        got["completion"] += resp.json()["usage"]["completion_tokens"]
    by_model = await admin.get("/admin/v1/tenants/acme/usage", params={"group_by": "adapter"})
    assert by_model.status_code == 200, by_model.text
    rows = {r["adapter"]: r for r in by_model.json()["data"]}
    assert rows["support"]["requests"] == 2 and rows["tiny-llama"]["requests"] == 1
    totals = by_model.json()["totals"]
    assert (totals["prompt_tokens"], totals["completion_tokens"]) == (got["prompt"], got["completion"])
    by_key = (await admin.get("/admin/v1/tenants/acme/usage", params={"group_by": "key,hour"})).json()
    assert sorted(r["requests"] for r in by_key["data"]) == [1, 2]
    assert all(r["hour"].endswith(":00:00Z") and r["key_prefix"] for r in by_key["data"])
    # Kept by the hour: a range covers the hours that start from `from`'s hour and before `to`.
    hour = datetime.fromisoformat(by_key["data"][0]["hour"])
    z = lambda t: t.isoformat().replace("+00:00", "Z")
    within = {"from": z(hour + timedelta(minutes=30)), "to": z(hour + timedelta(minutes=31))}
    inside = await admin.get("/admin/v1/tenants/acme/usage", params=within)
    assert inside.json()["from"] == z(hour) and inside.json()["totals"]["requests"] == 3, inside.text
    earlier = {"from": z(hour - timedelta(hours=1)), "to": z(hour)}
    before = await admin.get("/admin/v1/tenants/acme/usage", params=earlier)
    assert before.json()["totals"]["requests"] == 0, before.text
    exported = await admin.get("/admin/v1/tenants/acme/usage", params={"group_by": "adapter,key", "format": "csv"})
    assert exported.headers["content-type"].startswith("text/csv")
    assert "attachment" in exported.headers["content-disposition"]
    table = list(csv.DictReader(io.StringIO(exported.text)))
    assert sum(int(r["total_tokens"]) for r in table) == got["prompt"] + got["completion"]
    for bad in ({"group_by": "tenant"}, {"from": "2026-12-01T00:00:00"}, {"from": "2026-12-02T00:00:00Z", "to": "2026-12-01T00:00:00Z"}):
        resp = await admin.get("/admin/v1/tenants/acme/usage", params=bad)
        assert resp.status_code == 400, (bad, resp.text)
    assert (await admin.get("/admin/v1/tenants/nobody/usage")).status_code == 404


async def test_prompt_caps_count_every_part_of_the_prompt(
    admin: httpx.AsyncClient, client: httpx.AsyncClient, tenant_key: str
) -> None:
    """Refusal parts reach the template too, and a prompt of token ids counts a byte per token."""
    await limit(admin, max_prompt_bytes=40)
    parts = [{"type": "text", "text": "a" * 20}, {"type": "refusal", "refusal": "b" * 21}]
    resp = await client.post(
        CHAT, json={"model": "support", "messages": [{"role": "assistant", "content": parts}]}, headers=auth(tenant_key)
    )
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "messages"
    ids = await client.post("/v1/completions", json={"model": "support", "prompt": list(range(41))}, headers=auth(tenant_key))
    assert ids.status_code == 400 and ids.json()["error"]["param"] == "prompt"


async def test_a_cut_stream_of_an_unlimited_tenant_is_metered_what_its_chunks_reported(
    admin: httpx.AsyncClient, client: httpx.AsyncClient, tenant_key: str, script: Script
) -> None:
    """Every stream asks the backend for per-chunk usage (and strips it for the client): billing of a
    stream cut short does not depend on the tenant having token limits."""
    script.mode = "die_mid_stream"
    resp = await client.post(CHAT, json={"model": "support", "messages": HI, "stream": True}, headers=auth(tenant_key))
    assert resp.status_code == 200 and '"usage"' not in resp.text
    assert script.bodies[-1]["stream_options"] == {"include_usage": True, "continuous_usage_stats": True}
    usage = (await admin.get("/admin/v1/tenants/acme/usage")).json()["totals"]
    assert (usage["requests"], usage["prompt_tokens"], usage["completion_tokens"]) == (1, 3, 2)


async def test_usage_of_a_deleted_tenant_does_not_hold_back_everyone_elses(
    admin: httpx.AsyncClient, client: httpx.AsyncClient, tenant_key: str
) -> None:
    await registry.tenant(admin, "gone")
    gone_key = (await registry.api_key(admin, "gone"))["key"]
    for key, model in ((tenant_key, "support"), (gone_key, "tiny-llama")):
        resp = await client.post(CHAT, json={"model": model, "messages": HI}, headers=auth(key))
        assert resp.status_code == 200
    assert (await admin.delete("/admin/v1/tenants/gone")).status_code == 204  # its usage is not written yet
    usage = await admin.get("/admin/v1/tenants/acme/usage")
    assert usage.status_code == 200 and usage.json()["totals"]["requests"] == 1
