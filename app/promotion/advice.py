"""Promotion advice: which adapters to merge into a dedicated deployment, from measured traffic.

The lesson's decision tree, with the figures we measured on an H200 (7B-shaped model, vLLM 0.26):
  - Must the adapter be swapped dynamically (cold, bursty, or just re-uploaded)? Keep it on the shared
    LoRA path, where one base model serves many adapters.
  - Else merge it: a backend serving no LoRA gives 6,867 tok/s against 5,283 with one live adapter
    (1.30x) and 4,266 with eight (1.61x), so a hot adapter on its own merged deployment serves ~1.3x
    faster and frees its share of the shared backends.
  - On a GPU where memory or batch-1 latency matters, AWQ the merged model: 14 GB -> 3.9 GB, 1.25x tok/s
    at batch 1, 1.00x at 64 concurrent (AWQ buys memory and low-batch latency, not peak throughput).
  - For CPU/edge users: GGUF Q4_K_M for llama.cpp.
Advice only: nothing here changes routing; an admin decides.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import BaseModel, Field

from app.traffic import BASE, OTHER, Totals, Window

# Measured (DESIGN.md, "Facts measured on real vLLM"): tok/s of a 7B-shaped model on one H200.
TOKS_NO_LORA = 6867
TOKS_ONE_ADAPTER = 5283
TOKS_EIGHT_ADAPTERS = 4266
AWQ_BATCH1_SPEEDUP = 1.25
AWQ_BATCH64_SPEEDUP = 1.00
AWQ_MEMORY = (14.0, 3.9)  # GB, bf16 -> W4A16
MERGE_SPEEDUP = round(TOKS_NO_LORA / TOKS_ONE_ADAPTER, 2)  # 1.30
MERGE_SPEEDUP_EIGHT = round(TOKS_NO_LORA / TOKS_EIGHT_ADAPTERS, 2)  # 1.61
BASIS = {
    "merge_speedup_one_live_adapter": MERGE_SPEEDUP,
    "merge_speedup_eight_live_adapters": MERGE_SPEEDUP_EIGHT,
    "awq_speedup_batch_1": AWQ_BATCH1_SPEEDUP,
    "awq_speedup_64_concurrent": AWQ_BATCH64_SPEEDUP,
    "awq_memory_gb": {"bf16": AWQ_MEMORY[0], "awq_w4a16": AWQ_MEMORY[1]},
    "measured_on": "one H200, 7B-shaped model, vLLM 0.26, 256 tokens in / 128 out",
}

Action = Literal["promote", "keep", "demote"]


class AdviceParams(BaseModel):
    window_s: int = Field(3600, ge=300, le=86400, description="how far back traffic is counted")
    min_share: float = Field(0.2, gt=0, le=1, description="hot: at least this share of shared-backend time")
    min_requests: int = Field(100, ge=1, description="hot: at least this many requests in the window")
    min_active: float = Field(
        0.5, ge=0, le=1, description="stable: traffic in at least this fraction of the window's buckets"
    )
    latency_concurrency: float = Field(
        8.0, gt=0, description="at or below this mean concurrency the adapter is latency-bound (AWQ helps)"
    )
    target: Literal["gpu", "cpu"] = Field("gpu", description="where a promoted model would run")
    limit: int = Field(50, ge=1, le=1000)


class AdapterAdvice(BaseModel):
    adapter_id: uuid.UUID
    tenant: str
    name: str
    version: int
    action: Action
    quantization: Literal["none", "awq", "gguf"] | None
    expected_speedup: float | None = Field(None, description="tok/s of the recommended form vs the LoRA path")
    requests: int
    prompt_tokens: int
    completion_tokens: int
    tokens_per_s: float
    shared_time_share: float = Field(
        description="this adapter's share of the time requests spent on shared backends"
    )
    mean_concurrency: float = Field(description="its request-seconds per second of the window")
    active_fraction: float
    promoted: bool
    reasons: list[str]


class Advice(BaseModel):
    object: Literal["promotion.advice"] = "promotion.advice"
    window_s: float
    generated_at: datetime
    shared_backend_seconds: float
    adapters_seen: int
    data: list[AdapterAdvice]
    basis: dict[str, Any] = Field(description="the measured figures the advice applies")


@dataclass(frozen=True)
class AdapterFacts:
    id: uuid.UUID
    tenant: str
    name: str
    version: int
    created_at: datetime
    promoted: bool


def advise(window: Window, facts: dict[str, AdapterFacts], p: AdviceParams, now: datetime) -> Advice:
    """Ranks the adapters of the window by their share of shared-backend time (a promoted one by its
    deployment's time) and applies the decision tree to each."""
    shared_total = sum(t.shared_s for t in window.totals.values())
    rows: list[AdapterAdvice] = []
    for key, t in window.totals.items():
        if key in (BASE, OTHER):
            continue
        f = facts.get(key)
        if f is None:
            continue  # deleted since
        rows.append(_one(f, t, window, shared_total, p, now))
    rows.sort(key=lambda r: (r.shared_time_share, r.mean_concurrency), reverse=True)
    return Advice(
        window_s=round(window.seconds, 1),
        generated_at=now,
        shared_backend_seconds=round(shared_total, 3),
        adapters_seen=len(rows),
        data=rows[: p.limit],
        basis=BASIS,
    )


def _one(
    f: AdapterFacts, t: Totals, w: Window, shared_total: float, p: AdviceParams, now: datetime
) -> AdapterAdvice:
    share = t.shared_s / shared_total if shared_total else 0.0
    concurrency = (t.shared_s + t.dedicated_s) / w.seconds if w.seconds else 0.0
    active = t.buckets / w.buckets if w.buckets else 0.0
    created = f.created_at if f.created_at.tzinfo else f.created_at.replace(tzinfo=UTC)
    age_s = (now - created).total_seconds()
    reasons: list[str] = []
    action: Action = "keep"
    quantization: Literal["none", "awq", "gguf"] | None = None
    speedup: float | None = None
    if f.promoted:
        if t.requests < p.min_requests or active < p.min_active:
            action = "demote"
            reasons.append(
                f"promoted, but only {t.requests:.0f} requests in the window and traffic in {active:.0%} of it:"
                " its dedicated deployment holds a GPU for little; the shared LoRA path can take it back"
            )
        else:
            reasons.append("promoted and still busy: keep its dedicated deployment")
    else:
        hot = share >= p.min_share and t.requests >= p.min_requests
        stable = active >= p.min_active and age_s >= w.seconds
        if not hot:
            reasons.append(
                f"{share:.0%} of shared-backend time and {t.requests:.0f} requests (hot means >= {p.min_share:.0%}"
                f" and >= {p.min_requests}): the shared LoRA path serves it without a deployment of its own"
            )
        elif not stable:
            reasons.append(
                "hot but not stable: "
                + (
                    "uploaded within the window"
                    if age_s < w.seconds
                    else f"traffic in only {active:.0%} of the window"
                )
                + "; it may still change or cool down, so it stays swappable on the shared LoRA path"
            )
        else:
            action = "promote"
            speedup = MERGE_SPEEDUP
            reasons.append(
                f"hot and stable: {share:.0%} of shared-backend time, traffic in {active:.0%} of the window."
                f" Merged into its own deployment it serves ~{speedup}x the tok/s of the LoRA path (no LoRA"
                f" kernels; {MERGE_SPEEDUP_EIGHT}x where eight adapters share a backend)"
                f" and frees {share:.0%} of the shared backends for the rest"
            )
            if p.target == "cpu":
                quantization = "gguf"
                reasons.append("for CPU/edge serving: export GGUF Q4_K_M for llama.cpp")
            elif concurrency <= p.latency_concurrency:
                quantization = "awq"
                speedup = round(MERGE_SPEEDUP * AWQ_BATCH1_SPEEDUP, 2)
                reasons.append(
                    f"mean concurrency {concurrency:.1f} (<= {p.latency_concurrency:g}): latency-bound, where AWQ"
                    f" W4A16 buys {AWQ_BATCH1_SPEEDUP}x at batch 1 and {AWQ_MEMORY[0]:g} -> {AWQ_MEMORY[1]:g} GB"
                )
            else:
                quantization = "none"
                reasons.append(
                    f"mean concurrency {concurrency:.1f} (> {p.latency_concurrency:g}): throughput-bound, where AWQ"
                    f" buys {AWQ_BATCH64_SPEEDUP:.2f}x (memory only): serve it unquantized for full quality"
                )
    return AdapterAdvice(
        adapter_id=f.id,
        tenant=f.tenant,
        name=f.name,
        version=f.version,
        action=action,
        quantization=quantization,
        expected_speedup=speedup,
        requests=int(t.requests),
        prompt_tokens=int(t.prompt_tokens),
        completion_tokens=int(t.completion_tokens),
        tokens_per_s=round(t.tokens / w.seconds, 3) if w.seconds else 0.0,
        shared_time_share=round(share, 4),
        mean_concurrency=round(concurrency, 3),
        active_fraction=round(active, 3),
        promoted=f.promoted,
        reasons=reasons,
    )
