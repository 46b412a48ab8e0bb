"""Every Prometheus series the gateway exports, declared once. Labels stay bounded: no tenant or adapter."""

from __future__ import annotations

from typing import Any

from prometheus_client import Counter

TOKENS = Counter(
    "gateway_tokens_total", "Tokens processed, from backend usage reports", ["base_model", "kind"]
)


# Labelled children, looked up once: labels() validates and locks on every call (hot path).
_token_series: dict[tuple[str, str], Any] = {}


def record_usage(base_model: str, usage: dict[str, Any] | None) -> None:
    if not usage:
        return
    for kind in ("prompt_tokens", "completion_tokens"):
        value = usage.get(kind)
        if isinstance(value, int) and value > 0:
            series = _token_series.get((base_model, kind))
            if series is None:
                series = _token_series[base_model, kind] = TOKENS.labels(
                    base_model, kind.removesuffix("_tokens")
                )
            series.inc(value)
