"""Limits kept in this process (the embedded default, one gateway process): the same arithmetic as the
Redis scripts (app.limits.state), so both stores answer alike (tests/limits/test_contract.py).

Bounded: a scope's counters go when both its windows are over and it holds no request, swept when more
than `max_scopes` are kept."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence

from app.limits.state import WINDOW_S, Admission, Counters, Scope, tightest, wait_for


class MemoryLimits:
    shared = False

    def __init__(
        self, *, lease_s: float = 60.0, max_scopes: int = 100_000, clock: Callable[[], float] = time.time
    ) -> None:
        self.lease_s = lease_s
        self.max_scopes = max_scopes
        self._clock = clock
        self._counters: dict[str, Counters] = {}
        self._inflight: dict[str, dict[str, float]] = {}  # scope -> request id -> expiry

    def _now(self) -> tuple[float, int, float]:
        now = self._clock()
        window = int(now // WINDOW_S)
        return now, window, (now - window * WINDOW_S) / WINDOW_S

    def _held(self, key: str, now: float) -> dict[str, float]:
        held = self._inflight.get(key)
        if held is None:
            return {}
        for rid in [r for r, until in held.items() if until <= now]:
            del held[rid]
        return held

    async def admit(self, scopes: Sequence[Scope], request_id: str, tokens: int) -> Admission:
        now, window, frac = self._now()
        if len(self._counters) > self.max_scopes:
            self._sweep(now, window)
        counters = []
        refused, retry = "", 0.0
        for scope in scopes:
            c = self._counters.get(scope.key) or Counters(window)
            c.roll(window)
            counters.append(c)
            lim = scope.limits
            if refused:
                continue
            if lim.requests_per_minute is not None:
                wait = wait_for(c.requests, c.requests_before, frac, 1, lim.requests_per_minute)
                if wait > 0:
                    refused, retry = "requests", wait
                    continue
            if lim.tokens_per_minute is not None:
                wait = wait_for(c.tokens, c.tokens_before, frac, tokens, lim.tokens_per_minute)
                if wait > 0:
                    refused, retry = ("tokens_too_large", 0.0) if math.isinf(wait) else ("tokens", wait)
                    continue
            if (
                lim.concurrent_requests is not None
                and len(self._held(scope.key, now)) >= lim.concurrent_requests
            ):
                refused, retry = "concurrency", 1.0
        if not refused:
            for scope, c in zip(scopes, counters, strict=True):
                c.requests += 1
                c.tokens += tokens
                self._counters[scope.key] = c
                if scope.limits.concurrent_requests is not None:
                    self._inflight.setdefault(scope.key, {})[request_id] = now + self.lease_s
        pairs = list(zip(scopes, counters, strict=True))
        requests = tightest(((s.limits.requests_per_minute, c.requests, c.requests_before) for s, c in pairs), frac)
        token_window = tightest(((s.limits.tokens_per_minute, c.tokens, c.tokens_before) for s, c in pairs), frac)
        return Admission(not refused, window, requests, token_window, refused, retry)

    async def settle(self, scopes: Sequence[Scope], request_id: str, window: int, delta: int) -> None:
        self.settle_nowait(scopes, request_id, window, delta)

    def settle_nowait(self, scopes: Sequence[Scope], request_id: str, window: int, delta: int) -> None:
        _, now_window, _ = self._now()
        for scope in scopes:
            c = self._counters.get(scope.key)
            if c is not None and delta:
                c.roll(now_window)
                if c.window == window:
                    c.tokens = max(0.0, c.tokens + delta)
                elif c.window == window + 1:
                    c.tokens_before = max(0.0, c.tokens_before + delta)
            held = self._inflight.get(scope.key)
            if held is not None:
                held.pop(request_id, None)
                if not held:
                    del self._inflight[scope.key]

    async def renew(self, scopes_by_request: Sequence[tuple[Sequence[Scope], str]]) -> None:
        until = self._clock() + self.lease_s
        for scopes, request_id in scopes_by_request:
            for scope in scopes:
                held = self._inflight.get(scope.key)
                if held is not None and request_id in held:
                    held[request_id] = until

    def _sweep(self, now: float, window: int) -> None:
        for key in [k for k, c in self._counters.items() if c.window < window - 1]:
            if not self._held(key, now):
                del self._counters[key]
                self._inflight.pop(key, None)
