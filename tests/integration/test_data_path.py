"""The official openai client through the gateway against the real vLLM CPU server: same greedy tokens
as vLLM gives directly for the same adapter, tenant isolation, and the error classes clients see."""

from __future__ import annotations

from pathlib import Path

import httpx
import openai
import pytest
from inotify_simple import INotify, flags

from app.backends.launcher import VllmCpuServer
from tests.integration.conftest import BASE, VLLM_KEY, Gateway

pytestmark = pytest.mark.vllm

MESSAGES = [{"role": "user", "content": "Hello! How are you today?"}]
PROMPT = "Let us write some code together."


def client(gw: Gateway, tenant: str = "acme", **kw: object) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.url + "/v1", api_key=gw.keys[tenant], max_retries=0, **kw)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def vllm_client(vllm: VllmCpuServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=vllm.base_url + "/v1", api_key=vllm.config.api_key or "none", max_retries=0)


def chat(c: openai.OpenAI, model: str, **kw: object) -> str:
    resp = c.chat.completions.create(model=model, messages=MESSAGES, max_tokens=16, temperature=0, **kw)  # type: ignore[arg-type]
    return resp.choices[0].message.content or ""


class TestSameTokensAsVllm:
    def test_chat(self, gateway: Gateway, vllm_client: openai.OpenAI, direct: dict[str, str]) -> None:
        resp = client(gateway).chat.completions.create(
            model="support", messages=MESSAGES, max_tokens=16, temperature=0
        )  # type: ignore[arg-type]
        expected = chat(vllm_client, direct["acme/support"])
        assert resp.choices[0].message.content == expected
        assert resp.model == "support"
        assert resp.usage is not None and resp.usage.completion_tokens == 16

    def test_completions(self, gateway: Gateway, vllm_client: openai.OpenAI, direct: dict[str, str]) -> None:
        got = client(gateway).completions.create(model="legal", prompt=PROMPT, max_tokens=16, temperature=0)
        want = vllm_client.completions.create(
            model=direct["acme/legal"], prompt=PROMPT, max_tokens=16, temperature=0
        )
        assert got.choices[0].text == want.choices[0].text
        assert got.model == "legal"

    def test_adapter_changes_the_output(self, gateway: Gateway) -> None:
        assert chat(client(gateway), "support") != chat(client(gateway), BASE)

    @pytest.mark.parametrize("include_usage", [False, True])
    def test_streaming(
        self, gateway: Gateway, vllm_client: openai.OpenAI, direct: dict[str, str], include_usage: bool
    ) -> None:
        extra = {"stream_options": {"include_usage": True}} if include_usage else {}
        chunks = list(
            client(gateway).chat.completions.create(
                model="support",
                messages=MESSAGES,
                max_tokens=16,
                temperature=0,
                stream=True,
                **extra,  # type: ignore[arg-type]
            )
        )
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == chat(vllm_client, direct["acme/support"])
        assert {c.model for c in chunks} == {"support"}
        usage = [c for c in chunks if c.usage is not None]
        if include_usage:
            assert len(usage) == 1 and usage[0].usage is not None and usage[0].usage.completion_tokens == 16
            assert usage[0] is chunks[-1] and usage[0].choices == []
        else:
            assert usage == []  # the gateway asked for it upstream, and dropped it again

    def test_streaming_completions(
        self, gateway: Gateway, vllm_client: openai.OpenAI, direct: dict[str, str]
    ) -> None:
        stream = client(gateway).completions.create(
            model="legal", prompt=PROMPT, max_tokens=16, temperature=0, stream=True
        )
        text = "".join(c.choices[0].text for c in stream if c.choices)
        want = vllm_client.completions.create(
            model=direct["acme/legal"], prompt=PROMPT, max_tokens=16, temperature=0
        )
        assert text == want.choices[0].text

    def test_pinned_version(self, gateway: Gateway) -> None:
        assert chat(client(gateway), "support@1") == chat(client(gateway), "support")
        with pytest.raises(openai.NotFoundError):
            chat(client(gateway), "support@7")


class TestTenants:
    def test_same_name_different_adapters(
        self, gateway: Gateway, vllm_client: openai.OpenAI, direct: dict[str, str]
    ) -> None:
        acme, globex = chat(client(gateway, "acme"), "support"), chat(client(gateway, "globex"), "support")
        assert acme == chat(vllm_client, direct["acme/support"])
        assert globex == chat(vllm_client, direct["globex/support"])
        assert acme != globex

    def test_models_list(self, gateway: Gateway) -> None:
        assert sorted(m.id for m in client(gateway, "acme").models.list()) == sorted(
            [BASE, "legal", "support"]
        )
        assert sorted(m.id for m in client(gateway, "globex").models.list()) == sorted([BASE, "support"])

    def test_other_tenants_adapter_is_not_found(self, gateway: Gateway) -> None:
        with pytest.raises(openai.NotFoundError) as exc:
            chat(client(gateway, "globex"), "legal")  # acme's
        assert exc.value.code == "model_not_found"

    def test_backend_never_sees_the_tenants_names(self, gateway: Gateway, vllm: VllmCpuServer) -> None:
        chat(client(gateway, "acme"), "support")
        ids = [m["id"] for m in httpx.get(vllm.base_url + "/v1/models", headers=vllm.headers).json()["data"]]
        assert "support" not in ids and "legal" not in ids
        assert any(i.startswith("lgw-") for i in ids)


class TestErrors:
    def test_unknown_model(self, gateway: Gateway) -> None:
        with pytest.raises(openai.NotFoundError) as exc:
            chat(client(gateway), "no-such-adapter")
        assert exc.value.code == "model_not_found"

    def test_bad_key(self, gateway: Gateway) -> None:
        bad = openai.OpenAI(base_url=gateway.url + "/v1", api_key="lgw-not-a-key", max_retries=0)
        with pytest.raises(openai.AuthenticationError) as exc:
            chat(bad, "support")
        assert exc.value.code == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()

    def test_adapter_of_another_base_model(self, gateway: Gateway) -> None:
        # Register a second base model (not served anywhere) and an adapter for it, then name it in
        # the seed's lora_request style against tiny-llama.
        shapes = {"q_proj": [64, 64], "v_proj": [64, 64]}
        gateway.admin.post(
            "/admin/v1/base-models",
            json={
                "name": "other-llama",
                "path": "/nowhere",
                "hidden_size": 64,
                "num_layers": 1,
                "module_shapes": shapes,
            },
        )
        from tests.factories.adapters import adapter_config, adapter_files, adapter_tensors, multipart

        files = adapter_files(
            config=adapter_config(base="other-llama"),
            tensors=adapter_tensors(layers=1, shapes={"q_proj": [64, 64], "v_proj": [64, 64]}),
        )
        resp = gateway.admin.post(
            "/admin/v1/tenants/acme/adapters", data={"name": "elsewhere"}, files=multipart(files)
        )
        assert resp.status_code == 201, resp.text

        with pytest.raises(openai.BadRequestError) as exc:
            chat(client(gateway), BASE, extra_body={"lora_request": {"lora_name": "elsewhere"}})
        assert "other-llama" in exc.value.message
        # Named directly, it resolves, but nothing serves its base model: 503 with Retry-After.
        with pytest.raises(openai.InternalServerError) as unavailable:
            chat(client(gateway), "elsewhere")
        assert unavailable.value.status_code == 503
        assert unavailable.value.response.headers["retry-after"]

    def test_hostile_lora_path_is_never_opened(self, gateway: Gateway, tiny, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
        # A directory holding a valid adapter (globex's), watched with inotify: if the gateway or vLLM
        # opened anything in it, the watch would say so.
        trap = tmp_path / "trap"
        trap.mkdir()
        for f in tiny.adapters[2].glob("adapter_*"):
            (trap / f.name).write_bytes(f.read_bytes())
        with INotify() as inotify:
            inotify.add_watch(trap, flags.OPEN | flags.ACCESS)
            raw = httpx.post(
                gateway.url + "/v1/chat/completions",
                headers={"Authorization": f"Bearer {gateway.keys['acme']}"},
                json={
                    "model": BASE,
                    "messages": MESSAGES,
                    "max_tokens": 16,
                    "temperature": 0,
                    "lora_request": {"lora_name": "support", "lora_path": str(trap)},
                },
                timeout=60,
            )
            events = inotify.read(timeout=500)
        assert raw.status_code == 200, raw.text
        assert events == []
        assert "lora_path" in raw.headers["x-lora-gateway-warning"]
        # It ran acme's own "support", not what the path pointed at.
        assert raw.json()["choices"][0]["message"]["content"] == chat(client(gateway), "support")

    def test_unreachable_backend_is_503(self, gateway: Gateway) -> None:
        dead = f"http://127.0.0.1:{_closed_port()}"
        gateway.admin.post(
            "/admin/v1/base-models",
            json={
                "name": "ghost",
                "path": "/nowhere",
                "hidden_size": 64,
                "num_layers": 1,
                "module_shapes": {"q_proj": [64, 64]},
            },
        )
        resp = gateway.admin.post(
            "/admin/v1/backends", json={"name": "dead", "url": dead, "base_model": "ghost", "gpu_slots": 1}
        )
        assert resp.status_code == 201, resp.text
        with pytest.raises(openai.InternalServerError) as exc:
            chat(client(gateway), "ghost")
        assert exc.value.status_code == 503
        assert exc.value.response.headers["retry-after"]

    def test_backend_calls_carry_its_token(self, gateway: Gateway, vllm: VllmCpuServer) -> None:
        """vLLM runs with a token (--api-key): nobody without it may list or load adapters there; the
        gateway sends it on data and control calls; a wrong one is the operator's error (a 502 that names
        no backend), never shown to the tenant as a bad key of theirs."""
        for method, path in (("GET", "/v1/models"), ("POST", "/v1/load_lora_adapter")):
            resp = httpx.request(method, vllm.base_url + path, json={"lora_name": "x", "lora_path": "/etc"})
            assert resp.status_code == 401, resp.text
        assert chat(client(gateway), "legal")  # a load and a request, both through the token
        resp = gateway.admin.patch("/admin/v1/backends/cpu-1", json={"api_key": "not-the-token"})
        assert resp.status_code == 200 and resp.json()["api_key_set"] is True
        try:
            with pytest.raises(openai.APIStatusError) as exc:
                chat(client(gateway), "support")
            assert exc.value.status_code == 502
            assert vllm.base_url not in exc.value.response.text and "cpu-1" not in exc.value.response.text
        finally:
            gateway.admin.patch("/admin/v1/backends/cpu-1", json={"api_key": VLLM_KEY}).raise_for_status()
        assert chat(client(gateway), "support")

    def test_malformed_requests(self, gateway: Gateway) -> None:
        h = {"Authorization": f"Bearer {gateway.keys['acme']}"}
        url = gateway.url + "/v1/chat/completions"
        for body, param in [
            (b"{nope", None),
            (b"[1]", None),
            (b'{"messages": []}', "model"),
            (b'{"model": 5}', "model"),
            (b'{"model": "support@x"}', "model"),
            (b'{"model": "tiny-llama", "lora_request": "support"}', "lora_request"),
        ]:
            resp = httpx.post(url, content=body, headers=h | {"content-type": "application/json"})
            assert resp.status_code == 400, (body, resp.text)
            assert resp.json()["error"]["param"] == param
        # vLLM's own 400 (a bad sampling parameter) comes back as the same class, in the tenant's names.
        with pytest.raises(openai.BadRequestError) as exc:
            client(gateway).chat.completions.create(model="support", messages=MESSAGES, max_tokens=-3)  # type: ignore[arg-type]
        assert "lgw-" not in exc.value.message


def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_revoked_key_stops_within_the_cache_ttl(gateway: Gateway) -> None:
    key = gateway.admin.post("/admin/v1/tenants/acme/api-keys", json={"name": "short-lived"}).json()
    c = openai.OpenAI(base_url=gateway.url + "/v1", api_key=key["key"], max_retries=0)
    assert c.models.list().data
    gateway.admin.delete(f"/admin/v1/tenants/acme/api-keys/{key['id']}")
    # The gateway under test runs with GATEWAY_CACHE_TTL_S=1, and this replica invalidates at once.
    with pytest.raises(openai.AuthenticationError):
        c.models.list()
