"""Builds a tiny Llama model, its tokenizer and LoRA adapters from a seed, offline, for tests and dev runs.

Everything is made locally (no hub downloads exist here) and deterministically: the same seed gives
byte-identical weights, so greedy outputs are reproducible across runs and between vLLM and
transformers+peft. Each output directory carries a stamp of the parameters that made it; a build
whose stamp matches is skipped, anything else is rebuilt.

The base model needs only torch, transformers and tokenizers (so it builds in the vLLM venv too);
adapters additionally need peft, imported only when an adapter is built.

    python -m app.devkit.tinymodel OUT_DIR [--adapters 2] [--rank 8] [--base-model-name tiny-llama]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

# Bump when the build recipe changes, so stale directories are rebuilt rather than reused.
_RECIPE_VERSION = 1
_STAMP = ".tinymodel-stamp.json"

BOS, EOS, PAD = "<s>", "</s>", "<pad>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")
# Roles are special tokens so a prompt's structure costs one token each and never merges with text.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>' }}\n{{ message['content'] }}{{ eos_token }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}\n{% endif %}"
)
ADAPTER_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")

# A small fixed corpus: enough for the BPE trainer to learn word-sized merges, so generated text is
# mostly words rather than stray bytes.
_CORPUS = """\
The gateway routes each request to a backend that already holds the adapter.
A tenant names one of its adapters as the model, and the gateway finds it in the registry.
When a backend is full, the least recently used adapter is unloaded to make room.
Small models are built locally for tests, because nothing can be downloaded here.
The quick brown fox jumps over the lazy dog while the cat sleeps in the sun.
Every answer is streamed back to the client as server-sent events, one chunk at a time.
Admins upload adapters, promote hot ones, and watch the dashboards for errors and latency.
Numbers such as 0 1 2 3 4 5 6 7 8 9 10 42 100 and 2048 appear in logs and metrics.
What is the capital of France? Paris is the capital of France.
How many adapters fit on one backend? As many as its slots allow, and a few more in memory.
Please summarise the following text in one sentence, using simple words.
Hello! How are you today? I am fine, thank you. Let us write some code together.
def add(a, b): return a + b  # a tiny function, with a comment and some punctuation: ()[]{}<>
"""


@dataclass(frozen=True)
class TinyLlamaSpec:
    """Shape of the base model; the defaults fit vLLM's CPU attention (head size 32)."""

    hidden_size: int = 128
    num_attention_heads: int = 4
    num_key_value_heads: int = 4
    num_hidden_layers: int = 2
    intermediate_size: int = 256
    vocab_size: int = 512
    max_position_embeddings: int = 4096
    # Wider than Llama's 0.02 so logits are well spread: greedy choices then do not hinge on
    # rounding differences between vLLM's and transformers' kernels.
    initializer_range: float = 0.1
    seed: int = 0


@dataclass(frozen=True)
class TinyModel:
    """Where a build put things: the base model directory and one directory per adapter."""

    base: Path
    adapters: tuple[Path, ...]


def build_tokenizer(
    out_dir: Path, *, vocab_size: int = 512, model_max_length: int = 4096
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on the built-in corpus and save it as a fast tokenizer."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    special = [BOS, EOS, PAD, *ROLE_TOKENS]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS.splitlines(), trainer=trainer)
    # Prepend <s> to plain prompts the way Llama tokenizers do; chat prompts carry it in the template.
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    fast = PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]  # transformers is untyped here
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        additional_special_tokens=list(ROLE_TOKENS),
        model_max_length=model_max_length,
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out_dir)
    return fast


def build_base_model(out_dir: Path | str, spec: TinyLlamaSpec | None = None) -> Path:
    """Build (or reuse) the tiny Llama model and its tokenizer in out_dir."""
    spec = spec or TinyLlamaSpec()
    out = Path(out_dir)

    def build(tmp: Path) -> None:
        tokenizer = build_tokenizer(
            tmp, vocab_size=spec.vocab_size, model_max_length=spec.max_position_embeddings
        )
        config = LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=spec.hidden_size,
            intermediate_size=spec.intermediate_size,
            num_hidden_layers=spec.num_hidden_layers,
            num_attention_heads=spec.num_attention_heads,
            num_key_value_heads=spec.num_key_value_heads,
            max_position_embeddings=spec.max_position_embeddings,
            initializer_range=spec.initializer_range,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            tie_word_embeddings=False,
        )
        torch.manual_seed(spec.seed)
        model = LlamaForCausalLM(config)  # type: ignore[no-untyped-call]  # float32 by default
        model.save_pretrained(tmp, safe_serialization=True)

    stamp = {"kind": "base", **dataclasses.asdict(spec)}
    _build_once(out, stamp, build)
    return out


def build_adapter(
    out_dir: Path | str,
    *,
    base_dir: Path | str,
    base_model_name: str,
    seed: int,
    rank: int = 8,
    alpha: int | None = None,
) -> Path:
    """Build (or reuse) a peft LoRA adapter for the model in base_dir, random from seed.

    base_model_name goes into adapter_config.json's base_model_name_or_path: it is the name the
    serving side knows the base by, not a local path.
    """
    out = Path(out_dir)
    lora_alpha = alpha if alpha is not None else 2 * rank

    def build(tmp: Path) -> None:
        from peft import LoraConfig, get_peft_model  # optional: the vLLM venv has no peft

        base = LlamaForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
        config = LoraConfig(
            r=rank,
            lora_alpha=lora_alpha,
            target_modules=list(ADAPTER_TARGET_MODULES),
            lora_dropout=0.0,
            bias="none",
            task_type="CAUSAL_LM",
            # peft's default makes B zero, i.e. an adapter that changes nothing; keep the random
            # init so each adapter visibly changes greedy output.
            init_lora_weights=False,
        )
        torch.manual_seed(seed)
        model = get_peft_model(base, config)
        model.save_pretrained(str(tmp), safe_serialization=True)
        # Name the base only now: set before saving, peft would look the name up on the hub.
        # target_modules is a set inside peft; sort it so the file is byte-identical across runs.
        config_path = tmp / "adapter_config.json"
        saved = json.loads(config_path.read_text())
        saved["base_model_name_or_path"] = base_model_name
        saved["target_modules"] = sorted(saved["target_modules"])
        config_path.write_text(json.dumps(saved, indent=2, sort_keys=True) + "\n")
        # peft's model card names the temporary build path; nothing reads it.
        (tmp / "README.md").unlink(missing_ok=True)

    stamp = {
        "kind": "adapter",
        "base": _read_stamp(Path(base_dir)),
        "base_model_name": base_model_name,
        "seed": seed,
        "rank": rank,
        "alpha": lora_alpha,
    }
    _build_once(out, stamp, build)
    return out


def build_tiny_model(
    root: Path | str,
    *,
    n_adapters: int = 2,
    rank: int = 8,
    base_model_name: str = "tiny-llama",
    spec: TinyLlamaSpec | None = None,
) -> TinyModel:
    """Build the base model in root/base and n_adapters adapters in root/adapters/lora-<i>."""
    spec = spec or TinyLlamaSpec()
    root = Path(root)
    base = build_base_model(root / "base", spec)
    adapters = tuple(
        build_adapter(
            root / "adapters" / f"lora-{i}",
            base_dir=base,
            base_model_name=base_model_name,
            # Distinct from the base seed and from each other, so no two adapters coincide.
            seed=spec.seed * 1000 + i + 1,
            rank=rank,
        )
        for i in range(n_adapters)
    )
    return TinyModel(base=base, adapters=adapters)


def _read_stamp(directory: Path) -> dict[str, Any] | None:
    try:
        stamp: dict[str, Any] = json.loads((directory / _STAMP).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    return stamp


def _build_once(out: Path, params: dict[str, Any], build: Callable[[Path], None]) -> None:
    stamp = {"recipe": _RECIPE_VERSION, **params}
    if _read_stamp(out) == stamp:
        return
    # Build beside the target and swap it in, so a crash or a concurrent reader never sees a
    # half-written model directory carrying a valid stamp.
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        build(tmp)
        (tmp / _STAMP).write_text(json.dumps(stamp, indent=2, sort_keys=True) + "\n")
        shutil.rmtree(out, ignore_errors=True)
        tmp.replace(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m app.devkit.tinymodel", description=__doc__.splitlines()[0] if __doc__ else None
    )
    parser.add_argument("out_dir", type=Path, help="root directory: base/ and adapters/lora-<i>/")
    parser.add_argument("--adapters", type=int, default=2, help="number of LoRA adapters (default 2)")
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank (default 8)")
    parser.add_argument(
        "--base-model-name",
        default="tiny-llama",
        help="name written as the adapters' base_model_name_or_path (default tiny-llama)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the base model (default 0)")
    args = parser.parse_args(argv)
    built = build_tiny_model(
        args.out_dir,
        n_adapters=args.adapters,
        rank=args.rank,
        base_model_name=args.base_model_name,
        spec=TinyLlamaSpec(seed=args.seed),
    )
    json.dump({"base": str(built.base), "adapters": [str(a) for a in built.adapters]}, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
