"""The merge math on its own: W' = W + (B @ A) * s, with s = alpha / r (alpha / sqrt(r) with rslora),
the delta transposed for fan_in_fan_out layers, and per-module r / alpha from rank_pattern / alpha_pattern.
Checked against peft's merge_and_unload and against what our merge step writes to disk, and the step's
gate refusing a bad merge."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from app.devkit.tinymodel import TinyModel, build_tiny_model
from app.promotion.ml import merge as merge_step
from app.promotion.ml.protocol import GateFailed

peft = pytest.importorskip("peft")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> TinyModel:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-merge"), n_adapters=0)


def _llama(tiny: TinyModel) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny.base, dtype=torch.float32)


def _scale(cfg: Any, r: int, alpha: float) -> float:
    return alpha / math.sqrt(r) if cfg.use_rslora else alpha / r


def _pattern(pattern: dict[str, Any], name: str, default: Any) -> Any:
    # peft matches a pattern key against the module name's end (".q_proj" or the full name)
    for key, value in pattern.items():
        if name == key or name.endswith("." + key):
            return value
    return default


def hand_merged(peft_model: Any, cfg: Any) -> dict[str, torch.Tensor]:
    """The merged weight of every targeted module, by the formula (not by peft)."""
    from peft.tuners.lora import LoraLayer

    out = {}
    for name, module in peft_model.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        short = name.removeprefix("base_model.model.")
        a = module.lora_A["default"].weight.detach()
        b = module.lora_B["default"].weight.detach()
        r = _pattern(cfg.rank_pattern, short, cfg.r)
        alpha = _pattern(cfg.alpha_pattern, short, cfg.lora_alpha)
        assert a.shape[0] == r  # the pattern took effect
        delta = (b @ a) * _scale(cfg, r, alpha)
        if cfg.fan_in_fan_out:
            delta = delta.T
        out[f"{short}.weight"] = module.get_base_layer().weight.detach().clone() + delta
    return out


CONFIGS = {
    "plain": {"r": 8, "lora_alpha": 16},
    "rslora": {"r": 8, "lora_alpha": 16, "use_rslora": True},
    "patterns": {
        "r": 8,
        "lora_alpha": 16,
        "rank_pattern": {"q_proj": 4, "model.layers.1.self_attn.v_proj": 2},
        "alpha_pattern": {"k_proj": 3, "o_proj": 40},
    },
}


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_hand_formula_equals_peft_merge(tiny: TinyModel, kind: str) -> None:
    cfg = peft.LoraConfig(
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], init_lora_weights=False, **CONFIGS[kind]
    )
    torch.manual_seed(1)
    model = peft.get_peft_model(_llama(tiny), cfg)
    expected = hand_merged(model, cfg)
    merged = model.merge_and_unload(safe_merge=True).state_dict()
    assert len(expected) == 8
    for key, want in expected.items():
        torch.testing.assert_close(merged[key], want, rtol=0, atol=1e-6)


def test_fan_in_fan_out_transposes_the_delta() -> None:
    """GPT-2's Conv1D keeps weights as (in, out): peft merges the transposed delta there."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    base = GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=2, n_head=2, vocab_size=128, n_positions=64))
    cfg = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True, init_lora_weights=False
    )
    model = peft.get_peft_model(base, cfg)
    expected = hand_merged(model, cfg)
    merged = model.merge_and_unload(safe_merge=True).state_dict()
    assert len(expected) == 2
    for key, want in expected.items():
        assert want.shape == (64, 192)  # (in, out): the untransposed delta would not even fit
        torch.testing.assert_close(merged[key], want, rtol=0, atol=1e-6)


def _save_adapter(tiny: TinyModel, folder: Path, **config: Any) -> tuple[Path, dict[str, torch.Tensor]]:
    cfg = peft.LoraConfig(target_modules=["q_proj", "v_proj"], init_lora_weights=False, **config)
    torch.manual_seed(5)
    model = peft.get_peft_model(_llama(tiny), cfg)
    expected = hand_merged(model, cfg)
    model.save_pretrained(str(folder))
    return folder, expected


@pytest.mark.parametrize("kind", ["rslora", "patterns"])
def test_merge_step_writes_the_formula(tiny: TinyModel, tmp_path: Path, kind: str) -> None:
    config = dict(CONFIGS[kind])
    if kind == "patterns":
        config["alpha_pattern"] = {"q_proj": 40}
    adapter, expected = _save_adapter(tiny, tmp_path / "adapter", **config)
    figures = merge_step.merge(tiny.base, adapter, tmp_path / "out")
    assert figures["targeted_modules"] == 4 and figures["unchanged_modules"] == []
    assert figures["logits_max_abs_diff"] <= 1e-3
    saved = load_file(tmp_path / "out" / "model.safetensors")
    assert not [k for k in saved if "lora_" in k]
    for key, want in expected.items():
        torch.testing.assert_close(saved[key], want, rtol=0, atol=1e-6)
    reference = json.loads((tmp_path / "out" / merge_step.REFERENCE_FILE).read_text())["prompts"]
    assert len(reference) == len(merge_step.REFERENCE_PROMPTS)
    first = reference[0]
    # teacher-forced top-1 over prompt + continuation; the greedy tokens are its own tail
    assert len(first["top1"]) == len(first["prompt_ids"]) + len(first["greedy_ids"]) - 1
    assert first["top1"][len(first["prompt_ids"]) - 1 :] == first["greedy_ids"][: len(first["top1"])]


def test_gate_refuses_an_adapter_that_changes_nothing(tiny: TinyModel, tmp_path: Path) -> None:
    """peft's default init (B = 0) makes an adapter whose merge changes no weight: refused, nothing saved."""
    cfg = peft.LoraConfig(target_modules=["q_proj"], r=4, lora_alpha=8)
    peft.get_peft_model(_llama(tiny), cfg).save_pretrained(str(tmp_path / "zero"))
    with pytest.raises(GateFailed, match="targeted modules unchanged"):
        merge_step.merge(tiny.base, tmp_path / "zero", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_gate_refuses_logits_beyond_the_tolerance(tiny: TinyModel, tmp_path: Path) -> None:
    adapter, _ = _save_adapter(tiny, tmp_path / "adapter", r=8, lora_alpha=16)
    with pytest.raises(GateFailed, match="merged logits differ"):
        merge_step.merge(tiny.base, adapter, tmp_path / "out", tolerance=1e-12)
    assert not (tmp_path / "out").exists()
