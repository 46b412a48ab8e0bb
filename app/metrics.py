"""Every Prometheus series the gateway exports, declared once. Labels stay bounded: no tenant or adapter."""

from __future__ import annotations

from typing import Any

from prometheus_client import Counter

TOKENS = Counter(
    "gateway_tokens_total", "Tokens processed, from backend usage reports", ["base_model", "kind"]
)


def record_usage(base_model: str, usage: dict[str, Any] | None) -> None:
    if not usage:
        return
    for kind in ("prompt_tokens", "completion_tokens"):
        value = usage.get(kind)
        if isinstance(value, int) and value > 0:
            TOKENS.labels(base_model, kind.removesuffix("_tokens")).inc(value)
