"""The tiny model builder: deterministic, reused when stamped, shaped for vLLM's CPU build, adapters that matter."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from .conftest import BASE_MODEL_NAME

if TYPE_CHECKING:
    from app.devkit.tinymodel import TinyModel

for _module in ("torch", "transformers", "tokenizers", "peft"):
    pytest.importorskip(_module)

# Imported after the skips: without the ML extras this module is skipped, not an error.
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from app.devkit import tinymodel


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_gives_byte_identical_files(tiny_model: TinyModel, tmp_path: Path) -> None:
    again = tinymodel.build_tiny_model(
        tmp_path, n_adapters=len(tiny_model.adapters), base_model_name=BASE_MODEL_NAME
    )

    assert _files(again.base) == _files(tiny_model.base)
    for mine, theirs in zip(again.adapters, tiny_model.adapters, strict=True):
        assert _files(mine) == _files(theirs)


def test_stamped_build_is_reused_and_changed_parameters_rebuild(tmp_path: Path) -> None:
    built = tinymodel.build_tiny_model(tmp_path, n_adapters=1)
    base_weights = built.base / "model.safetensors"
    adapter_weights = built.adapters[0] / "adapter_model.safetensors"
    base_mtime, adapter_mtime = base_weights.stat().st_mtime_ns, adapter_weights.stat().st_mtime_ns

    tinymodel.build_tiny_model(tmp_path, n_adapters=1)
    assert (base_weights.stat().st_mtime_ns, adapter_weights.stat().st_mtime_ns) == (
        base_mtime,
        adapter_mtime,
    )

    tinymodel.build_tiny_model(tmp_path, n_adapters=1, rank=4)
    assert base_weights.stat().st_mtime_ns == base_mtime
    assert json.loads((built.adapters[0] / "adapter_config.json").read_text())["r"] == 4


def test_base_model_fits_vllm_cpu_attention(tiny_model: TinyModel) -> None:
    config = json.loads((tiny_model.base / "config.json").read_text())

    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["hidden_size"] // config["num_attention_heads"] in {32, 64, 80, 96, 112, 128}
    assert (tiny_model.base / "model.safetensors").exists()


def test_tokenizer_adds_bos_and_renders_chat(tiny_model: TinyModel) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_model.base)

    assert tokenizer("Hello").input_ids[0] == tokenizer.bos_token_id
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hello!"}], add_generation_prompt=True, tokenize=False
    )
    assert rendered == "<s><|user|>\nHello!</s>\n<|assistant|>\n"


def test_adapter_config_names_the_callers_base_model(tiny_model: TinyModel) -> None:
    for adapter in tiny_model.adapters:
        config = json.loads((adapter / "adapter_config.json").read_text())

        assert config["base_model_name_or_path"] == BASE_MODEL_NAME
        assert config["peft_type"] == "LORA"
        assert config["r"] == 8
        assert config["target_modules"] == sorted(tinymodel.ADAPTER_TARGET_MODULES)
        assert (adapter / "adapter_model.safetensors").exists()


def test_adapters_change_the_logits_and_differ_from_each_other(tiny_model: TinyModel) -> None:
    from peft import PeftModel

    tokenizer = AutoTokenizer.from_pretrained(tiny_model.base)
    input_ids = tokenizer("The gateway routes", return_tensors="pt").input_ids

    def last_logits(adapter: Path | None) -> torch.Tensor:
        model: Any = AutoModelForCausalLM.from_pretrained(tiny_model.base, dtype=torch.float32)
        if adapter is not None:
            model = PeftModel.from_pretrained(model, adapter)
        with torch.no_grad():
            logits: torch.Tensor = model(input_ids=input_ids).logits[0, -1]
        return logits

    logits = [last_logits(None), *(last_logits(a) for a in tiny_model.adapters)]
    for i, mine in enumerate(logits):
        for theirs in logits[i + 1 :]:
            assert (mine - theirs).abs().max() > 0.1


def test_cli_prints_the_built_paths(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert tinymodel.main([str(tmp_path), "--adapters", "1", "--base-model-name", "demo"]) == 0

    printed = json.loads(capsys.readouterr().out)
    assert printed == {"base": str(tmp_path / "base"), "adapters": [str(tmp_path / "adapters" / "lora-0")]}
    config = json.loads((tmp_path / "adapters" / "lora-0" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "demo"
