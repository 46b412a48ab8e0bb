"""Allotments: a small share of a tenant's rates taken from the shared store at once, so that one gateway
process admits most requests from itself instead of one Redis round trip each.

A grant takes `requests` requests and `tokens` tokens in one atomic admission (all or nothing, under every
scope's limits, counted in the window it was taken in); the process then hands them out one request at a
time, and gives back what is left when that window ends. Nothing is admitted that the store did not grant,
so the limits are never exceeded however many processes run: the cost is on the other side, where the
unused part of each process's allotment is counted as taken. With a share s of each limit per grant and R
processes, at most R x s of a limit can be held unused at once (0.2% each by default: 1% across five
replicas). Near a limit a grant no longer fits and every request asks the store as before, so admission
there stays exact.

Scopes with a concurrency limit are never allotted: a place must be seen by every replica while it is
held. A process dies with its allotments: what they held stays counted until their window has slid out.
"""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass
from typing import Any

from app.limits.state import WINDOW_S, Admission, Scope, Window

BIG_GRANT = 1000  # requests in a grant where no scope limits requests (only tokens are being shared out)
QUIET_S = 1.0  # no new grant this long after one was refused or failed (admissions ask the store meanwhile)


@dataclass(slots=True)
class Allotment:
    """What this process holds of one set of scopes' rates, in one window."""

    scopes: tuple[Scope, ...]
    grant_requests: int  # what one grant asks for
    grant_tokens: int  # 0: no scope limits tokens
    window: int = -1
    requests: int = 0  # left to hand out
    tokens: int = 0
    expires: float = 0.0  # time.monotonic() when its window ends
    pending: bool = False  # a grant is on its way
    quiet_until: float = 0.0
    answer: Admission | None = None  # the store's answer to the last grant, for the headers
    answered_at: float = 0.0
    timer: asyncio.TimerHandle | None = None

    def take(self, reserved: int, now: float) -> bool:
        """One request reserving `reserved` tokens, if what is held covers it."""
        if self.expires <= now or self.requests < 1 or (self.grant_tokens and self.tokens < reserved):
            return False
        self.requests -= 1
        if self.grant_tokens:
            self.tokens -= reserved
        return True

    def low(self) -> bool:
        """Time to ask for the next grant (half of one is left)."""
        return 2 * self.requests < self.grant_requests or (self.grant_tokens > 0 and 2 * self.tokens < self.grant_tokens)

    def worth(self, reserved: int) -> bool:
        """Whether a grant can serve requests of this size at all (a grant must hold two of them)."""
        return not self.grant_tokens or 2 * reserved <= self.grant_tokens

    def windows(self, now: float) -> tuple[Window | None, Window | None]:
        """The headers' windows: the store's word at the last grant, with what this process still holds
        of it counted as remaining."""
        a = self.answer
        if a is None:
            return None, None
        gone = now - self.answered_at
        requests = tokens = None
        if a.requests is not None:
            requests = Window(a.requests.limit, a.requests.remaining + self.requests, max(0.0, a.requests.reset_s - gone))
        if a.tokens is not None:
            left = a.tokens.remaining + max(0, self.tokens)
            tokens = Window(a.tokens.limit, left, max(0.0, a.tokens.reset_s - gone))
        return requests, tokens


def sized(scopes: tuple[Scope, ...], share: float) -> Allotment | None:
    """The allotment a set of scopes gets, or None where it gets none (concurrency limited, or limits so
    small that a share of them is under two requests)."""
    if share <= 0 or any(s.limits.concurrent_requests is not None for s in scopes):
        return None
    rpm = [s.limits.requests_per_minute for s in scopes if s.limits.requests_per_minute is not None]
    tpm = [s.limits.tokens_per_minute for s in scopes if s.limits.tokens_per_minute is not None]
    requests = math.floor(min(rpm) * share) if rpm else BIG_GRANT
    tokens = math.floor(min(tpm) * share) if tpm else 0
    if requests < 2 or (tpm and tokens < 2):
        return None
    return Allotment(scopes, requests, tokens)


def window_end(out: Any, now: float) -> float:
    """When the window of a grant's answer ends, in time.monotonic() (its last entry is the fraction of
    the window gone at the store's clock)."""
    return now + (1.0 - float(out[-1])) * WINDOW_S

