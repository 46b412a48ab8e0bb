"""The GGUF export step (app/promotion/ml/gguf.py) run as the CLI and the worker run it: a subprocess in
its own venv (.venv-gguf, scripts/setup-gguf.sh) on a tiny model, read through its protocol events: a real
conversion (llama.cpp's convert_hf_to_gguf) and quantization (llama_model_quantize) whose file llama.cpp
loads and runs, its gate, what it writes (and that it writes nothing elsewhere, nor anything on failure),
and its refusals of bad input.

The model is the tiny Llama widened to 256 (hidden) / 512 (MLP): llama.cpp's K-quants pack rows in
blocks of 256 values, and on the default 128-wide model Q4_K_M would fall back to q5_0 for most tensors.
It stands in for a merged model (any HF model directory does; the merge step writes one of these). Its
weights are random and its logits wide (initializer_range 0.1), so quantization noise moves every token's
log-probability: measured on the held-out texts, the mean |log p difference| of the next tokens is
0.003 for F16, 0.055 for Q8_0, 0.16 for Q6_K, 0.32 for Q5_K_M and 0.58 for Q4_K_M (KL 0.26, top-1
agreement 0.39), against 1.8 for an unrelated random model of the same shape (KL 2.5). The default gate
(0.15) is meant for trained models; these tests pass a threshold that fits this one and is still well
below what a broken conversion gives.

Its tokenizer is a byte-level BPE of our own, whose pre-tokenizer the converter does not know:
--pre-tokenizer gpt-2 (the GPT-2 split rules that a tokenizers ByteLevel pre-tokenizer applies) gets it
through, and llama.cpp then tokenizes every held-out text exactly as the model's tokenizer does.

Wall time: about 30 s on 2 idle cores: four runs of the step at 5-7 s each (loading torch, transformers
and the converter is most of it; the conversion itself, quantization and the gate take about a second),
one llama.cpp load and completion, and six refusals of bad arguments, which exit before loading anything.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from app.promotion.ml import gguf, protocol

REPO_ROOT = Path(__file__).resolve().parents[2]
GGUF_VENV = Path(os.environ.get("GATEWAY_GGUF_VENV", REPO_ROOT / ".venv-gguf"))
DATA_DIR = REPO_ROOT / "app" / "promotion" / "data"

TINY_MAX_LOGPROB_DIFF = 0.8
STEP_TIMEOUT_S = 300


def gguf_python() -> Path:
    """The GGUF venv's interpreter; `make test` builds the venv, so its absence is a failure."""
    python = GGUF_VENV / "bin" / "python"
    if not python.exists():
        pytest.fail(f"no GGUF venv at {GGUF_VENV}: run `make gguf` (scripts/setup-gguf.sh, or set GATEWAY_GGUF_VENV)")
    return python


@dataclass
class StepRun:
    """One run of the export command: exit status, protocol events, stderr, and every file that appeared
    anywhere it might have written besides OUT_DIR."""

    returncode: int
    events: list[dict[str, Any]]
    stderr: str
    out: Path
    seconds: float
    stray: dict[str, list[str]] = field(default_factory=dict)

    @property
    def result(self) -> dict[str, Any]:
        results = [e for e in self.events if e["event"] == "result"]
        assert len(results) == 1, f"expected one result event, got {results}\n{self.stderr[-3000:]}"
        return results[0]

    @property
    def progress(self) -> list[dict[str, Any]]:
        return [e for e in self.events if e["event"] == "progress"]


def _files(root: Path) -> dict[str, tuple[int, int]]:
    return {
        str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in root.rglob("*")
        if p.is_file()
    }


def run_export(model: Path, work: Path, *args: str, out: Path | None = None) -> StepRun:
    """Run the step with its own working directory, HOME, caches and TMPDIR (all empty), into out
    (default work/parent/out, absent: the command creates it), and note whatever it left elsewhere."""
    python = gguf_python()
    cwd, home, tmp, parent = (work / name for name in ("cwd", "home", "tmp", "parent"))
    for folder in (cwd, home, tmp, parent):
        folder.mkdir(parents=True)
    out = out or parent / "out"
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO_ROOT),
        "HOME": str(home),
        "XDG_CACHE_HOME": str(home / ".cache"),
        "HF_HOME": str(home / ".cache" / "huggingface"),
        "TMPDIR": str(tmp),
    }
    model_before = _files(model)
    started = time.monotonic()
    proc = subprocess.run(
        [str(python), "-m", "app.promotion.ml.gguf", "--model", str(model), "--out", str(out), *args],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=STEP_TIMEOUT_S, check=False,
    )  # fmt: skip
    seconds = time.monotonic() - started
    events = [e for e in map(protocol.parse, proc.stdout.splitlines()) if e is not None]
    model_after = _files(model)
    stray = {
        "cwd": sorted(_files(cwd)),
        "home": sorted(_files(home)),
        "tmp": sorted(_files(tmp)),
        "out's parent": sorted(p.name for p in parent.iterdir() if p.name != "out"),
        "model dir": sorted(k for k, v in model_after.items() if model_before.get(k) != v)
        + sorted(set(model_before) - set(model_after)),
    }
    return StepRun(proc.returncode, events, proc.stderr, out, seconds, {k: v for k, v in stray.items() if v})


def in_gguf_venv(code: str, *args: str) -> Any:
    """Run a snippet in the GGUF venv (llama.cpp's bindings and the converter's gguf-py live there only);
    it prints one JSON value."""
    proc = subprocess.run(
        [str(gguf_python()), "-c", code, *args],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from app.devkit.tinymodel import TinyLlamaSpec, build_base_model

    spec = TinyLlamaSpec(hidden_size=256, num_attention_heads=8, num_key_value_heads=8, intermediate_size=512)
    return build_base_model(tmp_path_factory.mktemp("tiny-gguf") / "model", spec)


@pytest.fixture(scope="module")
def exported(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> StepRun:
    """One Q4_K_M export of the tiny model with a threshold it meets, shared by the tests below."""
    gguf_python()
    run = run_export(
        tiny_model, tmp_path_factory.mktemp("gguf-pass"),
        "--type", "q4_k_m", "--pre-tokenizer", "gpt-2", "--max-logprob-diff", str(TINY_MAX_LOGPROB_DIFF),
    )  # fmt: skip
    print(f"\ngguf: exit {run.returncode} in {run.seconds:.1f} s; result {run.result}")  # noqa: T201 (-s)
    return run


def test_gate_passes_with_figures_in_range(exported: StepRun, tiny_model: Path) -> None:
    assert exported.returncode == 0, exported.stderr[-3000:]
    result = exported.result
    print(  # noqa: T201 - the gate's figures (-s)
        f"\nGGUF {result['type']} of the tiny model: logprob diff {result['logprob_diff']:.5f} "
        f"(<= {TINY_MAX_LOGPROB_DIFF}; worst {result['logprob_diff_worst']:.4f}), KL {result['kl']:.5f}, "
        f"top-1 agreement {result['top1_agreement']:.4f} over {result['heldout_tokens']} positions; "
        f"{result['size_before_bytes']} -> f16 {result['size_f16_bytes']} -> {result['size_after_bytes']} "
        f"bytes; convert {result['convert_seconds']} s, quantize {result['quantize_seconds']} s, "
        f"evaluate {result['evaluate_seconds']} s, {result['seconds']} s in all"
    )
    assert result["passed"] is True
    assert result["type"] == "Q4_K_M"  # the canonical name, whatever case was typed
    assert result["file"] == "model-Q4_K_M.gguf"
    assert 0.0 < result["logprob_diff"] <= TINY_MAX_LOGPROB_DIFF
    assert result["logprob_diff"] <= result["logprob_diff_worst"] < 5
    assert result["max_logprob_diff"] == TINY_MAX_LOGPROB_DIFF
    assert 0.0 <= result["kl"] < 0.5
    assert 0.25 <= result["top1_agreement"] <= 1.0
    assert result["tokenizer_match"] == 1.0
    heldout = [line for line in (DATA_DIR / "heldout.txt").read_text().splitlines() if line.strip()]
    assert result["heldout_texts"] == len(heldout)
    assert result["heldout_tokens"] >= 4 * len(heldout)
    assert (result["pre_tokenizer"], result["pre_tokenizer_source"]) == ("gpt-2", "given")
    assert result["size_before_bytes"] == sum(p.stat().st_size for p in tiny_model.glob("*.safetensors"))
    # float32 -> f16 halves it; Q4_K_M (4.5-6.6 bits a weight) shrinks f16 more than 2.4x
    assert result["size_f16_bytes"] < 0.55 * result["size_before_bytes"]
    assert result["size_after_bytes"] < result["size_f16_bytes"] / 2.4
    assert result["size_after_bytes"] == (exported.out / "model-Q4_K_M.gguf").stat().st_size
    assert result["convert_seconds"] > 0 and result["quantize_seconds"] > 0 and result["evaluate_seconds"] > 0
    assert 0 < result["seconds"] <= exported.seconds
    assert exported.events[-1]["event"] == "result"


def test_progress_covers_each_phase_in_order(exported: StepRun) -> None:
    progress = exported.progress
    fractions = [e["fraction"] for e in progress]
    assert fractions == sorted(fractions)
    assert fractions[0] == 0.0 and fractions[-1] == 1.0
    messages = " | ".join(e["message"] for e in progress)
    phases = ("converting", "quantizing to Q4_K_M", "evaluating", "logprob diff")
    positions = [messages.find(word) for word in phases]
    assert -1 not in positions and positions == sorted(positions), messages


def test_output_is_one_q4_k_m_file_that_llama_cpp_runs(exported: StepRun) -> None:
    assert exported.returncode == 0, exported.stderr[-3000:]
    assert sorted(p.name for p in exported.out.iterdir()) == ["model-Q4_K_M.gguf"]  # no staging left
    share = GGUF_VENV / "share" / "llama.cpp"
    info = in_gguf_venv(
        """
import collections, json, sys
sys.path[:0] = [sys.argv[2] + "/gguf-py"]
import gguf, llama_cpp
reader = gguf.GGUFReader(sys.argv[1])
types = collections.Counter(t.tensor_type.name for t in reader.tensors)
llm = llama_cpp.Llama(model_path=sys.argv[1], n_ctx=64, verbose=False)
out = llm.create_completion("The gateway routes", max_tokens=8, temperature=0.0)
print(json.dumps({"types": types, "file_type": llm.metadata.get("general.file_type"),
                  "pre": llm.metadata.get("tokenizer.ggml.pre"), "n_vocab": llm.n_vocab(),
                  "text": out["choices"][0]["text"], "tokens": out["usage"]["completion_tokens"]}))
""",
        str(exported.out / "model-Q4_K_M.gguf"),
        str(share),
    )
    print(f"\nllama.cpp's greedy completion: {info['text']!r}; tensor types {info['types']}")  # noqa: T201
    assert info["file_type"] == "15"  # LLAMA_FTYPE_MOSTLY_Q4_K_M
    assert info["pre"] == "gpt-2"
    assert info["n_vocab"] == 512
    assert info["tokens"] >= 1
    # Q4_K_M's mix: most matrices Q4_K, some (attn_v, ffn_down halves) Q6_K; norms stay F32.
    assert info["types"].get("Q4_K", 0) >= 8 and info["types"].get("Q6_K", 0) >= 1
    assert info["types"].get("F32", 0) >= 5 and "F16" not in info["types"]


def test_writes_nothing_outside_out_dir(exported: StepRun) -> None:
    assert exported.stray == {}


def test_gate_refusal_exits_gate_failed_and_leaves_nothing(tiny_model: Path, tmp_path: Path) -> None:
    # The worker's way: an existing empty staging folder, which must be left empty. F16: the converter's
    # own output, no quantization pass; its diff is small but not 0.
    out = tmp_path / "staging"
    out.mkdir()
    run = run_export(tiny_model, tmp_path, "--type", "F16", "--pre-tokenizer", "gpt-2",
                     "--max-logprob-diff", "0", out=out)  # fmt: skip

    assert run.returncode == protocol.GATE_FAILED, run.stderr[-3000:]
    result = run.result
    print(f"\nrefused as it must be: {result['reason']} (F16 of the tiny model)")  # noqa: T201 (-s)
    assert result["passed"] is False
    assert result["file"] is None
    assert result["type"] == "F16"
    assert 0 < result["logprob_diff"] < 0.05  # f16 rounding only
    assert result["quantize_seconds"] == 0
    assert result["size_after_bytes"] == result["size_f16_bytes"]
    assert "logprob diff" in result["reason"] and "> 0.0" in result["reason"]
    assert "tokeniz" not in result["reason"]
    assert "gate failed" in run.stderr
    assert list(out.iterdir()) == []
    assert run.stray == {}


def test_wrong_pre_tokenizer_is_caught_by_the_tokenizer_check(tiny_model: Path, tmp_path: Path) -> None:
    # llama-bpe (Llama 3's split rules: digits in threes, punctuation joined to the next word) is not how
    # this tokenizer splits: llama.cpp would tokenize users' text differently from the model's training.
    run = run_export(tiny_model, tmp_path, "--type", "Q8_0", "--pre-tokenizer", "llama-bpe",
                     "--max-logprob-diff", "10")  # fmt: skip

    assert run.returncode == protocol.GATE_FAILED, run.stderr[-3000:]
    result = run.result
    assert result["tokenizer_match"] < 1.0
    assert "pre-tokenizer" in result["reason"]
    assert (result["pre_tokenizer"], result["pre_tokenizer_source"]) == ("llama-bpe", "given")
    assert not run.out.exists()  # it created OUT_DIR, so it removed it
    assert run.stray == {}


def test_unknown_pre_tokenizer_without_the_option_says_what_to_pass(tiny_model: Path, tmp_path: Path) -> None:
    run = run_export(tiny_model, tmp_path, "--type", "Q4_K_M")

    assert run.returncode == 2, run.stderr[-3000:]
    assert "does not recognise this model's BPE pre-tokenizer" in run.stderr
    assert "--pre-tokenizer NAME" in run.stderr and "gpt-2" in run.stderr
    assert not [e for e in run.events if e["event"] == "result"]
    assert not run.out.exists()
    assert run.stray == {}


def test_unusable_arguments_exit_2_before_any_work(tiny_model: Path, tmp_path: Path) -> None:
    python = gguf_python()
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "something").write_text("x")
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    for argv, why in (
        (["--type", "Q4_K_X"], "unknown GGUF type 'Q4_K_X'; known: Q4_0"),
        (["--type", "IQ2_XXS"], "needs an importance matrix"),
        (["--type", "Q4_K_M", "--pre-tokenizer", "no-such"], "unknown pre-tokenizer 'no-such'"),
        (["--type", "Q4_K_M", "--max-logprob-diff", "-1"], "--max-logprob-diff must be >= 0"),
        (["--type", "Q4_K_M", "--model", str(tmp_path / "missing")], "not a model directory"),
        (["--type", "Q4_K_M", "--out", str(taken)], "not an empty directory"),
    ):
        model = [] if "--model" in argv else ["--model", str(tiny_model)]
        target = [] if "--out" in argv else ["--out", str(out)]
        started = time.monotonic()
        proc = subprocess.run(
            [str(python), "-m", "app.promotion.ml.gguf", *model, *target, *argv],
            env=env, capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert proc.returncode == 2, (argv, proc.stderr)
        assert why in proc.stderr, proc.stderr
        assert not [e for e in map(protocol.parse, proc.stdout.splitlines()) if e]
        assert time.monotonic() - started < 20  # refused before torch or llama.cpp load
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]
    assert [p.name for p in taken.iterdir()] == ["something"]


def test_the_names_the_api_accepts_are_the_pinned_converters() -> None:
    # The admin API checks `pre_tokenizer` against a list shipped with the app (it has no converter);
    # a new converter pin must come with that list regenerated.
    share = gguf_python().parent.parent / "share" / "llama.cpp"
    assert gguf.shipped_pre_tokenizers() == gguf.known_pre_tokenizers(share)
    assert {"gpt-2", "llama-bpe", "qwen2"} <= gguf.shipped_pre_tokenizers()
