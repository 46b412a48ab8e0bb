"""What a limit is, what admission answers, and the sliding-window arithmetic both stores share.

Rates are counted in sliding windows of one minute, estimated from two fixed windows (the current one and
the one before it, weighted by how much of it still lies inside the last minute): memory is constant per
scope, and a run that starts with empty counters admits exactly the limit in its first minute. Tokens are
reserved at admission (the prompt's upper bound plus max_tokens x n) and settled to the backend's own
count when the response ends; the difference goes back into the window the reservation was taken in, so
the estimate is always of tokens actually served, plus what requests in flight may still use.

Concurrency is a set of request ids with expiry per scope, renewed while the request runs (a gateway that
dies frees its requests' places after one lease).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

WINDOW_S = 60.0


@dataclass(frozen=True, slots=True)
class Limits:
    """One scope's limits (a tenant's, or an API key's); None: no such limit."""

    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    concurrent_requests: int | None = None
    max_tokens: int | None = None  # per request: the most a request may ask for (and the default)
    max_n: int | None = None
    max_prompt_bytes: int | None = None

    @property
    def counted(self) -> bool:
        """Whether admission must ask the store (any rate or concurrency limit)."""
        return (
            self.requests_per_minute is not None
            or self.tokens_per_minute is not None
            or self.concurrent_requests is not None
        )


def limits_from(stored: Mapping[str, Any] | None) -> Limits | None:
    """Limits as stored (a dict of the set ones); fields this version does not know are ignored."""
    if not stored:
        return None
    known = {k: int(v) for k, v in stored.items() if k in Limits.__dataclass_fields__ and v is not None}
    return Limits(**known) if known else None


@dataclass(frozen=True, slots=True)
class Scope:
    """One set of counters: `key` names it in the store, `tag` groups a tenant's scopes together (one
    Redis Cluster slot, so one script sees them all)."""

    key: str
    tag: str
    limits: Limits


@dataclass(frozen=True, slots=True)
class Window:
    """What one kind of limit (requests or tokens) looked like at admission, for the headers."""

    limit: int
    remaining: int
    reset_s: float


@dataclass(frozen=True, slots=True)
class Admission:
    """The store's answer. `window` is the window index the tokens were reserved in (for settling)."""

    ok: bool
    window: int
    requests: Window | None = None
    tokens: Window | None = None
    refused: str = ""  # "requests", "tokens", "tokens_too_large", "concurrency"
    retry_after_s: float = 0.0


class LimitStore(Protocol):
    shared: bool

    async def admit(self, scopes: Sequence[Scope], request_id: str, tokens: int) -> Admission:
        """Atomically over every scope: admit one request reserving `tokens` if each scope's rates and
        concurrency allow it (and then count it in all of them), else change nothing."""

    async def settle(self, scopes: Sequence[Scope], request_id: str, window: int, delta: int) -> None:
        """The request ended: `delta` (actual - reserved tokens) goes back into the window it was reserved
        in, and its concurrency places are freed."""

    def settle_nowait(self, scopes: Sequence[Scope], request_id: str, window: int, delta: int) -> None:
        """`settle` without waiting for the store (the end of a response, where nobody needs the answer);
        this process's next admission sees it when the store is in-process."""

    async def renew(self, scopes_by_request: Sequence[tuple[Sequence[Scope], str]]) -> None:
        """Push the expiry of the requests' concurrency places (those still held)."""


@dataclass(slots=True)
class Counters:
    """One scope's two windows."""

    window: int = 0
    requests: float = 0.0  # in the current window
    requests_before: float = 0.0  # in the window before it
    tokens: float = 0.0
    tokens_before: float = 0.0

    def roll(self, window: int) -> None:
        if self.window >= window:
            return
        if self.window == window - 1:
            self.requests_before, self.tokens_before = self.requests, self.tokens
        else:
            self.requests_before = self.tokens_before = 0.0
        self.requests = self.tokens = 0.0
        self.window = window


def estimate(current: float, before: float, frac: float) -> float:
    """Requests (or tokens) in the last minute: all of the current window's, and the share of the one
    before that still lies inside the minute."""
    return current + before * (1.0 - frac)


def wait_for(current: float, before: float, frac: float, need: float, limit: float) -> float:
    """Seconds until `need` more fit under `limit`: inf if they never can (more than the limit)."""
    if need > limit:
        return math.inf
    if estimate(current, before, frac) + need <= limit:
        return 0.0
    left = (1.0 - frac) * WINDOW_S  # seconds to the end of the current window
    if current + need <= limit and before > 0:
        # Within this window, as the window before slides out: before * (1 - f) <= limit - need - current.
        f = 1.0 - (limit - need - current) / before
        return max(0.0, (f - frac) * WINDOW_S)
    # Next window: the current one slides out.
    return left + max(0.0, (1.0 - (limit - need) / current) * WINDOW_S) if current > 0 else left


def reset_in(current: float, before: float, frac: float) -> float:
    """Seconds until the estimate is back to zero (OpenAI's x-ratelimit-reset-*)."""
    left = (1.0 - frac) * WINDOW_S
    if current > 0:
        return left + WINDOW_S
    return left if before > 0 else 0.0


def tightest(scopes: Iterable[tuple[int | None, float, float]], frac: float) -> Window | None:
    """The headers' window for one kind: of the scopes limiting it (limit, current, before), the one with
    the fewest left."""
    best: Window | None = None
    for limit, current, before in scopes:
        if limit is None:
            continue
        left = limit - current - before * (1.0 - frac)
        remaining = max(0, math.floor(left))
        if best is None or remaining < best.remaining:
            best = Window(limit, remaining, reset_in(current, before, frac))
    return best


def duration(seconds: float) -> str:
    """OpenAI's reset format: '1s', '6m0s', '20ms'."""
    if seconds < 1.0:
        return f"{max(0, math.ceil(seconds * 1000))}ms"
    whole = math.ceil(seconds)
    minutes, secs = divmod(whole, 60)
    return f"{minutes}m{secs}s" if minutes else f"{secs}s"
