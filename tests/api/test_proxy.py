"""The data path's own logic, in-process: SSE framing and rewriting, usage handling, fault mapping,
and no database work per request once the registry cache is warm."""

from __future__ import annotations

import httpx
import orjson
import pytest
from sqlalchemy import event
from sqlalchemy.engine import Engine

from tests.factories.adapters import TINY_BASE
from tests.fixtures.faulty_upstream import Script, serve


async def chat(client: httpx.AsyncClient, key: str, **body: object) -> httpx.Response:
    payload = {"model": "support", "messages": [{"role": "user", "content": "hi"}], **body}
    return await client.post("/v1/chat/completions", json=payload, headers={"Authorization": f"Bearer {key}"})


def events(resp: httpx.Response) -> list[bytes]:
    return [e for e in resp.content.split(b"\n\n") if e]


@pytest.mark.parametrize("mode", ["ok", "drip"])
@pytest.mark.parametrize("include_usage", [False, True])
async def test_stream_rewritten_whatever_the_framing(
    client: httpx.AsyncClient, tenant_key: str, script: Script, mode: str, include_usage: bool
) -> None:
    script.mode = mode  # "drip": one byte per write, so events and names split across reads
    extra = {"stream_options": {"include_usage": True}} if include_usage else {}
    resp = await chat(client, tenant_key, stream=True, **extra)
    assert resp.status_code == 200
    evs = events(resp)
    assert evs[-1] == b"data: [DONE]"
    objs = [orjson.loads(e[6:]) for e in evs[:-1]]
    assert "".join(o["choices"][0]["delta"]["content"] for o in objs if o["choices"]) == "Hello"
    assert {o["model"] for o in objs} == {"support"}
    assert (objs[-1].get("usage") is not None) is include_usage
    assert b"lgw-" not in resp.content


async def test_backend_dying_mid_stream_ends_with_an_error_event(
    client: httpx.AsyncClient, tenant_key: str, script: Script
) -> None:
    script.mode = "die_mid_stream"
    resp = await chat(client, tenant_key, stream=True)
    evs = events(resp)
    assert evs[-1] == b"data: [DONE]"
    error = orjson.loads(evs[-2][6:])["error"]
    assert error["type"] == "server_error" and error["message"]
    assert b"Hel" in evs[0]  # what was produced before the failure was passed on


async def test_a_backends_error_event_is_told_in_our_words(
    client: httpx.AsyncClient, tenant_key: str, script: Script
) -> None:
    script.mode = "error_event"
    resp = await chat(client, tenant_key, stream=True)
    evs = events(resp)
    error = orjson.loads(evs[-2][6:])["error"]
    assert error["type"] == "server_error" and error["code"] == "backend_error"
    assert error["message"].endswith(f"(request id: {resp.headers['x-request-id']})")
    assert b"EngineCore" not in resp.content and b"/opt/vllm" not in resp.content
    assert evs[-1] == b"data: [DONE]"


async def test_an_error_event_then_a_break_gives_one_error_and_one_done(
    client: httpx.AsyncClient, tenant_key: str, script: Script
) -> None:
    script.mode = "error_then_die"
    resp = await chat(client, tenant_key, stream=True)
    evs = events(resp)
    assert evs[-1] == b"data: [DONE]" and evs.count(b"data: [DONE]") == 1
    assert sum(1 for e in evs if b'"error"' in e) == 1, evs


async def test_a_partial_event_after_a_broken_stream_is_dropped(
    client: httpx.AsyncClient, tenant_key: str, script: Script
) -> None:
    script.mode = "die_mid_event"
    resp = await chat(client, tenant_key, stream=True)
    evs = events(resp)
    assert evs[-1] == b"data: [DONE]"  # nothing after it
    assert orjson.loads(evs[-2][6:])["error"]["type"] == "server_error"
    assert not any(b'"ob' in e and not e.endswith(b"}") for e in evs)  # the cut event's start
    assert all(orjson.loads(e[6:]) for e in evs[:-1])  # every event sent is whole


async def test_upstream_500_is_502_without_internals(
    client: httpx.AsyncClient, tenant_key: str, script: Script
) -> None:
    script.mode = "error_500"
    resp = await chat(client, tenant_key)
    assert resp.status_code == 502
    assert resp.json()["error"]["type"] == "server_error"
    assert "CUDA" not in resp.text


async def test_adapter_reloaded_once_then_error(
    client: httpx.AsyncClient, tenant_key: str, script: Script
) -> None:
    script.mode = "always_404"
    resp = await chat(client, tenant_key)
    # The adapter exists (the gateway resolved it): a backend that keeps forgetting it is the fleet's
    # fault, told as a retryable 503, never as the tenant's 404.
    assert resp.status_code == 503 and resp.headers["retry-after"] == "1"
    assert script.chat_calls == 2 and len(script.loads) == 2  # first load, one reload, no loop
    assert "support" in resp.json()["error"]["message"] and "lgw-" not in resp.text


async def test_a_retry_elsewhere_still_reloads_a_forgotten_adapter(
    client: httpx.AsyncClient, admin: httpx.AsyncClient, tenant_key: str, script: Script
) -> None:
    # One backend fails every request (a dying engine), the other forgets every adapter it loads (a
    # restarted one the gateway's records still credit with it): each retry is spent once, in whatever
    # order placement meets them, and the answer is a 503 to retry, never the forgetting one's 404
    # (what a rolling restart used to hand a client now and then).
    script.mode = "error_500"
    other = Script(mode="always_404")
    async for url in serve(other, TINY_BASE):
        resp = await admin.post(
            "/admin/v1/backends",
            json={"name": "up-2", "url": url, "base_model": TINY_BASE, "gpu_slots": 4, "max_lora_rank": 16},
        )
        assert resp.status_code == 201, resp.text
        resp = await chat(client, tenant_key)
        assert resp.status_code == 503 and "retry-after" in resp.headers, resp.text
        assert "lgw-" not in resp.text and "127.0.0.1" not in resp.text
        assert script.chat_calls <= 1 and other.chat_calls == 2 and len(other.loads) == 2, (
            script.chat_calls,
            other.chat_calls,
            other.loads,
        )


async def test_concurrent_first_requests_load_once(
    client: httpx.AsyncClient, tenant_key: str, script: Script
) -> None:
    import asyncio

    responses = await asyncio.gather(*(chat(client, tenant_key) for _ in range(20)))
    assert {r.status_code for r in responses} == {200}
    assert len(script.loads) == 1


async def test_no_database_query_per_request_once_warm(client: httpx.AsyncClient, tenant_key: str) -> None:
    assert (await chat(client, tenant_key)).status_code == 200  # warms key, adapter and backend caches
    statements: list[str] = []

    def count(conn, cursor, statement, *args):  # type: ignore[no-untyped-def]
        statements.append(statement)

    event.listen(Engine, "before_cursor_execute", count)
    try:
        for _ in range(10):
            assert (await chat(client, tenant_key)).status_code == 200
            assert (await chat(client, tenant_key, stream=True)).status_code == 200
    finally:
        event.remove(Engine, "before_cursor_execute", count)
    assert statements == []


async def test_oversized_request_is_413(client: httpx.AsyncClient, tenant_key: str, settings) -> None:  # type: ignore[no-untyped-def]
    big = "x" * (settings.MAX_REQUEST_BYTES + 1)
    resp = await chat(client, tenant_key, messages=[{"role": "user", "content": big}])
    assert resp.status_code == 413
    assert resp.json()["error"]["code"] == "payload_too_large"


async def test_an_overlong_model_name_is_400_before_any_lookup(
    client: httpx.AsyncClient, tenant_key: str
) -> None:
    assert (await chat(client, tenant_key)).status_code == 200  # warm: the key is cached
    statements: list[str] = []

    def count(conn, cursor, statement, *args):  # type: ignore[no-untyped-def]
        statements.append(statement)

    event.listen(Engine, "before_cursor_execute", count)
    try:
        for body in (
            {"model": "a" * 100_000},
            {"model": "tiny-llama", "lora_request": {"lora_name": "a" * 300}},
        ):
            resp = await chat(client, tenant_key, **body)
            assert resp.status_code == 400, resp.text
            assert "longer than 256 characters" in resp.json()["error"]["message"]
    finally:
        event.remove(Engine, "before_cursor_execute", count)
    assert statements == []  # refused without a registry lookup


async def test_malformed_keys_and_versions_cost_no_lookup(client: httpx.AsyncClient, tenant_key: str) -> None:
    """Tokens that cannot be keys are refused before hashing or any query; a version that is not ASCII
    digits (`x@²`: str.isdigit says yes, int() says no) is a 400, not a 500."""
    assert (await chat(client, tenant_key)).status_code == 200  # warm: the real key is cached
    statements: list[str] = []

    def count(conn, cursor, statement, *args):  # type: ignore[no-untyped-def]
        statements.append(statement)

    event.listen(Engine, "before_cursor_execute", count)
    try:
        for token in (
            "x" * 5000,
            "lgw-short",
            "lgw-" + "." * 43,
            tenant_key + "x",
            "Bearer",
            "lgw-" + "a" * 42 + "/",
        ):
            resp = await chat(client, token)
            assert resp.status_code == 401, resp.text
            assert resp.json()["error"]["code"] == "invalid_api_key"
        for model in ("support@²", "support@\u0661", "support@-1", "support@"):
            resp = await chat(client, tenant_key, model=model)
            assert resp.status_code == 400, (model, resp.text)
            assert resp.json()["error"]["param"] == "model"
    finally:
        event.remove(Engine, "before_cursor_execute", count)
    assert statements == []


async def test_every_response_names_its_request(
    client: httpx.AsyncClient, tenant_key: str, script: Script, caplog: pytest.LogCaptureFixture
) -> None:
    """x-request-id on every response (the client's when well-formed, else a new one), at the end of
    every error message, and on the gateway's log records written for the request."""
    auth = {"Authorization": f"Bearer {tenant_key}"}
    ok = await client.post(
        "/v1/chat/completions",
        json={"model": "support", "messages": [{"role": "user", "content": "hi"}], "stream": True},
        headers={**auth, "x-request-id": "client-trace.42"},
    )
    assert ok.status_code == 200 and ok.headers["x-request-id"] == "client-trace.42"
    ids = set()
    for headers in ({"x-request-id": "bad id with spaces"}, {"x-request-id": "x" * 500}, {}):
        resp = await client.get("/v1/models", headers={**auth, **headers})
        assert resp.status_code == 200
        ids.add(resp.headers["x-request-id"])
    assert len(ids) == 3 and all(len(i) == 24 for i in ids)  # replaced, one of ours each
    assert (await client.get("/healthz")).headers["x-request-id"]
    script.mode = "error_500"  # the backend fails: the gateway logs it
    with caplog.at_level("INFO", logger="app"):
        resp = await client.post(
            "/v1/chat/completions",
            json={"model": "support", "messages": [{"role": "user", "content": "hi"}]},
            headers={**auth, "x-request-id": "trace-7"},
        )
    assert resp.status_code == 502 and resp.json()["error"]["message"].endswith("(request id: trace-7)")
    records = [r for r in caplog.records if r.name.startswith("app.")]
    assert records and all(getattr(r, "request_id", None) == "trace-7" for r in records), [(r.name, r.msg, getattr(r, "request_id", None)) for r in records]
    # The request's own line (GATEWAY_LOG_REQUESTS=errors): its facts, never the key or the prompt.
    (line,) = [r for r in records if r.name == "app.access"]
    assert (line.tenant, line.model, line.status, line.error_type) == ("acme", "support", 502, "server_error")  # type: ignore[attr-defined]
    assert tenant_key not in repr(line.__dict__) and "'hi'" not in repr(line.__dict__)
