"""The seed lesson's client code, run unchanged against the gateway except for base URL, key and model.

Each snippet below is copied from the lesson verbatim; the test substitutes only those three values
(textually, so any other change would show in this file) and runs it in a fresh interpreter."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from tests.integration.conftest import BASE, Gateway, upload

pytestmark = pytest.mark.vllm

CHAT = """
from openai import OpenAI

# Point to your vLLM server instead of OpenAI
client = OpenAI(
    base_url="http://localhost:8000/v1",
    api_key="not-needed",  # vLLM doesn't require auth by default
)

response = client.chat.completions.create(
    model="./mistral-7b-merged",  # use the model path as the model name
    messages=[
        {"role": "system", "content": "You are a helpful customer support agent."},
        {"role": "user", "content": "My billing invoice shows the wrong amount."}
    ],
    max_tokens=256,
    temperature=0.7,
)

print(response.choices[0].message.content)
"""

LORA_REQUEST = """
# Load specific adapter per request
response = client.chat.completions.create(
    model="mistralai/Mistral-7B-v0.1",
    messages=[{"role": "user", "content": "..."}],
    extra_body={
        "lora_request": {
            "lora_name": "customer_support_v2",
            "lora_path": "./qlora-mistral-adapter",
        }
    }
)
"""

THROUGHPUT = """
import asyncio
import time
from openai import AsyncOpenAI

async def benchmark_throughput(num_requests=100):
    client = AsyncOpenAI(base_url="http://localhost:8000/v1", api_key="none")
    
    prompts = ["Explain our return policy in one paragraph."] * num_requests
    
    start = time.time()
    tasks = [
        client.chat.completions.create(
            model="./mistral-7b-merged",
            messages=[{"role": "user", "content": p}],
            max_tokens=128,
        )
        for p in prompts
    ]
    results = await asyncio.gather(*tasks)
    elapsed = time.time() - start
    
    total_output_tokens = sum(r.usage.completion_tokens for r in results)
    throughput = total_output_tokens / elapsed
    
    print(f"Throughput: {throughput:.0f} output tokens/second")
    print(f"Latency per request: {elapsed/num_requests*1000:.0f} ms")
    print(f"Total time for {num_requests} requests: {elapsed:.1f}s")

asyncio.run(benchmark_throughput())
"""


def _run(source: str) -> str:
    proc = subprocess.run(
        [sys.executable, "-c", source], capture_output=True, text=True, timeout=600, check=False
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def _point(source: str, gw: Gateway, model: str, key_literal: str) -> str:
    out = source.replace("http://localhost:8000/v1", gw.url + "/v1")
    out = out.replace(key_literal, repr(gw.keys["acme"]))
    return out.replace('"./mistral-7b-merged"', repr(model)).replace(
        '"mistralai/Mistral-7B-v0.1"', repr(model)
    )


@pytest.fixture(scope="module")
def support_v2(gateway: Gateway, tiny) -> str:  # type: ignore[no-untyped-def]
    """acme's adapter under the name the lesson uses."""
    upload(gateway.admin, "acme", "customer_support_v2", tiny.adapters[0])
    return "customer_support_v2"


def test_chat_example(gateway: Gateway) -> None:
    out = _run(_point(CHAT, gateway, "support", '"not-needed"'))
    assert out.strip()


def test_lora_request_example(gateway: Gateway, support_v2: str) -> None:
    client_setup = CHAT.split("response =")[0]  # the lesson's client, defined in the earlier snippet
    source = _point(client_setup, gateway, BASE, '"not-needed"') + _point(
        LORA_REQUEST, gateway, BASE, '"not-needed"'
    )
    source += "\nprint(response.choices[0].message.content is not None)\nprint(response.model)"
    out = _run(source).splitlines()
    assert out == ["True", support_v2]


def test_async_throughput_benchmark(gateway: Gateway) -> None:
    out = _run(_point(THROUGHPUT, gateway, "support", '"none"'))
    match = re.search(r"Throughput: (\d+) output tokens/second", out)
    assert match, out
    assert int(match[1]) > 0
    assert "Total time for 100 requests" in out
    print(out)  # noqa: T201 (the figure is part of the test's report)
