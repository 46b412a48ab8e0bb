"""Export a merged model as one GGUF file for llama.cpp (CPU and edge users), quantized to a llama.cpp type,
and gate the file on how far its next-token log-probabilities moved from the merged model's.

    python -m app.promotion.ml.gguf --model MERGED_DIR --out OUT_DIR --type Q4_K_M [--pre-tokenizer NAME]
        [--max-logprob-diff 0.15] [--heldout FILE] [--max-seq-len L] [--converter-dir DIR]

Runs in the GGUF environment (.venv-gguf, scripts/setup-gguf.sh) with PYTHONPATH at the repository root:
it imports nothing from `app` but app.promotion.ml.protocol (standard library only). Its llama.cpp pieces
come from the llama-cpp-python sdist: the converter (convert_hf_to_gguf.py, its `conversion` package and
its own gguf-py, unpacked into .venv-gguf/share/llama.cpp) and the bindings (libllama, built from source),
which quantize (llama_model_quantize, what `llama-quantize` runs) and load the file for the gate.

Steps, all inside OUT_DIR (absent or empty; a hidden staging folder in it holds the intermediates):
  1. convert: the merged HF folder -> f16 GGUF (the converter run in this process, as a module);
  2. quantize: f16 GGUF -> the --type (skipped for F16, BF16 and F32, which the converter writes itself);
  3. gate: the file is loaded by llama.cpp (CPU) and fed the very token ids the merged model's tokenizer
     gives each held-out text; the merged model runs in float32 torch on the same ids. Figures: the mean
     over every position of |log p_merged - log p_gguf| of the text's actual next token (logprob_diff,
     gated by --max-logprob-diff), the worst such position, mean KL(merged || gguf) of the full next-token
     distributions and top-1 agreement (both over every position). llama.cpp's own tokenizer must also
     tokenize every held-out text exactly as the merged model's does (tokenizer_match == 1.0): a wrong
     pre-tokenizer shows up there.
Only a file that passed is published, as OUT_DIR/model-<TYPE>.gguf (e.g. model-Q4_K_M.gguf), by a rename;
the staging folder is always removed, and OUT_DIR too when this command created it and failed, so a
failure (gate, bad input, crash, interrupt) leaves nothing half-written behind.

Tokenizers: the converter names a BPE tokenizer's pre-tokenizer (tokenizer.ggml.pre, the split rules
llama.cpp applies before BPE) by hashing its encoding of a test string; real Llama 3, Mistral, Qwen...
tokenizers are known, a custom one is not and the converter refuses it. --pre-tokenizer NAME (a name
the converter knows, e.g. gpt-2 for GPT-2-style byte-level BPE, llama-bpe for Llama 3's) makes an
unrecognised hash resolve to NAME; a recognised one is kept as detected. The tokenizer check above
catches a wrong NAME.

Output: protocol events on stdout (app/promotion/ml/protocol.py), logs (the converter's and llama.cpp's
included) on stderr. Exit status: 0 the gate passed; protocol.GATE_FAILED (3) it ran and the gate refused
(figures in the result event, nothing left in OUT_DIR); 2 bad arguments or inputs, an unknown type, a
tokenizer the converter does not know without --pre-tokenizer, a model it cannot convert, or no GGUF
environment (no result event); anything else a crash. Nothing is written outside OUT_DIR.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from app.promotion.ml import protocol
from app.promotion.ml.protocol import InputError

STEP = "gguf"
USAGE_ERROR = protocol.USAGE_ERROR  # argparse's own exit status too
DATA_DIR = Path(__file__).resolve().parent.parent / "data"
# Not measured on a trained model here (none can be had on this machine): a starting point between what
# rounding alone costs (F16: 0.003 on the tiny test model) and what 4-bit noise costs a model with wide,
# random logits (Q4_K_M: 0.58 there, Q6_K 0.16). Callers pass their own (the worker, from its gates).
DEFAULT_MAX_LOGPROB_DIFF = 0.15
STAGING_PREFIX = ".gguf-staging-"

# llama.cpp's type names (tools/quantize/quantize.cpp's QUANT_OPTIONS) -> the llama_ftype constant's name in
# llama_cpp. Left out: the types llama.cpp refuses to make without an importance matrix (IQ1_*, IQ2_*,
# IQ3_XXS, Q2_K_S; this step makes none), ternary TQ1_0/TQ2_0 (BitNet models only), MXFP4_MOE (MoE only).
QUANT_TYPES: dict[str, str] = {
    "Q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0",
    "Q4_1": "LLAMA_FTYPE_MOSTLY_Q4_1",
    "Q5_0": "LLAMA_FTYPE_MOSTLY_Q5_0",
    "Q5_1": "LLAMA_FTYPE_MOSTLY_Q5_1",
    "Q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0",
    "Q2_K": "LLAMA_FTYPE_MOSTLY_Q2_K",
    "Q3_K_S": "LLAMA_FTYPE_MOSTLY_Q3_K_S",
    "Q3_K_M": "LLAMA_FTYPE_MOSTLY_Q3_K_M",
    "Q3_K_L": "LLAMA_FTYPE_MOSTLY_Q3_K_L",
    "Q4_K_S": "LLAMA_FTYPE_MOSTLY_Q4_K_S",
    "Q4_K_M": "LLAMA_FTYPE_MOSTLY_Q4_K_M",
    "Q5_K_S": "LLAMA_FTYPE_MOSTLY_Q5_K_S",
    "Q5_K_M": "LLAMA_FTYPE_MOSTLY_Q5_K_M",
    "Q6_K": "LLAMA_FTYPE_MOSTLY_Q6_K",
    "IQ4_NL": "LLAMA_FTYPE_MOSTLY_IQ4_NL",
    "IQ4_XS": "LLAMA_FTYPE_MOSTLY_IQ4_XS",
}
ALIASES = {"Q3_K": "Q3_K_M", "Q4_K": "Q4_K_M", "Q5_K": "Q5_K_M"}  # as llama-quantize reads them
# Written by the converter itself (its --outtype), no llama_model_quantize pass.
CONVERTER_TYPES = {"F16": "f16", "BF16": "bf16", "F32": "f32"}
NEEDS_IMATRIX = ("IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ2_M", "IQ3_XXS", "Q2_K_S")

# Progress fractions at which each phase starts.
_P_CONVERT, _P_QUANTIZE, _P_EVALUATE, _P_DONE = 0.0, 0.4, 0.6, 1.0



@dataclass(frozen=True)
class GateFigures:
    logprob_diff: float
    logprob_diff_worst: float
    kl: float
    top1_agreement: float
    tokenizer_match: float
    heldout_tokens: int


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        quant_type = canonical_type(args.type)
        heldout = _check_inputs(args)
    except InputError as exc:
        _say(str(exc))
        return USAGE_ERROR
    _isolate_environment()
    out: Path = args.out
    created_out = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=out))
    final = out / output_name(quant_type)
    published = False
    try:
        started = time.monotonic()
        figures, run = _run(args, quant_type, heldout, staging)
        passed = figures.logprob_diff <= args.max_logprob_diff and figures.tokenizer_match >= 1.0
        reason = None if passed else _refusal(figures, args.max_logprob_diff)
        if passed:
            os.replace(run["file"], final)
            published = True
        protocol.result(
            STEP,
            passed=passed,
            type=quant_type,
            file=final.name if passed else None,
            logprob_diff=figures.logprob_diff,
            max_logprob_diff=args.max_logprob_diff,
            logprob_diff_worst=figures.logprob_diff_worst,
            kl=figures.kl,
            top1_agreement=figures.top1_agreement,
            tokenizer_match=figures.tokenizer_match,
            heldout_tokens=figures.heldout_tokens,
            heldout_texts=len(heldout),
            size_before_bytes=run["size_before"],
            size_f16_bytes=run["size_f16"],
            size_after_bytes=run["size_after"],
            pre_tokenizer=run["pre_tokenizer"],
            pre_tokenizer_source=run["pre_tokenizer_source"],
            convert_seconds=run["convert_seconds"],
            quantize_seconds=run["quantize_seconds"],
            evaluate_seconds=run["evaluate_seconds"],
            seconds=round(time.monotonic() - started, 2),
            **({"reason": reason} if reason else {}),
        )
        if not passed:
            _say(f"gate failed: {reason}")
            return protocol.GATE_FAILED
        return 0
    except InputError as exc:
        _say(str(exc))
        return USAGE_ERROR
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if not published and created_out:
            with contextlib.suppress(OSError):
                out.rmdir()  # only if empty: never removes anything this command did not write


def canonical_type(name: str) -> str:
    """The llama.cpp type name for what the user typed (case-insensitive, llama-quantize's aliases)."""
    upper = name.strip().upper()
    upper = ALIASES.get(upper, upper)
    if upper in QUANT_TYPES or upper in CONVERTER_TYPES:
        return upper
    if upper in NEEDS_IMATRIX:
        raise InputError(f"type {name!r} needs an importance matrix, which this step does not compute")
    known = ", ".join([*QUANT_TYPES, *CONVERTER_TYPES])
    raise InputError(f"unknown GGUF type {name!r}; known: {known} (aliases: {', '.join(ALIASES)})")


def output_name(quant_type: str) -> str:
    return f"model-{quant_type}.gguf"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m app.promotion.ml.gguf",
        description="Convert a merged model to GGUF (llama.cpp), quantize it, and gate it on held-out "
        "next-token log-probabilities.",
    )
    parser.add_argument("--model", type=Path, required=True, help="merged model directory (HF format)")
    parser.add_argument("--out", type=Path, required=True, help="output directory: absent or empty")
    parser.add_argument(
        "--type", required=True, help="llama.cpp type: Q4_K_M, Q5_K_M, Q6_K, Q8_0, Q4_0, F16, BF16, F32, ..."
    )
    parser.add_argument(
        "--pre-tokenizer",
        default=None,
        metavar="NAME",
        help="llama.cpp pre-tokenizer for a BPE tokenizer the converter does not recognise (gpt-2, "
        "llama-bpe, qwen2, ...); a recognised one is kept",
    )
    parser.add_argument(
        "--max-logprob-diff",
        type=float,
        default=DEFAULT_MAX_LOGPROB_DIFF,
        help="gate: mean |log p| difference of the held-out texts' next tokens at most "
        f"(default {DEFAULT_MAX_LOGPROB_DIFF})",
    )
    parser.add_argument("--heldout", type=Path, default=DATA_DIR / "heldout.txt", help="held-out texts")
    parser.add_argument(
        "--max-seq-len", type=int, default=512, help="truncate each held-out text to L tokens (default 512)"
    )
    parser.add_argument(
        "--converter-dir",
        type=Path,
        default=Path(sys.prefix) / "share" / "llama.cpp",
        help="llama.cpp's convert_hf_to_gguf.py, conversion/ and gguf-py/ (default: this venv's "
        "share/llama.cpp, where scripts/setup-gguf.sh puts them)",
    )
    return parser


def _check_inputs(args: argparse.Namespace) -> list[str]:
    if not (args.model / "config.json").is_file():
        raise InputError(f"{args.model} is not a model directory (no config.json)")
    if not list(args.model.glob("*.safetensors")):
        raise InputError(f"{args.model} has no .safetensors weights")
    if args.out.exists() and (not args.out.is_dir() or any(args.out.iterdir())):
        raise InputError(f"{args.out} exists and is not an empty directory")
    if not args.max_logprob_diff >= 0:
        raise InputError("--max-logprob-diff must be >= 0")
    if args.max_seq_len < 2:
        raise InputError("--max-seq-len must be >= 2")
    converter = args.converter_dir / "convert_hf_to_gguf.py"
    if not converter.is_file() or not (args.converter_dir / "gguf-py" / "gguf").is_dir():
        raise InputError(
            f"no llama.cpp converter in {args.converter_dir} (convert_hf_to_gguf.py, gguf-py): run this in "
            "the GGUF venv made by scripts/setup-gguf.sh, or pass --converter-dir"
        )
    if args.pre_tokenizer is not None:
        known = known_pre_tokenizers(args.converter_dir)
        if args.pre_tokenizer not in known:
            raise InputError(
                f"unknown pre-tokenizer {args.pre_tokenizer!r}; the converter knows: {', '.join(sorted(known))}"
            )
    return protocol.read_texts(args.heldout)


# What the admin API checks `pre_tokenizer` against (no converter there): known_pre_tokenizers() of the
# pinned converter (scripts/setup-gguf.sh), written out; tests/promotion/test_gguf.py compares the two.
PRE_TOKENIZERS_FILE = DATA_DIR / "gguf-pre-tokenizers.txt"
# Part of the step's artifact key, with the held-out texts: a new converter or quantizer writes other bytes.
TOOL_VERSION = "llama-cpp-python 0.3.36"


@functools.cache
def shipped_pre_tokenizers() -> frozenset[str]:
    return frozenset(PRE_TOKENIZERS_FILE.read_text(encoding="utf-8").split())


def known_pre_tokenizers(converter_dir: Path) -> set[str]:
    """Every tokenizer.ggml.pre name the converter can write (the `res = "..."` of get_vocab_base_pre):
    the names llama.cpp implements."""
    names: set[str] = set()
    for source in (converter_dir / "conversion").glob("*.py"):
        names.update(re.findall(r'^\s+res = "([\w.+-]+)"', source.read_text(encoding="utf-8"), re.MULTILINE))
    return names



def _isolate_environment() -> None:
    """Before torch and the HF libraries load: nothing fetched from a hub or cached outside OUT_DIR."""
    os.environ.update(
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        HF_HUB_DISABLE_TELEMETRY="1",
        TOKENIZERS_PARALLELISM="false",
    )
    os.environ.pop("NO_LOCAL_GGUF", None)  # set, the converter would take an installed gguf wheel instead


def _run(
    args: argparse.Namespace, quant_type: str, heldout: list[str], staging: Path
) -> tuple[GateFigures, dict[str, Any]]:
    size_before = sum(p.stat().st_size for p in args.model.glob("*.safetensors"))
    outtype = CONVERTER_TYPES.get(quant_type, "f16")
    converted = staging / f"model-{outtype.upper()}.gguf"

    protocol.progress(STEP, _P_CONVERT, f"converting {args.model.name} to {outtype} GGUF")
    t0 = time.monotonic()
    pre = convert(args.model, converted, outtype, args.converter_dir, args.pre_tokenizer)
    convert_seconds = round(time.monotonic() - t0, 2)
    size_f16 = converted.stat().st_size

    quantize_seconds = 0.0
    if quant_type in CONVERTER_TYPES:
        target = converted
    else:
        target = staging / output_name(quant_type)
        protocol.progress(
            STEP, _P_QUANTIZE, f"quantizing to {quant_type} ({size_f16 / 2**20:.1f} MiB {outtype} GGUF)"
        )
        t0 = time.monotonic()
        quantize(converted, target, quant_type)
        quantize_seconds = round(time.monotonic() - t0, 2)
        converted.unlink()
    size_after = target.stat().st_size

    t0 = time.monotonic()
    figures, pre_in_file = evaluate(args.model, target, heldout, args.max_seq_len)
    evaluate_seconds = round(time.monotonic() - t0, 2)
    protocol.progress(
        STEP,
        _P_DONE,
        f"logprob diff {figures.logprob_diff:.5f} (worst {figures.logprob_diff_worst:.4f}), KL "
        f"{figures.kl:.5f}, top-1 agreement {figures.top1_agreement:.2%} over {figures.heldout_tokens} "
        f"held-out positions; tokenizer match {figures.tokenizer_match:.0%}",
    )
    return figures, {
        "file": target,
        "size_before": size_before,
        "size_f16": size_f16,
        "size_after": size_after,
        "pre_tokenizer": pre_in_file,
        "pre_tokenizer_source": pre,
        "convert_seconds": convert_seconds,
        "quantize_seconds": quantize_seconds,
        "evaluate_seconds": evaluate_seconds,
    }


def convert(
    model_dir: Path, outfile: Path, outtype: str, converter_dir: Path, pre_tokenizer: str | None
) -> str:
    """Run llama.cpp's convert_hf_to_gguf in this process. Returns where tokenizer.ggml.pre came from:
    "detected" (the converter knew the tokenizer, or it is not BPE) or "given" (--pre-tokenizer)."""
    converter, base = _import_converter(converter_dir)
    source = {"value": "detected"}
    original = base.TextModel.get_vocab_base_pre

    def get_vocab_base_pre(self: Any, tokenizer: Any) -> str:
        try:
            detected = str(original(self, tokenizer))
        except NotImplementedError:
            if pre_tokenizer is None:
                raise UnknownPreTokenizer from None
            protocol.log(f"gguf: unrecognised BPE pre-tokenizer: using --pre-tokenizer {pre_tokenizer}")
            source["value"] = "given"
            return pre_tokenizer
        if pre_tokenizer is not None and pre_tokenizer != detected:
            protocol.log(f"gguf: the converter recognised pre-tokenizer {detected}: --pre-tokenizer ignored")
        return detected

    argv = [str(converter_dir / "convert_hf_to_gguf.py"), str(model_dir), "--outtype", outtype,
            "--outfile", str(outfile)]  # fmt: skip
    base.TextModel.get_vocab_base_pre = get_vocab_base_pre
    saved_argv = sys.argv
    sys.argv = argv
    try:
        with _stdout_to_stderr():
            converter.main()
    except UnknownPreTokenizer:
        raise InputError(
            "llama.cpp's converter does not recognise this model's BPE pre-tokenizer (its hash is in the "
            "log above). If the tokenizer splits text like a known one, pass --pre-tokenizer NAME: gpt-2 for "
            "GPT-2-style byte-level BPE (a tokenizers ByteLevel pre-tokenizer), llama-bpe for Llama 3's, "
            "qwen2, mistral-nemo, ... (the GGUF's tokenization is then checked against the model's own)"
        ) from None
    except SystemExit as exc:
        if exc.code not in (None, 0):
            raise InputError(
                f"llama.cpp's converter refused {model_dir} (exit {exc.code}; see the log above)"
            ) from None
    finally:
        sys.argv = saved_argv
        base.TextModel.get_vocab_base_pre = original
    if not outfile.is_file():
        raise RuntimeError(f"the converter wrote no {outfile.name}")
    gc.collect()
    return source["value"]


class UnknownPreTokenizer(Exception):
    """The converter did not recognise the BPE pre-tokenizer and no --pre-tokenizer was given."""


def _import_converter(converter_dir: Path) -> tuple[Any, Any]:
    """convert_hf_to_gguf and its conversion.base, with the sdist's own gguf-py (newer than any gguf wheel)
    ahead of site-packages."""
    for path in (converter_dir / "gguf-py", converter_dir):
        if str(path) not in sys.path:
            sys.path.insert(0, str(path))
    import gguf

    if not Path(gguf.__file__).resolve().is_relative_to(converter_dir.resolve()):
        raise InputError(f"gguf was imported from {gguf.__file__}, not from {converter_dir / 'gguf-py'}")
    import convert_hf_to_gguf
    from conversion import base

    return convert_hf_to_gguf, base


@contextlib.contextmanager
def _stdout_to_stderr() -> Iterator[None]:
    """The converter prints (and tqdm writes) to stdout: keep stdout for protocol events."""
    with contextlib.redirect_stdout(sys.stderr):
        yield


def quantize(source: Path, target: Path, quant_type: str) -> None:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, QUANT_TYPES[quant_type])
    params.nthread = 0  # llama.cpp's default: every hardware thread
    status = llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(), params)
    if status != 0 or not target.is_file():
        raise RuntimeError(
            f"llama_model_quantize to {quant_type} failed (status {status}; see the log above)"
        )


def evaluate(
    model_dir: Path, gguf_file: Path, texts: list[str], max_seq_len: int
) -> tuple[GateFigures, str | None]:
    """The merged model (float32 torch) and the GGUF (llama.cpp, CPU) on the same held-out token ids,
    teacher-forced; one model in memory at a time. Also returns the file's tokenizer.ggml.pre."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    batches = [list(tokenizer(text, truncation=True, max_length=max_seq_len)["input_ids"]) for text in texts]
    batches = [ids for ids in batches if len(ids) >= 2]
    if not batches:
        raise InputError("the held-out texts tokenize to fewer than 2 tokens each")
    span = _P_DONE - _P_EVALUATE

    protocol.progress(STEP, _P_EVALUATE, "evaluating: merged model (float32) on held-out texts")
    merged: Any = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    merged.eval()
    with torch.inference_mode():
        reference = [
            torch.log_softmax(merged(input_ids=torch.tensor([ids])).logits[0].float(), -1) for ids in batches
        ]
    del merged
    gc.collect()

    protocol.progress(STEP, _P_EVALUATE + span / 2, f"evaluating: {gguf_file.name} in llama.cpp")
    import llama_cpp

    n_ctx = max(len(ids) for ids in batches)
    llm = llama_cpp.Llama(
        model_path=str(gguf_file),
        n_ctx=n_ctx,
        n_batch=n_ctx,
        n_ubatch=n_ctx,
        logits_all=True,
        n_gpu_layers=0,
        n_threads=_cpus(),  # the bindings' default is half the cores
        n_threads_batch=_cpus(),
        verbose=False,
    )
    try:
        if llm.n_vocab() != reference[0].shape[-1]:
            raise RuntimeError(
                f"the GGUF's vocabulary has {llm.n_vocab()} tokens, the model {reference[0].shape[-1]}"
            )
        diff_sum, diff_worst, diff_n = 0.0, 0.0, 0
        kl_sum, agree, positions = 0.0, 0, 0
        for ids, ref in zip(batches, reference, strict=True):
            llm.reset()
            llm.eval(ids)
            got = torch.log_softmax(torch.from_numpy(llm.scores[: len(ids)].copy()).float(), -1)
            kl_sum += float((ref.exp() * (ref - got)).sum(dim=-1).sum())
            agree += int((ref.argmax(dim=-1) == got.argmax(dim=-1)).sum())
            positions += ref.shape[0]
            nxt = torch.tensor(ids[1:]).unsqueeze(-1)
            diffs = (ref[:-1].gather(-1, nxt) - got[:-1].gather(-1, nxt)).abs()
            diff_sum += float(diffs.sum())
            diff_worst = max(diff_worst, float(diffs.max()))
            diff_n += diffs.shape[0]
        matches = sum(
            llm.tokenize(text.encode("utf-8"), add_bos=True, special=False)
            == list(tokenizer(text)["input_ids"])
            for text in texts
        )
        pre = llm.metadata.get("tokenizer.ggml.pre")
    finally:
        llm.close()
    figures = GateFigures(
        logprob_diff=diff_sum / diff_n,
        logprob_diff_worst=diff_worst,
        kl=kl_sum / positions,
        top1_agreement=agree / positions,
        tokenizer_match=matches / len(texts),
        heldout_tokens=positions,
    )
    return figures, pre


def _refusal(figures: GateFigures, max_logprob_diff: float) -> str:
    reasons = []
    if not figures.logprob_diff <= max_logprob_diff:
        reasons.append(f"logprob diff {figures.logprob_diff:.5f} > {max_logprob_diff}")
    if figures.tokenizer_match < 1.0:
        reasons.append(
            f"llama.cpp tokenizes {1 - figures.tokenizer_match:.0%} of the held-out texts unlike the model's "
            "tokenizer (a wrong --pre-tokenizer?)"
        )
    return "; ".join(reasons)


def _cpus() -> int:
    """The CPUs this process may run on (a container's cpuset), not the machine's."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _say(message: str) -> None:
    sys.stderr.write(f"gguf: {message}\n")
    sys.stderr.flush()


if __name__ == "__main__":
    raise SystemExit(main())
