"""Builds small peft-format LoRA adapters (config + safetensors) with numpy, in any shape a test needs."""

from __future__ import annotations

import io
import json
import tarfile
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import save as save_safetensors

# A tiny Llama-shaped base model: hidden 64, 4 heads of 16, 2 KV heads, 2 layers.
TINY_SHAPES: dict[str, list[int]] = {
    "q_proj": [64, 64],
    "k_proj": [64, 32],
    "v_proj": [64, 32],
    "o_proj": [64, 64],
    "gate_proj": [64, 128],
    "up_proj": [64, 128],
    "down_proj": [128, 64],
}
TINY_LAYERS = 2
TINY_BASE = "tiny-llama"


def tiny_hf_config() -> dict[str, Any]:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": TINY_LAYERS,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 256,
    }


def adapter_config(
    *,
    r: int = 8,
    alpha: float = 16,
    targets: list[str] | str | None = None,
    base: str | None = TINY_BASE,
    **extra: Any,
) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "peft_type": "LORA",
        "r": r,
        "lora_alpha": alpha,
        "target_modules": targets if targets is not None else ["q_proj", "v_proj"],
        "bias": "none",
        "task_type": "CAUSAL_LM",
    }
    if base is not None:
        cfg["base_model_name_or_path"] = base
    cfg.update(extra)
    return cfg


def adapter_tensors(
    *,
    r: int = 8,
    modules: list[str] | None = None,
    layers: int = TINY_LAYERS,
    seed: int = 0,
    shapes: dict[str, list[int]] | None = None,
) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    shapes = shapes or TINY_SHAPES
    out = {}
    for layer in range(layers):
        for m in modules or ["q_proj", "v_proj"]:
            fan_in, fan_out = shapes[m]
            group = "self_attn" if m.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else "mlp"
            prefix = f"base_model.model.model.layers.{layer}.{group}.{m}"
            out[f"{prefix}.lora_A.weight"] = rng.standard_normal((r, fan_in), dtype=np.float32)
            out[f"{prefix}.lora_B.weight"] = rng.standard_normal((fan_out, r), dtype=np.float32)
    return out


def adapter_files(
    *, config: dict[str, Any] | None = None, tensors: dict[str, np.ndarray] | None = None, seed: int = 0
) -> dict[str, bytes]:
    """File name -> bytes of a peft adapter folder."""
    config = config if config is not None else adapter_config()
    tensors = tensors if tensors is not None else adapter_tensors(r=config.get("r", 8), seed=seed)
    return {
        "adapter_config.json": json.dumps(config).encode(),
        "adapter_model.safetensors": save_safetensors(tensors),
    }


def write_adapter(folder: Path, files: dict[str, bytes]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return folder


def tar_gz(members: dict[str, bytes], *, links: dict[str, str] | None = None) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for name, target in (links or {}).items():
            info = tarfile.TarInfo(name)
            info.type = tarfile.SYMTYPE
            info.linkname = target
            tar.addfile(info)
    return buf.getvalue()


def zip_bytes(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


def multipart(files: dict[str, bytes]) -> list[tuple[str, tuple[str, bytes]]]:
    return [("file", (name, data)) for name, data in files.items()]
