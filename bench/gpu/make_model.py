"""A Mistral-7B-shaped model with random bf16 weights, a word-level tokenizer (one token per word
w3..w31999) and N random rank-16 LoRA adapters on q/k/v/o, written without any download.

It decides what the GPU fleet runs serve: the speed of a 7B model, no weights to ship.
    python3 bench/gpu/make_model.py OUT N      (LAYERS=4 for a small one)"""

import json
import os
import sys
import time

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import MistralConfig, MistralForCausalLM, PreTrainedTokenizerFast

VOCAB, RANK = 32000, 16
SHAPES = {"q_proj": (4096, 4096), "k_proj": (4096, 1024), "v_proj": (4096, 1024), "o_proj": (4096, 4096)}


def main(out: str, n_adapters: int, layers: int) -> None:
    t0 = time.time()
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, VOCAB)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    cfg = MistralConfig(
        vocab_size=VOCAB,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=layers,
        num_attention_heads=32,
        num_key_value_heads=8,
        max_position_embeddings=32768,
        rope_theta=1e6,
        sliding_window=None,
        bos_token_id=1,
        eos_token_id=2,
    )
    if not os.path.exists(f"{out}/base/config.json"):
        torch.manual_seed(0)
        with torch.device("cuda"):
            model = MistralForCausalLM(cfg).to(torch.bfloat16)
        model.save_pretrained(f"{out}/base", safe_serialization=True, max_shard_size="5GB")
        fast.save_pretrained(f"{out}/base")
        del model
        torch.cuda.empty_cache()
    g = torch.Generator(device="cuda").manual_seed(1)
    for a in range(n_adapters):
        d = f"{out}/lora{a}"
        os.makedirs(d, exist_ok=True)
        tensors = {}
        for i in range(layers):
            for mod, (fin, fout) in SHAPES.items():
                p = f"base_model.model.model.layers.{i}.self_attn.{mod}"
                tensors[f"{p}.lora_A.weight"] = (
                    (torch.randn(RANK, fin, device="cuda", generator=g) * 0.02).bfloat16().cpu()
                )
                tensors[f"{p}.lora_B.weight"] = (
                    (torch.randn(fout, RANK, device="cuda", generator=g) * 0.02).bfloat16().cpu()
                )
        save_file(tensors, f"{d}/adapter_model.safetensors")
        with open(f"{d}/adapter_config.json", "w") as f:
            json.dump(
                {
                    "peft_type": "LORA",
                    "r": RANK,
                    "lora_alpha": 32,
                    "target_modules": list(SHAPES),
                    "base_model_name_or_path": f"{out}/base",
                    "task_type": "CAUSAL_LM",
                    "bias": "none",
                    "fan_in_fan_out": False,
                    "lora_dropout": 0.0,
                    "modules_to_save": None,
                    "use_rslora": False,
                    "use_dora": False,
                },
                f,
            )
    print(f"model and {n_adapters} adapters in {time.time() - t0:.1f}s", flush=True)  # noqa: T201


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(os.environ.get("LAYERS", "32")))
