"""The closed request surface: only the OpenAI fields of each route and the vLLM extras chosen on purpose
are forwarded; the rest is a 400 that names the field. Every forwarded request carries the tenant's own
cache salt, whatever the client sent. What reaches the backend is read from the scripted upstream (it
records the bodies it was sent); that real vLLM accepts them is shown by the integration tests."""

from __future__ import annotations

import uuid

import httpx
import pytest

from app.api.openai.surface import FIELDS, salt
from tests.api.test_proxy import chat
from tests.api.test_tenants import assert_envelope
from tests.factories import registry
from tests.fixtures.faulty_upstream import Script

REFUSED = [
    "kv_transfer_params",
    "request_id",
    "priority",
    "vllm_xargs",
    "logits_processors",
    "chat_template",
    "mm_processor_kwargs",
    "prompt_embeds",
    "no_such_field",
]


@pytest.mark.parametrize("field", REFUSED)
async def test_fields_outside_the_allowlist_are_refused(
    client: httpx.AsyncClient, tenant_key: str, script: Script, field: str
) -> None:
    resp = await chat(client, tenant_key, **{field: {"x": 1}})
    assert_envelope(resp, 400)
    assert resp.json()["error"]["param"] == field and field in resp.json()["error"]["message"]
    assert script.bodies == []  # nothing was forwarded


async def test_completions_refuse_prompt_embeds_and_chat_only_fields(
    client: httpx.AsyncClient, tenant_key: str, script: Script
) -> None:
    headers = {"Authorization": f"Bearer {tenant_key}"}
    for field in ("prompt_embeds", "messages", "chat_template_kwargs"):
        body = {"model": "support", "prompt": "hi", field: "x"}
        resp = await client.post("/v1/completions", json=body, headers=headers)
        assert_envelope(resp, 400)
        assert resp.json()["error"]["param"] == field
    assert script.bodies == []


async def test_chosen_extras_pass_and_every_request_gets_the_tenants_salt(
    client: httpx.AsyncClient, admin: httpx.AsyncClient, tenant_key: str, script: Script
) -> None:
    extras = {"top_k": 5, "min_tokens": 1, "ignore_eos": True, "repetition_penalty": 1.1, "seed": 3}
    resp = await chat(client, tenant_key, cache_salt="chosen-by-the-client", **extras)
    assert resp.status_code == 200, resp.text
    (sent,) = script.bodies
    assert {k: sent[k] for k in extras} == extras
    tenants = (await admin.get("/admin/v1/tenants")).json()["data"]
    acme = next(t for t in tenants if t["name"] == "acme")
    assert sent["cache_salt"] == salt(uuid.UUID(acme["id"]))  # overwritten: the tenant's

    # Another tenant's requests land in another prefix-cache partition.
    await registry.tenant(admin, "globex")
    other = str((await registry.api_key(admin, "globex"))["key"])
    resp = await client.post(
        "/v1/chat/completions",
        json={"model": "tiny-llama", "messages": [{"role": "user", "content": "hi"}]},
        headers={"Authorization": f"Bearer {other}"},
    )
    assert resp.status_code == 200, resp.text
    assert script.bodies[1]["cache_salt"] != sent["cache_salt"]


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"stream": "yes"}, "stream"),
        ({"stream": 1}, "stream"),
        ({"stream": True, "stream_options": {"include_usage": "true"}}, "stream_options.include_usage"),
        ({"stream": True, "stream_options": []}, "stream_options"),
        ({"stream": True, "stream_options": {"per_token": True}}, "stream_options.per_token"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x"}}]}]},
         "messages[0].content[0].type"),
        ({"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "input_audio"}]}]},
         "messages[0].content[1].type"),
        ({"messages": "hi"}, "messages"),
    ],
)  # fmt: skip
async def test_malformed_fields_are_400_naming_them(
    client: httpx.AsyncClient, tenant_key: str, script: Script, body: dict[str, object], param: str
) -> None:
    resp = await chat(client, tenant_key, **body)
    assert_envelope(resp, 400)
    assert resp.json()["error"]["param"] == param, resp.text
    assert script.bodies == []


async def test_text_parts_pass(client: httpx.AsyncClient, tenant_key: str, script: Script) -> None:
    messages = [{"role": "user", "content": [{"type": "text", "text": "hello"}]}]
    resp = await chat(client, tenant_key, messages=messages)
    assert resp.status_code == 200, resp.text
    assert script.bodies[0]["messages"] == messages


def test_both_routes_take_the_openai_basics() -> None:
    common = {"model", "stream", "stream_options", "max_tokens", "temperature", "top_p", "n", "stop", "seed"}
    assert common <= FIELDS["/v1/chat/completions"] and common <= FIELDS["/v1/completions"]
    assert "messages" in FIELDS["/v1/chat/completions"] and "prompt" in FIELDS["/v1/completions"]
