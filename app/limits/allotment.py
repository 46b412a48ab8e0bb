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

Only a request counted against one scope alone is admitted so (a tenant's limits, with no key's or
adapter's on top): one allotment per scope and process, so the bound above holds. Scopes with a
concurrency limit are never allotted (a place must be seen by every replica while it is held). A grant is
asked for once a scope's requests come at least a second apart or closer, and an allotment nobody drew on
for IDLE_S gives back what it holds. A process that dies takes its allotments with it: what they held
stays counted until their window has slid out.
"""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass
from typing import Any

from app.limits.state import WINDOW_S, Admission, Scope, Window

QUIET_S = 1.0  # no new grant this long after one was refused or failed (admissions ask the store meanwhile)
DEMAND_S = 1.0  # a set of scopes gets a grant once two of its requests came within this long of each other
IDLE_S = 10.0  # an allotment not drawn on for this long gives back what it holds


@dataclass(slots=True)
class Allotment:
    """What this process holds of one scope's rates, in one window."""

    scopes: tuple[Scope, ...]
    grant_requests: int  # one grant's requests; 0: the scope limits no requests (they are only counted)
    grant_tokens: int  # one grant's tokens; 0: the scope limits no tokens
    window: int = -1
    requests: int = 0  # left to hand out
    tokens: int = 0
    untracked: int = 0  # requests handed out where requests are not limited: counted when it gives back
    expires: float = 0.0  # time.monotonic() when its window ends
    pending: bool = False  # a grant is on its way
    quiet_until: float = 0.0
    last_miss: float = -1e9  # the last request of these scopes that the store admitted
    last_take: float = 0.0
    answer: Admission | None = None  # the store's answer to the last grant, for the headers
    answered_at: float = 0.0
    timer: asyncio.TimerHandle | None = None

    def take(self, reserved: int, now: float) -> bool:
        """One request reserving `reserved` tokens, if what is held covers it."""
        if self.expires <= now:
            return False
        if (self.grant_requests and self.requests < 1) or (self.grant_tokens and self.tokens < reserved):
            return False
        if self.grant_requests:
            self.requests -= 1
        else:
            self.untracked += 1
        if self.grant_tokens:
            self.tokens -= reserved
        self.last_take = now
        return True

    def wanted(self) -> tuple[int, int]:
        """What the next grant asks for: each kind topped up to one grant once under half of one, the
        other left alone (so a grant never piles up a kind nobody is short of)."""
        requests = self.grant_requests - self.requests if 2 * self.requests < self.grant_requests else 0
        tokens = self.grant_tokens - self.tokens if 2 * self.tokens < self.grant_tokens else 0
        return max(0, requests), max(0, tokens)

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
    """The allotment a set of scopes gets, or None where it gets none: a request counted against more
    than one scope (a key's or an adapter's limits on top of the tenant's: each set would take its own
    share of the tenant's limit), a concurrency limit, or limits so small that a share is under two."""
    if share <= 0 or len(scopes) != 1:
        return None
    limits = scopes[0].limits
    if limits.concurrent_requests is not None:
        return None
    rpm, tpm = limits.requests_per_minute, limits.tokens_per_minute
    requests = math.floor(rpm * share) if rpm is not None else 0
    tokens = math.floor(tpm * share) if tpm is not None else 0
    if (rpm is not None and requests < 2) or (tpm is not None and tokens < 2) or not (requests or tokens):
        return None
    return Allotment(scopes, requests, tokens)


def window_end(out: Any, now: float) -> float:
    """When the window of a grant's answer ends, in time.monotonic() (its last entry is the fraction of
    the window gone at the store's clock)."""
    return now + (1.0 - float(out[-1])) * WINDOW_S
