"""Reads a base model's LoRA-relevant shape facts from its Hugging Face config.json."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from app.errors import InvalidRequest


@dataclass(frozen=True)
class ArchitectureFacts:
    architecture: str | None
    hidden_size: int
    num_layers: int
    module_shapes: dict[str, list[int]]


def facts_from_config(cfg: dict[str, Any]) -> ArchitectureFacts:
    """Module sizes of Llama-style decoders (Llama, Mistral, Qwen2/3, Gemma, Phi-3 style projections)."""
    try:
        hidden = int(cfg["hidden_size"])
        layers = int(cfg["num_hidden_layers"])
        heads = int(cfg["num_attention_heads"])
        kv_heads = int(cfg.get("num_key_value_heads") or heads)
        head_dim = int(cfg.get("head_dim") or hidden // heads)
        inter = int(cfg["intermediate_size"])
    except (KeyError, TypeError, ValueError) as exc:
        raise InvalidRequest(
            f"config.json lacks a Llama-style field ({exc}); pass hidden_size, num_layers and module_shapes",
            param="path",
        ) from exc
    q, kv = heads * head_dim, kv_heads * head_dim
    shapes = {
        "q_proj": [hidden, q],
        "k_proj": [hidden, kv],
        "v_proj": [hidden, kv],
        "o_proj": [q, hidden],
        "gate_proj": [hidden, inter],
        "up_proj": [hidden, inter],
        "down_proj": [inter, hidden],
    }
    archs = cfg.get("architectures") or []
    return ArchitectureFacts(
        architecture=archs[0] if archs else cfg.get("model_type"),
        hidden_size=hidden,
        num_layers=layers,
        module_shapes=shapes,
    )


def facts_from_path(path: str) -> ArchitectureFacts:
    config = Path(path) / "config.json"
    if not config.is_file():
        raise InvalidRequest(
            f"no config.json at {path!r}: give hidden_size, num_layers and module_shapes explicitly",
            param="path",
        )
    try:
        return facts_from_config(json.loads(config.read_text()))
    except (OSError, json.JSONDecodeError) as exc:
        raise InvalidRequest(f"cannot read {config}: {exc}", param="path") from exc
