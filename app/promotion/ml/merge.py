"""Merge step: base model in full precision + LoRA adapter -> one merged model (safetensors + tokenizer),
with a gate that refuses a merge that did not happen or changed the model's answers.

    python -m app.promotion.ml.merge --base DIR --adapter DIR --out DIR [--dtype auto] [--device auto]

Gate (all must hold, else exit GATE_FAILED with the figures):
  - no `lora_` tensor is left in the merged weights;
  - every module the adapter targets differs from the base model's weights;
  - on a few prompts, fp32 logits of the merged model are within --tolerance (max abs) of base+adapter.
It also writes `reference.json` into OUT: greedy continuations of fixed prompts from base+adapter (the
LoRA path's answers) and the teacher-forced top-1 token at every position, which the served gate compares
the dedicated deployment against.

Runs in the environment with torch, transformers and peft (the `ml` extra); never inside the gateway.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from app.promotion.ml.protocol import GATE_FAILED, GateFailed, log, progress, result

STEP = "merge"
# Fixed prompts for the logits check and the served gate's reference: short, varied, tokenizer-agnostic.
REFERENCE_PROMPTS = (
    "The gateway routes each request to",
    "What is the capital of France?",
    "def add(a, b):",
    "Please summarise the following text in one sentence:",
    "Numbers such as 1 2 3 and 42 appear in",
    "Hello! How are you today?",
    "When a backend is full, the least recently used adapter",
    "Write a short note about the weather.",
)
REFERENCE_NEW_TOKENS = 16
REFERENCE_FILE = "reference.json"
REPORT_FILE = "merge.json"


def pick_device(name: str) -> str:
    import torch

    if name != "auto":
        return name
    return "cuda" if torch.cuda.is_available() else "cpu"


def _weights(model_dir: Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file holding it (one file or a sharded set)."""
    from safetensors import safe_open

    where: dict[str, Path] = {}
    for file in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118  # safe_open has no __iter__
                where[key] = file
    return where


def _base_tensor(where: dict[str, Path], key: str) -> Any:
    from safetensors import safe_open

    with safe_open(str(where[key]), framework="pt") as f:
        return f.get_tensor(key)


def targeted_modules(peft_model: Any) -> list[str]:
    """Names (as in the merged model) of the modules the adapter changes."""
    from peft.tuners.lora import LoraLayer

    prefix = "base_model.model."
    return sorted(
        name.removeprefix(prefix) for name, module in peft_model.named_modules() if isinstance(module, LoraLayer)
    )


def _encode(tokenizer: Any, prompts: Sequence[str]) -> Iterator[list[int]]:
    for text in prompts:
        yield list(tokenizer(text)["input_ids"])


def reference(model: Any, tokenizer: Any, device: str, new_tokens: int = REFERENCE_NEW_TOKENS) -> list[dict[str, Any]]:
    """Greedy continuations and teacher-forced top-1 tokens of base+adapter, prompt by prompt."""
    import torch

    eos = tokenizer.eos_token_id
    out = []
    with torch.no_grad():
        for text, ids in zip(REFERENCE_PROMPTS, _encode(tokenizer, REFERENCE_PROMPTS), strict=True):
            seq = list(ids)
            for _ in range(new_tokens):  # greedy by hand: generate()'s defaults differ across versions
                logits = model(torch.tensor([seq], device=device)).logits[0, -1]
                nxt = int(torch.argmax(logits))
                seq.append(nxt)
                if nxt == eos:
                    break
            greedy = seq[len(ids):]
            full = model(torch.tensor([seq], device=device)).logits[0].float()
            top1 = [int(t) for t in torch.argmax(full, dim=-1)[:-1]]  # top1[i] predicts seq[i + 1]
            out.append(
                {
                    "prompt": text,
                    "prompt_ids": ids,
                    "greedy_ids": greedy,
                    "greedy_text": tokenizer.decode(greedy, skip_special_tokens=True),
                    "top1": top1,
                }
            )
    return out


def _logits(model: Any, batches: list[list[int]], device: str) -> list[Any]:
    import torch

    with torch.no_grad():
        return [model(torch.tensor([ids], device=device)).logits[0].float().cpu() for ids in batches]


def merge(
    base: Path, adapter: Path, out: Path, *, dtype: str = "auto", device: str = "auto", tolerance: float = 1e-3
) -> dict[str, Any]:
    """Merges, checks, saves; returns the figures. Raises GateFailed (after saving nothing) on a bad merge."""
    import torch
    from peft import PeftModel
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    started = time.monotonic()
    device = pick_device(device)
    progress(STEP, 0.02, f"loading base model in float32 on {device}")
    config = AutoConfig.from_pretrained(base)
    saved_dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.float32
    if dtype != "auto":
        saved_dtype = getattr(torch, dtype)
    elif isinstance(saved_dtype, str):
        saved_dtype = getattr(torch, saved_dtype)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).to(device).eval()  # type: ignore[arg-type]
    tokenizer = AutoTokenizer.from_pretrained(base)
    progress(STEP, 0.2, "applying the adapter")
    peft_model = PeftModel.from_pretrained(model, adapter).to(device).eval()
    targets = targeted_modules(peft_model)
    if not targets:
        raise GateFailed("the adapter targets no module of this base model")
    progress(STEP, 0.3, f"reference answers of base+adapter ({len(REFERENCE_PROMPTS)} prompts)")
    ref = reference(peft_model, tokenizer, device)
    check_ids = [r["prompt_ids"] + r["greedy_ids"] for r in ref[:4]]
    before = _logits(peft_model, check_ids, device)
    progress(STEP, 0.5, f"merging {len(targets)} modules (safe_merge)")
    merged = peft_model.merge_and_unload(safe_merge=True)
    progress(STEP, 0.6, "checking the merge")
    state = merged.state_dict()
    leftover = sorted(k for k in state if "lora_" in k)
    where = _weights(base)
    unchanged = []
    for name in targets:
        key = f"{name}.weight"
        if key not in where or key not in state:
            unchanged.append(name)  # a targeted module the merged weights do not hold: not merged
            continue
        if torch.equal(_base_tensor(where, key).to(torch.float32), state[key].detach().cpu().float()):
            unchanged.append(name)
    after = _logits(merged, check_ids, device)
    max_abs = max(float((a - b).abs().max()) for a, b in zip(before, after, strict=True))
    figures: dict[str, Any] = {
        "targeted_modules": len(targets),
        "unchanged_modules": unchanged[:20],
        "lora_keys_left": leftover[:20],
        "logits_max_abs_diff": max_abs,
        "logits_tolerance": tolerance,
        "device": device,
        "dtype": str(saved_dtype).removeprefix("torch."),
    }
    problems = []
    if leftover:
        problems.append(f"{len(leftover)} lora_ tensors left in the merged weights")
    if unchanged:
        problems.append(f"{len(unchanged)} of {len(targets)} targeted modules unchanged (e.g. {unchanged[0]})")
    if not max_abs <= tolerance:  # also catches NaN
        problems.append(f"merged logits differ from base+adapter by {max_abs:.3g} (tolerance {tolerance:g})")
    if problems:
        result(STEP, passed=False, **figures, seconds=round(time.monotonic() - started, 3))
        raise GateFailed("; ".join(problems))
    progress(STEP, 0.8, f"saving the merged model as {figures['dtype']}")
    out.mkdir(parents=True, exist_ok=True)
    merged.to(saved_dtype).save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    (out / REFERENCE_FILE).write_text(json.dumps({"prompts": ref}, indent=1))
    figures["size_bytes"] = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    figures["seconds"] = round(time.monotonic() - started, 3)
    (out / REPORT_FILE).write_text(json.dumps(figures, indent=1))
    progress(STEP, 1.0, "merged")
    return figures


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m app.promotion.ml.merge", description=__doc__.split("\n")[0])
    parser.add_argument("--base", type=Path, required=True, help="base model directory (Hugging Face layout)")
    parser.add_argument("--adapter", type=Path, required=True, help="peft adapter directory")
    parser.add_argument("--out", type=Path, required=True, help="where the merged model goes")
    parser.add_argument("--dtype", default="auto", help="saved dtype: auto (the base's), bfloat16, float16, float32")
    parser.add_argument("--device", default="auto", help="auto (cuda if torch sees one), cpu, cuda")
    parser.add_argument("--tolerance", type=float, default=1e-3, help="max abs fp32 logit difference")
    args = parser.parse_args(argv)
    try:
        figures = merge(
            args.base, args.adapter, args.out, dtype=args.dtype, device=args.device, tolerance=args.tolerance
        )
    except GateFailed as exc:
        log(f"merge gate failed: {exc}")
        return GATE_FAILED
    result(STEP, passed=True, **figures)
    return 0


if __name__ == "__main__":
    sys.exit(main())
