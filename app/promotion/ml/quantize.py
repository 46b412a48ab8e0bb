"""AWQ-quantize a merged model to 4-bit weights (compressed-tensors pack-quantized, which vLLM serves), and
gate the result on how far its next-token distributions moved from the merged model's.

    python -m app.promotion.ml.quantize --model MERGED_DIR --out OUT_DIR [--calibration FILE]
        [--heldout FILE] [--num-calibration N] [--max-seq-len L] [--max-kl 0.02] [--min-top1 0.95]
        [--device auto|cpu|cuda]

Runs in the quantizer's own environment (.venv-awq, scripts/setup-quantizer.sh) with PYTHONPATH at the
repository root: it imports nothing from `app` but app.promotion.ml.protocol (standard library only).

Recipe: llm-compressor's AWQModifier (duo scaling) then W4A16_ASYM (int4 weights, asymmetric, groups of
128 input channels; activations stay in the model's dtype) on every Linear but lm_head, calibrated layer
by layer (sequential pipeline) on the calibration texts. OUT_DIR gets the compressed weights, config,
generation config, tokenizer files and chat template, so vLLM serves it as it is.

Gate: the saved OUT_DIR is loaded back (dequantized to float32) and compared with the merged model in
float32 on the same device, teacher-forced on the held-out texts: the mean over every position of every
held-out text of KL(merged || quantized) between the next-token distributions must be <= max-kl, and the
share of positions where both pick the same top-1 token >= min-top1. A calibration text that is also a
held-out text is left out of calibration, so the gate only sees texts the quantizer did not.

Text files: one sample per line, blank lines skipped; the two characters \\n inside a line stand for a
line break (so code samples fit on one line). Defaults: app/promotion/data/{calibration,heldout}.txt;
at most --num-calibration (512) calibration texts are used, each truncated to --max-seq-len (512) tokens.

Output: protocol events on stdout (app/promotion/ml/protocol.py), logs on stderr. Exit status: 0 the gate
passed; protocol.GATE_FAILED (3) it ran and the gate refused (figures in the result event, OUT_DIR left
as written for the caller to inspect or delete); 2 bad arguments or inputs (nothing quantized); anything
else a crash. Nothing is written outside OUT_DIR (no hub, no datasets cache, no llm-compressor logs).
"""

from __future__ import annotations

import argparse
import gc
import os
import shutil
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from app.promotion.ml import protocol
from app.promotion.ml.protocol import InputError

if TYPE_CHECKING:
    import torch

STEP = "quantize"
SCHEME = "W4A16_ASYM"
GROUP_SIZE = 128  # W4A16_ASYM's group size in compressed-tensors 0.19; checked against the saved config
IGNORE = ("lm_head",)
USAGE_ERROR = protocol.USAGE_ERROR  # argparse's own exit status too
DATA_DIR = Path(__file__).resolve().parent.parent / "data"

# Files copied verbatim from the merged model so the tokenizer and chat template vLLM sees are exactly
# the merged model's (a re-save through another transformers version could rewrite them).
_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)
_TOKENIZER_GLOBS = ("*.tiktoken",)

# Progress fractions at which each phase starts.
_P_LOAD, _P_CALIBRATE, _P_SAVE, _P_EVALUATE, _P_DONE = 0.0, 0.05, 0.75, 0.8, 1.0



@dataclass(frozen=True)
class GateFigures:
    kl: float
    top1_agreement: float
    heldout_tokens: int


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        calibration, heldout = _read_inputs(args)
    except InputError as exc:
        _say(str(exc))
        return USAGE_ERROR
    _isolate_environment(args.device)
    started = time.monotonic()
    try:
        figures, size_before, size_after = _run(args, calibration, heldout)
    except InputError as exc:
        _say(str(exc))
        return USAGE_ERROR
    passed = figures.kl <= args.max_kl and figures.top1_agreement >= args.min_top1
    reason = None if passed else _refusal(figures, args.max_kl, args.min_top1)
    protocol.result(
        STEP,
        passed=passed,
        kl=figures.kl,
        top1_agreement=figures.top1_agreement,
        max_kl=args.max_kl,
        min_top1=args.min_top1,
        size_before_bytes=size_before,
        size_after_bytes=size_after,
        seconds=round(time.monotonic() - started, 2),
        scheme=SCHEME,
        group_size=GROUP_SIZE,
        calibration_samples=len(calibration),
        heldout_tokens=figures.heldout_tokens,
        **({"reason": reason} if reason else {}),
    )
    if not passed:
        _say(f"gate failed: {reason}")
        return protocol.GATE_FAILED
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m app.promotion.ml.quantize",
        description="AWQ-quantize a merged model (W4A16, compressed-tensors) and gate it on held-out KL.",
    )
    parser.add_argument("--model", type=Path, required=True, help="merged model directory (HF format)")
    parser.add_argument("--out", type=Path, required=True, help="output directory: absent or empty")
    parser.add_argument(
        "--calibration", type=Path, default=DATA_DIR / "calibration.txt", help="calibration texts"
    )
    parser.add_argument("--heldout", type=Path, default=DATA_DIR / "heldout.txt", help="held-out texts")
    parser.add_argument(
        "--num-calibration",
        type=int,
        default=512,
        help="use at most the first N calibration texts (default 512, llm-compressor's own default)",
    )
    parser.add_argument(
        "--max-seq-len", type=int, default=512, help="truncate each text to L tokens (default 512)"
    )
    parser.add_argument("--max-kl", type=float, default=0.02, help="gate: mean KL at most (default 0.02)")
    parser.add_argument(
        "--min-top1", type=float, default=0.95, help="gate: top-1 agreement at least (default 0.95)"
    )
    parser.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default="auto",
        help="auto (default): cuda if torch sees a GPU, else cpu; cpu hides any GPU",
    )
    return parser


def _read_inputs(args: argparse.Namespace) -> tuple[list[str], list[str]]:
    if not (args.model / "config.json").is_file():
        raise InputError(f"{args.model} is not a model directory (no config.json)")
    if not list(args.model.glob("*.safetensors")):
        raise InputError(f"{args.model} has no .safetensors weights")
    if args.out.exists() and (not args.out.is_dir() or any(args.out.iterdir())):
        raise InputError(f"{args.out} exists and is not an empty directory")
    if args.num_calibration < 1 or args.max_seq_len < 2:
        raise InputError("--num-calibration must be >= 1 and --max-seq-len >= 2")
    heldout = protocol.read_texts(args.heldout)
    # The gate must measure texts the quantizer never saw: a calibration text that is also held out
    # (say, one a caller sent) is left out of calibration rather than failing the run.
    held = set(heldout)
    given = protocol.read_texts(args.calibration)
    unseen = [text for text in given if text not in held]
    if len(unseen) < len(given):
        _say(f"{len(given) - len(unseen)} calibration text(s) are also held out: left out of calibration")
    calibration = unseen[: args.num_calibration]
    if not calibration:
        raise InputError(f"no calibration texts left in {args.calibration} once held-out texts are left out")
    return calibration, heldout



def _isolate_environment(device: str) -> None:
    """Before torch and the HF libraries load: nothing fetched or cached outside OUT_DIR, and
    --device cpu hides any GPU (llm-compressor onloads layers to whatever accelerator torch sees)."""
    os.environ.update(
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        HF_HUB_DISABLE_TELEMETRY="1",
        TOKENIZERS_PARALLELISM="false",
    )
    if device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""


def _run(
    args: argparse.Namespace, calibration: list[str], heldout: list[str]
) -> tuple[GateFigures, int, int]:
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda, but torch sees no CUDA device")
    device = torch.device("cuda" if torch.cuda.is_available() and args.device != "cpu" else "cpu")
    torch.manual_seed(0)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    size_before = _safetensors_bytes(args.model)

    protocol.progress(STEP, _P_LOAD, f"loading {args.model.name} on {device.type}")
    model, tokenizer = _load_for_quantization(args.model)
    _quantize(model, tokenizer, calibration, args.max_seq_len)

    protocol.progress(STEP, _P_SAVE, "saving compressed model")
    model.save_pretrained(out, save_compressed=True)
    del model
    _free(device)
    _copy_tokenizer_files(args.model, out)
    _check_saved_config(out)
    size_after = _safetensors_bytes(out)

    figures = _evaluate(args.model, out, heldout, args.max_seq_len, device)
    protocol.progress(
        STEP,
        _P_DONE,
        f"KL {figures.kl:.5f}, top-1 agreement {figures.top1_agreement:.2%} over "
        f"{figures.heldout_tokens} held-out positions",
    )
    return figures, size_before, size_after


def _load_for_quantization(model_dir: Path) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # The merged model's own dtype: scales are saved in it, and it is what vLLM runs. It stays on the
    # CPU; the sequential pipeline moves one layer at a time to the accelerator.
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype="auto")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return model, tokenizer


def _quantize(model: Any, tokenizer: Any, texts: list[str], max_seq_len: int) -> None:
    import torch
    from datasets import Dataset, disable_caching
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import QuantizationModifier

    # Not llmcompressor.modifiers.awq: that is a deprecated shim returning [AWQ, empty QuantizationModifier].
    from llmcompressor.modifiers.transform.awq import AWQModifier

    disable_caching()  # in-memory dataset: nothing under ~/.cache
    encoded = [tokenizer(text, truncation=True, max_length=max_seq_len) for text in texts]
    # Already tokenized (input_ids), so llm-compressor uses it as it is; a plain list is refused.
    dataset = Dataset.from_dict(
        {
            "input_ids": [e["input_ids"] for e in encoded],
            "attention_mask": [e["attention_mask"] for e in encoded],
        }
    )
    recipe = [
        AWQModifier(duo_scaling=True),
        QuantizationModifier(targets=["Linear"], scheme=SCHEME, ignore=list(IGNORE)),
    ]
    num_layers = int(getattr(model.config, "num_hidden_layers", 0) or 0)
    protocol.progress(STEP, _P_CALIBRATE, f"calibrating on {len(texts)} texts, layer by layer")
    with _cpu_pin_memory_fix(torch), _layer_progress(num_layers):
        oneshot(
            model=model,
            tokenizer=tokenizer,
            dataset=dataset,
            recipe=recipe,
            pipeline="sequential",
            num_calibration_samples=len(texts),
            shuffle_calibration_samples=False,
            max_seq_length=max_seq_len,
            output_dir=None,  # we save ourselves, into OUT_DIR only
            log_dir=None,
        )


@contextmanager
def _cpu_pin_memory_fix(torch: Any) -> Iterator[None]:
    """llm-compressor 0.14's AWQ pins its cached activations for faster host-to-device copies; with no
    accelerator pin_memory() raises. With none there is nothing to copy to, so pinning becomes a no-op."""
    if torch.accelerator.is_available():
        yield
        return
    from llmcompressor.pipelines.cache import IntermediatesCache

    original = IntermediatesCache.pin_memory
    IntermediatesCache.pin_memory = lambda self, batch_index, input_names=None: None
    try:
        yield
    finally:
        IntermediatesCache.pin_memory = original


@contextmanager
def _layer_progress(num_layers: int) -> Iterator[None]:
    """One progress event per calibrated subgraph (a decoder layer; the last one holds norm and
    lm_head): the sequential pipeline ends each with LifecycleCallbacks.sequential_epoch_end, after which
    that layer is smoothed and quantized. The subgraph count comes from its trace_subgraphs."""
    import llmcompressor.pipelines.sequential.pipeline as sequential
    from llmcompressor.core import LifecycleCallbacks

    state = {"total": max(num_layers + 1, 1), "done": 0}
    original_trace = sequential.trace_subgraphs
    original_end = LifecycleCallbacks.sequential_epoch_end

    def trace(*args: Any, **kwargs: Any) -> Any:
        subgraphs = original_trace(*args, **kwargs)
        state["total"] = max(len(subgraphs), 1)
        return subgraphs

    def epoch_end(cls: type, *args: Any, **kwargs: Any) -> Any:
        outcome = original_end(*args, **kwargs)
        state["done"] += 1
        done, total = min(state["done"], state["total"]), state["total"]
        fraction = _P_CALIBRATE + (_P_SAVE - _P_CALIBRATE) * done / total
        protocol.progress(STEP, fraction, f"calibrated and quantized layer group {done}/{total}")
        return outcome

    sequential.trace_subgraphs = trace
    LifecycleCallbacks.sequential_epoch_end = classmethod(epoch_end)
    try:
        yield
    finally:
        sequential.trace_subgraphs = original_trace
        LifecycleCallbacks.sequential_epoch_end = original_end


def _copy_tokenizer_files(model_dir: Path, out: Path) -> None:
    names = {n for n in _TOKENIZER_FILES if (model_dir / n).is_file()}
    names |= {p.name for g in _TOKENIZER_GLOBS for p in model_dir.glob(g) if p.is_file()}
    for name in sorted(names):
        shutil.copy2(model_dir / name, out / name)


def _check_saved_config(out: Path) -> None:
    """The saved config must say what we claim in the result: pack-quantized, our scheme's group size,
    lm_head left alone."""
    import json

    config = json.loads((out / "config.json").read_text())
    qc = config.get("quantization_config") or {}
    if qc.get("format") != "pack-quantized":
        raise RuntimeError(f"saved format is {qc.get('format')!r}, not pack-quantized")
    group_sizes = {
        (group.get("weights") or {}).get("group_size") for group in (qc.get("config_groups") or {}).values()
    }
    if group_sizes != {GROUP_SIZE}:
        raise RuntimeError(f"saved group sizes {group_sizes}, expected {{{GROUP_SIZE}}}")
    if "lm_head" not in (qc.get("ignore") or []):
        raise RuntimeError("lm_head is not in the saved quantization_config's ignore list")


def _evaluate(
    merged_dir: Path, quantized_dir: Path, texts: list[str], max_seq_len: int, device: torch.device
) -> GateFigures:
    """Teacher-forced next-token distributions of both models on the held-out texts, one model in memory
    at a time: the merged model's log-probabilities are kept on the CPU, then compared position by
    position with the reloaded quantized model's."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, CompressedTensorsConfig

    # The quantized directory's tokenizer: the one vLLM will use (and proof that it loads).
    tokenizer = AutoTokenizer.from_pretrained(quantized_dir)
    batches = [
        tokenizer(text, truncation=True, max_length=max_seq_len, return_tensors="pt")["input_ids"]
        for text in texts
    ]
    span = _P_DONE - _P_EVALUATE
    # "auto" on CUDA: a float32 model larger than one GPU spreads over the others (then the host).
    device_map = "auto" if device.type == "cuda" else "cpu"

    protocol.progress(STEP, _P_EVALUATE, "evaluating: merged model (float32) on held-out texts")
    # device_map, not .to(device): compressed-tensors dispatches the models it loads with offloading
    # hooks, and .to() then leaves their weights on the CPU (a 0.6B model's held-out pass: 60 s, not 1 s).
    merged: Any = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32, device_map=device_map)
    merged.eval()
    reference = [_log_probs(merged, ids, device).cpu() for ids in batches]
    del merged
    _free(device)

    protocol.progress(STEP, _P_EVALUATE + span / 2, "evaluating: reloaded quantized model (dequantized)")
    # dequantize=True: compressed-tensors unpacks the int4 weights to float32 at load, so this measures
    # exactly what was saved (loading also proves the directory is readable).
    quantized: Any = AutoModelForCausalLM.from_pretrained(
        quantized_dir,
        dtype=torch.float32,
        device_map=device_map,
        quantization_config=CompressedTensorsConfig(dequantize=True),
    )
    quantized.eval()
    kl_sum, agree, positions = 0.0, 0, 0
    for ids, ref in zip(batches, reference, strict=True):
        got = _log_probs(quantized, ids, device).cpu()
        kl_sum += float((ref.exp() * (ref - got)).sum(dim=-1).sum())
        agree += int((ref.argmax(dim=-1) == got.argmax(dim=-1)).sum())
        positions += ref.shape[0]
    del quantized
    _free(device)
    if positions == 0:
        raise RuntimeError("the held-out texts tokenize to no positions")
    return GateFigures(kl=kl_sum / positions, top1_agreement=agree / positions, heldout_tokens=positions)


def _log_probs(model: Any, input_ids: torch.Tensor, device: torch.device) -> torch.Tensor:
    import torch

    with torch.inference_mode():
        logits = model(input_ids=input_ids.to(device)).logits[0].float()
    return torch.log_softmax(logits, dim=-1)  # (positions, vocab): each position's next-token distribution


def _refusal(figures: GateFigures, max_kl: float, min_top1: float) -> str:
    reasons = []
    if not figures.kl <= max_kl:
        reasons.append(f"KL {figures.kl:.5f} > {max_kl}")
    if not figures.top1_agreement >= min_top1:
        reasons.append(f"top-1 agreement {figures.top1_agreement:.4f} < {min_top1}")
    return "; ".join(reasons)


def _say(message: str) -> None:
    sys.stderr.write(f"quantize: {message}\n")
    sys.stderr.flush()


def _safetensors_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.glob("*.safetensors"))


def _free(device: torch.device) -> None:
    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


if __name__ == "__main__":
    raise SystemExit(main())
