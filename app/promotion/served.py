"""The served gate: does the dedicated deployment answer as the LoRA path did?

The merge step recorded, for fixed prompts, base+adapter's greedy continuation and its teacher-forced
top-1 token at every position (reference.json). Here the deployment is asked for the same, by token ids
(no tokenizer differences): greedy continuations must match for at least `min_exact` of the prompts, and
its top-1 tokens (vLLM's prompt_logprobs) must agree at `min_top1` of the positions.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import httpx

from app.promotion.ml.protocol import GateFailed


async def served_gate(
    url: str,
    *,
    model: str,
    reference_file: Path,
    api_key: str | None,
    min_top1: float,
    min_exact: float,
    timeout_s: float = 120.0,
) -> dict[str, Any]:
    prompts = json.loads(await asyncio.to_thread(reference_file.read_text))["prompts"]
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    exact = agree = positions = 0
    mismatches: list[dict[str, Any]] = []
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=timeout_s) as client:
        for ref in prompts:
            greedy = await _complete(
                client,
                model=model,
                prompt=ref["prompt_ids"],
                max_tokens=max(1, len(ref["greedy_ids"])),
                temperature=0,
                return_token_ids=True,
            )
            got = list(greedy.get("token_ids") or [])[: len(ref["greedy_ids"])]
            if got == ref["greedy_ids"]:
                exact += 1
            elif len(mismatches) < 4:
                mismatches.append({"prompt": ref["prompt"], "expected": ref["greedy_text"], "got": greedy.get("text")})
            forced = await _complete(
                client,
                model=model,
                prompt=ref["prompt_ids"] + ref["greedy_ids"],
                max_tokens=1,
                temperature=0,
                prompt_logprobs=1,
            )
            for want, at in zip(ref["top1"], (forced.get("prompt_logprobs") or [])[1:], strict=False):
                if not at:
                    continue
                top = next((int(tok) for tok, lp in at.items() if lp.get("rank") == 1), None)
                positions += 1
                agree += top == want
    greedy_exact = exact / len(prompts) if prompts else 0.0
    top1_agreement = agree / positions if positions else 0.0
    figures: dict[str, Any] = {
        "prompts": len(prompts),
        "greedy_exact": greedy_exact,
        "top1_agreement": top1_agreement,
        "positions": positions,
        "min_top1": min_top1,
        "min_exact": min_exact,
        "mismatches": mismatches,
    }
    problems = []
    if greedy_exact < min_exact:
        problems.append(f"greedy answers matched the LoRA path on {exact} of {len(prompts)} prompts")
    if top1_agreement < min_top1:
        problems.append(f"top-1 agreement {top1_agreement:.3f} is below {min_top1:g}")
    if problems:
        raise GateFailedWith("; ".join(problems), figures)
    return figures


class GateFailedWith(GateFailed):
    def __init__(self, message: str, figures: dict[str, Any]) -> None:
        super().__init__(message)
        self.figures = figures


async def _complete(client: httpx.AsyncClient, **body: Any) -> dict[str, Any]:
    resp = await client.post("/v1/completions", json=body)
    if resp.status_code != 200:
        raise GateFailed(f"the deployment answered {resp.status_code}: {resp.text[:300]}")
    choice: dict[str, Any] = resp.json()["choices"][0]
    return choice
