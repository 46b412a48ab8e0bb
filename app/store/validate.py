"""Decides whether an uploaded LoRA adapter is one vLLM can serve on a given base model."""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import regex
from safetensors import SafetensorError, safe_open

from app.errors import InvalidRequest


class InvalidAdapter(InvalidRequest):
    code = "invalid_adapter"


# peft names tensors `<prefix>.<module path>.lora_A.weight` / `.lora_B.weight` (no adapter name).
_TENSOR = re.compile(r"^(?P<module>.+)\.lora_(?P<ab>[AB])\.weight$")
_LAYER = re.compile(r"\.layers\.(\d+)\.")
_FLOAT_DTYPES = {"F16", "BF16", "F32"}
_MAX_CONFIG_BYTES = 1 << 20


# Patterns come from the tenant's adapter_config.json (peft takes regexes there): each match gets a
# time limit, so a crafted pattern (catastrophic backtracking) cannot pin a thread or the GIL.
_REGEX_TIMEOUT_S = 0.05
# More tensors than any real LoRA of a served model (an 80-layer model adapting 7 modules has 1,120).
MAX_TENSORS = 8192


def _bounded(pattern: str, text: str, what: str, *, full: bool) -> bool:
    try:
        match = (regex.fullmatch if full else regex.match)(
            pattern, text, timeout=_REGEX_TIMEOUT_S, concurrent=True
        )
    except TimeoutError as exc:
        raise InvalidAdapter(f"{what} pattern {pattern[:100]!r} takes too long to match", param=what) from exc
    except regex.error as exc:
        raise InvalidAdapter(
            f"{what} pattern {pattern[:100]!r} is not a valid regex: {exc}", param=what
        ) from exc
    return match is not None


@dataclass(frozen=True)
class LoraConfig:
    rank: int
    alpha: float
    target_modules: list[str] | str
    base_model_name_or_path: str | None
    use_rslora: bool
    rank_pattern: dict[str, int]
    raw: dict[str, Any] = field(repr=False)

    def rank_for(self, module: str) -> int:
        # peft matches rank_pattern keys as regexes against the end of the module path.
        for pattern, rank in self.rank_pattern.items():
            if _bounded(rf"(.*\.)?({pattern})$", module, "rank_pattern", full=False):
                return rank
        return self.rank

    @property
    def max_rank(self) -> int:
        return max([self.rank, *self.rank_pattern.values()])

    def targets(self, module: str) -> bool:
        if isinstance(self.target_modules, str):
            return _bounded(self.target_modules, module, "target_modules", full=True)
        return any(module == t or module.endswith("." + t) for t in self.target_modules)


@dataclass(frozen=True)
class ModuleFacts:
    """What a base model offers LoRA: layer count and each targetable module's [in, out] sizes."""

    num_layers: int
    module_shapes: dict[str, list[int]]


def parse_config(raw: bytes) -> LoraConfig:
    if len(raw) > _MAX_CONFIG_BYTES:
        raise InvalidAdapter("adapter_config.json is larger than 1 MiB", param="adapter_config.json")
    try:
        cfg = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidAdapter(
            f"adapter_config.json is not valid JSON: {exc}", param="adapter_config.json"
        ) from exc
    if not isinstance(cfg, dict):
        raise InvalidAdapter("adapter_config.json must hold a JSON object", param="adapter_config.json")

    def bad(msg: str) -> InvalidAdapter:
        return InvalidAdapter(f"adapter_config.json: {msg}", param="adapter_config.json")

    if str(cfg.get("peft_type", "LORA")).upper() != "LORA":
        raise bad(f"peft_type {cfg.get('peft_type')!r} is not supported; only LORA adapters can be served")
    rank = cfg.get("r")
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise bad("'r' must be a positive integer")
    alpha = cfg.get("lora_alpha", rank)
    if (
        not isinstance(alpha, int | float)
        or isinstance(alpha, bool)
        or not math.isfinite(alpha)
        or alpha <= 0
    ):
        raise bad("'lora_alpha' must be a positive number")
    targets = cfg.get("target_modules")
    if isinstance(targets, list):
        if not targets or not all(isinstance(t, str) and t for t in targets):
            raise bad("'target_modules' must be a non-empty list of module names or a regex string")
    elif isinstance(targets, str):
        try:
            re.compile(targets)
        except re.error as exc:
            raise bad(f"'target_modules' is not a valid regex: {exc}") from exc
    else:
        raise bad("'target_modules' must be a non-empty list of module names or a regex string")
    # What vLLM refuses at load time, refused here before anything is stored.
    if cfg.get("use_dora"):
        raise bad("DoRA adapters (use_dora) are not supported by vLLM")
    if cfg.get("modules_to_save"):
        raise bad("'modules_to_save' is not supported by vLLM; retrain without it")
    if cfg.get("bias", "none") not in ("none", None):
        raise bad("adapters with trained bias ('bias' != 'none') are not supported")
    rank_pattern = cfg.get("rank_pattern") or {}
    if not isinstance(rank_pattern, dict) or not all(
        isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in rank_pattern.values()
    ):
        raise bad("'rank_pattern' must map module patterns to positive integers")
    base = cfg.get("base_model_name_or_path")
    return LoraConfig(
        rank=rank,
        alpha=float(alpha),
        target_modules=targets,
        base_model_name_or_path=base if isinstance(base, str) and base else None,
        use_rslora=bool(cfg.get("use_rslora", False)),
        rank_pattern=rank_pattern,
        raw=cfg,
    )


def read_tensor_shapes(path: Path) -> dict[str, tuple[str, list[int]]]:
    """Tensor name -> (dtype, shape), from the header only; a truncated or corrupt file is refused."""
    try:
        with safe_open(str(path), framework="numpy") as f:
            shapes = {}
            if len(f.keys()) > MAX_TENSORS:
                raise InvalidAdapter(
                    f"adapter_model.safetensors holds more than {MAX_TENSORS} tensors",
                    param="adapter_model.safetensors",
                )
            for name in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                sl = f.get_slice(name)
                shapes[name] = (sl.get_dtype(), list(sl.get_shape()))
            return shapes
    except (SafetensorError, OSError, ValueError) as exc:
        raise InvalidAdapter(
            f"adapter_model.safetensors is not a readable safetensors file: {exc}",
            param="adapter_model.safetensors",
        ) from exc


def check_weights(
    config: LoraConfig,
    tensors: dict[str, tuple[str, list[int]]],
    facts: ModuleFacts,
    *,
    max_rank: int,
) -> list[str]:
    """Checks tensors against the config and the base model; returns the module short names adapted."""

    def bad(msg: str) -> InvalidAdapter:
        return InvalidAdapter(f"adapter_model.safetensors: {msg}", param="adapter_model.safetensors")

    if config.max_rank > max_rank:
        raise InvalidAdapter(
            f"adapter rank {config.max_rank} exceeds the maximum LoRA rank {max_rank} of this base model's backends",
            param="r",
        )
    if not tensors:
        raise bad("holds no tensors")
    pairs: dict[str, dict[str, list[int]]] = {}
    for name, (dtype, shape) in tensors.items():
        m = _TENSOR.match(name)
        if m is None:
            raise bad(f"unexpected tensor {name!r}: only lora_A/lora_B weights can be served")
        if dtype not in _FLOAT_DTYPES:
            raise bad(f"tensor {name!r} has dtype {dtype}; expected F16, BF16 or F32")
        if len(shape) != 2:
            raise bad(f"tensor {name!r} has shape {shape}; LoRA weights are 2-D")
        pairs.setdefault(m["module"], {})[m["ab"]] = shape

    adapted: set[str] = set()
    for module, ab in sorted(pairs.items()):
        if set(ab) != {"A", "B"}:
            missing = "lora_B" if "A" in ab else "lora_A"
            raise bad(f"module {module!r} has no {missing} weight")
        short = module.rsplit(".", 1)[-1]
        # peft's saved key carries a "base_model.model." prefix that is not part of the module path.
        path = module.removeprefix("base_model.model.")
        if not config.targets(path) and not config.targets(short):
            raise bad(f"module {module!r} is not among target_modules {config.target_modules!r}")
        if short not in facts.module_shapes:
            known = ", ".join(sorted(facts.module_shapes))
            raise bad(f"module {short!r} does not exist in the base model (its modules: {known})")
        layer = _LAYER.search(module)
        if layer is not None and int(layer[1]) >= facts.num_layers:
            raise bad(f"module {module!r} is in layer {layer[1]}, but the base model has {facts.num_layers}")
        rank = config.rank_for(path)
        fan_in, fan_out = facts.module_shapes[short]
        want_a, want_b = [rank, fan_in], [fan_out, rank]
        if ab["A"] != want_a or ab["B"] != want_b:
            raise bad(
                f"module {module!r}: lora_A {ab['A']} / lora_B {ab['B']} do not fit rank {rank} on a "
                f"{fan_in}->{fan_out} layer (expected lora_A {want_a}, lora_B {want_b})"
            )
        adapted.add(short)
    return sorted(adapted)
