"""Admission on the request path: the caps checked on the body, the reservation taken in the limit store,
the x-ratelimit-* headers, and the settlement when the response ends.

A request's reservation is the most it can use: its prompt's upper bound (one token per UTF-8 byte of its
text, since every token of a byte-level tokenizer covers at least one byte, plus a template allowance per
message; a prompt given as token ids counts exactly) and max_tokens x n for the completion. A tenant with a
token limit who sends no max_tokens gets one (its cap, or GATEWAY_LIMITS_DEFAULT_MAX_TOKENS) put into the
request, so no response can outgrow its reservation. Settling puts the backend's own count in its place:
the usage report, or for a stream cut short the last of the per-chunk reports (continuous usage, which
the data path asks of vLLM for every stream), or nothing when no token came back.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from redis.exceptions import RedisError

from app.errors import InvalidRequest, RateLimited
from app.limits import allotment
from app.limits.allotment import Allotment
from app.limits.state import Admission, Limits, LimitStore, Scope, Window, duration
from app.outages import OutageLog
from app.registry.snapshots import AdapterView, TenantView

log = logging.getLogger(__name__)

TEMPLATE_TOKENS = 32  # a chat template's tokens around the messages (system prompt defaults included)
MESSAGE_TOKENS = 8  # and around each message (role markers)
PROMPT_TOKENS = 8  # a completions prompt's special tokens (BOS and the like)
MAX_HOLD_S = 6 * 3600.0  # no request holds a concurrency place longer (a ticket never settled: a bug)


@dataclass(slots=True)
class Ticket:
    """One admitted request's hold on its limits; settled exactly once."""

    scopes: Sequence[Scope]
    id: str
    reserved: int
    window: int = 0
    headers: dict[str, str] = field(default_factory=dict)
    admitted: bool = False  # the store counted it: settling gives back what it took
    settled: bool = False
    since: float = 0.0  # when it was admitted (time.monotonic())
    local: Allotment | None = None  # admitted from this process's allotment, not by the store


def _min(*values: int | None) -> int | None:
    present = [v for v in values if v is not None]
    return min(present) if present else None


def _merged(*levels: Limits | None) -> Limits:
    """The caps that apply: the tightest of the tenant's, the key's and the adapter's."""
    present = [lim for lim in levels if lim is not None]
    return Limits(
        max_tokens=_min(*(lim.max_tokens for lim in present)),
        max_n=_min(*(lim.max_n for lim in present)),
        max_prompt_bytes=_min(*(lim.max_prompt_bytes for lim in present)),
        tokens_per_minute=_min(*(lim.tokens_per_minute for lim in present)),
    )


def prompt_bytes(body: dict[str, Any]) -> tuple[int, int]:
    """(UTF-8 bytes of the prompt's text, exact tokens given as ids) of a chat or completions body."""
    size = tokens = 0
    messages = body.get("messages")
    if isinstance(messages, list):
        for m in messages:
            if not isinstance(m, dict):
                continue
            content = m.get("content")
            if isinstance(content, str):
                size += len(content.encode())
            elif isinstance(content, list):
                for part in content:
                    if isinstance(part, dict):
                        for text in (part.get("text"), part.get("refusal")):
                            if isinstance(text, str):
                                size += len(text.encode())
            for extra in ("name", "tool_calls", "tool_call_id"):
                if m.get(extra) is not None:
                    size += len(str(m[extra]).encode())
        for extra in ("tools", "functions"):
            if body.get(extra) is not None:
                size += len(str(body[extra]).encode())
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        size += len(prompt.encode())
    elif isinstance(prompt, list):
        for p in prompt:
            if isinstance(p, str):
                size += len(p.encode())
            elif isinstance(p, int):
                tokens += 1
            elif isinstance(p, list):
                tokens += len(p)
    if isinstance(body.get("suffix"), str):
        size += len(body["suffix"].encode())
    return size, tokens


class LimitGate:
    def __init__(
        self,
        store: LimitStore,
        *,
        fail_open: bool = False,
        default_max_tokens: int = 4096,
        outage: OutageLog | None = None,
        renew_s: float | None = None,
        local_share: float = 0.0,
    ) -> None:
        self.store = store
        self.fail_open = fail_open
        self.default_max_tokens = default_max_tokens
        self.outage = outage
        self._held: dict[str, Ticket] = {}  # admitted, not yet settled: their concurrency places renewed
        if outage is not None and hasattr(store, "on_error"):
            store.on_error = outage.failed
        lease = getattr(store, "lease_s", 60.0)
        self.renew_s = renew_s if renew_s is not None else lease / 3
        self._renewer: asyncio.Task[None] | None = None
        self._plans: dict[tuple[int, int], tuple[TenantView, AdapterView | None, Limits, tuple[Scope, ...]]] = {}
        self._prefix = os.urandom(6).hex() + "-"  # request ids: unique across replicas, cheap to make
        self._ids = itertools.count()
        # Allotments (app.limits.allotment) by set of scopes, where the store can grant them.
        self.local_share = local_share if hasattr(store, "grant_raw") else 0.0
        # Kept by the scopes' value (a registry reload makes new tuples of the same scopes), and found by
        # the tuple's identity on the request path.
        self._allotments: dict[tuple[Scope, ...], Allotment | None] = {}
        self._seen: dict[int, tuple[Sequence[Scope], Allotment | None]] = {}
        self._granting: set[asyncio.Future[Any]] = set()  # grants on their way
        self._closed = False

    def prepare(
        self, tenant: TenantView, body: dict[str, Any], adapter: AdapterView | None = None
    ) -> Ticket | None:
        """Checks the caps on the body (400 beyond them), puts a max_tokens in where a token limit needs
        one; returns the ticket to admit, or None when no rate or concurrency limit applies. `adapter`:
        the one the request names (its own limits count too), None for a base model."""
        if adapter is not None and adapter.limits is None:
            adapter = None
        if tenant.limits is None and tenant.key_limits is None and adapter is None:
            return None
        plan = self._plans.get((id(tenant), id(adapter)))
        if plan is None or plan[0] is not tenant or plan[1] is not adapter:
            plan = self._plan(tenant, adapter)
        _, _, caps, scopes = plan
        n = body.get("n", 1)
        if n is None:
            n = 1
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise InvalidRequest("'n' must be a positive integer", param="n")
        best_of = body.get("best_of")
        choices = max(n, best_of) if isinstance(best_of, int) and not isinstance(best_of, bool) else n
        if caps.max_n is not None and choices > caps.max_n:
            raise InvalidRequest(f"'n' may be at most {caps.max_n} for your account", param="n")
        key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
        asked = body.get(key)
        if asked is not None and (not isinstance(asked, int) or isinstance(asked, bool) or asked < 1):
            raise InvalidRequest(f"'{key}' must be a positive integer", param=key)
        if asked is not None and caps.max_tokens is not None and asked > caps.max_tokens:
            raise InvalidRequest(f"'{key}' may be at most {caps.max_tokens} for your account", param=key)
        size, id_tokens = prompt_bytes(body)
        if caps.max_prompt_bytes is not None and size + id_tokens > caps.max_prompt_bytes:
            # A prompt of token ids counts one byte a token (each stands for at least one).
            raise InvalidRequest(
                f"the prompt is {size + id_tokens} bytes; at most {caps.max_prompt_bytes} are allowed for "
                "your account",
                param="messages" if "messages" in body else "prompt",
            )
        if asked is None and (caps.tokens_per_minute is not None or caps.max_tokens is not None):
            asked = caps.max_tokens or self.default_max_tokens
            body["max_tokens"] = asked  # the completion can never outgrow the reservation
        if asked is None:
            asked = 0  # no token limit: nothing is reserved for the completion
        messages = body.get("messages")
        template = TEMPLATE_TOKENS + MESSAGE_TOKENS * len(messages) if isinstance(messages, list) else PROMPT_TOKENS
        reserved = size + id_tokens + template + asked * choices if caps.tokens_per_minute is not None else 0
        if not scopes:
            return None
        return Ticket(scopes, f"{self._prefix}{next(self._ids)}", reserved)

    def _plan(
        self, tenant: TenantView, adapter: AdapterView | None
    ) -> tuple[TenantView, AdapterView | None, Limits, tuple[Scope, ...]]:
        """A caller's merged caps and its scopes, built once per registry view (the cache hands out the
        same views until it reloads; holding them keeps their ids unique). Every scope carries the
        tenant's tag: one Redis Cluster slot, so one script admits over all of them."""
        scopes = []
        if tenant.limits is not None and tenant.limits.counted:
            scopes.append(Scope(f"t:{tenant.id.hex}", tenant.id.hex, tenant.limits))
        if tenant.key_limits is not None and tenant.key_limits.counted and tenant.key_id is not None:
            scopes.append(Scope(f"k:{tenant.key_id.hex}", tenant.id.hex, tenant.key_limits))
        adapter_limits = adapter.limits if adapter is not None else None
        if adapter is not None and adapter_limits is not None and adapter_limits.counted:
            # By name, under the tenant's tag: every version of the adapter counts against one limit.
            scopes.append(Scope(f"a:{adapter.name}", tenant.id.hex, adapter_limits))
        plan = (tenant, adapter, _merged(tenant.limits, tenant.key_limits, adapter_limits), tuple(scopes))
        if len(self._plans) >= 10_000:
            self._plans.clear()
        self._plans[(id(tenant), id(adapter))] = plan
        return plan

    async def admit(self, ticket: Ticket) -> None:
        """Takes the reservation, or raises RateLimited (429) with Retry-After and the headers."""
        try:
            admission = await self.store.admit(ticket.scopes, ticket.id, ticket.reserved)
        except (RedisError, TimeoutError, OSError) as exc:
            if self._store_failed(ticket, exc):
                return
            raise
        refusal = self._concluded(ticket, admission)
        if refusal is not None:
            raise refusal

    def admit_soon(self, ticket: Ticket) -> asyncio.Future[None]:
        """`admit` started now, as a future (no task of its own where the store queues admissions): it
        resolves when the store answers; cancelling it before then undoes the admission."""
        raw_start = getattr(self.store, "admit_raw", None)
        if raw_start is None:
            return asyncio.ensure_future(self.admit(ticket))
        loop = asyncio.get_running_loop()
        out: asyncio.Future[None] = loop.create_future()
        if self.local_share and self._admit_locally(ticket):
            out.set_result(None)
            return out
        raw: asyncio.Future[Any] = raw_start(ticket.scopes, ticket.id, ticket.reserved)
        parse = self.store.parse  # type: ignore[attr-defined]

        def answered(f: asyncio.Future[Any]) -> None:
            if out.done():
                # The caller left between the store's answer and this callback: whatever was taken for
                # it goes back (the store undoes only admissions cancelled before it answered).
                if not f.cancelled() and f.exception() is None:
                    admission = parse(ticket.scopes, f.result())
                    if admission.ok:
                        self.store.settle_nowait(ticket.scopes, ticket.id, admission.window, -ticket.reserved)
                return
            if f.cancelled():
                out.cancel()
                return
            exc = f.exception()
            if exc is not None:
                if isinstance(exc, RedisError | TimeoutError | OSError) and self._store_failed(ticket, exc):
                    out.set_result(None)
                else:
                    out.set_exception(exc)
                return
            refusal = self._concluded(ticket, parse(ticket.scopes, f.result()))
            if refusal is None:
                out.set_result(None)
            else:
                out.set_exception(refusal)

        raw.add_done_callback(answered)
        out.add_done_callback(lambda o: raw.cancel() if o.cancelled() and not raw.done() else None)
        return out

    def _admit_locally(self, ticket: Ticket) -> bool:
        """Admitted from this process's allotment of the ticket's scopes, if it holds enough; a grant is
        asked for in the background when it runs low."""
        fast = self._seen.get(id(ticket.scopes))
        if fast is not None and fast[0] is ticket.scopes:
            held = fast[1]  # the plan's own tuple, as on every request until the registry reloads
        else:
            scopes = tuple(ticket.scopes)
            if scopes in self._allotments:
                held = self._allotments[scopes]
            else:
                if len(self._allotments) >= 10_000:
                    for sc in list(self._allotments):
                        self._drop(sc)
                held = self._allotments[scopes] = allotment.sized(scopes, self.local_share)
            if len(self._seen) >= 10_000:
                self._seen.clear()
            self._seen[id(ticket.scopes)] = (ticket.scopes, held)  # holding the tuple keeps its id unique
        if held is None:
            return False
        now = time.monotonic()
        if held.take(ticket.reserved, now):
            ticket.window, ticket.admitted, ticket.local, ticket.since = held.window, True, held, now
            ticket.headers = _headers(*held.windows(now))
            if held.wanted() != (0, 0):
                self._grant(held, ticket.reserved, now)
            return True
        if now - held.last_miss < allotment.DEMAND_S:  # a second request close behind: worth a grant
            self._grant(held, ticket.reserved, now)
        held.last_miss = now
        return False

    def _grant(self, held: Allotment, reserved: int, now: float) -> None:
        if held.pending or self._closed or now < held.quiet_until or not held.worth(reserved):
            return
        if held.expires <= now:
            self._expire(held)  # its window is over: a grant starts it afresh
        requests, tokens = held.wanted()
        if not (requests or tokens):
            return
        held.pending = True
        raw: asyncio.Future[Any] = self.store.grant_raw(  # type: ignore[attr-defined]
            held.scopes, f"{self._prefix}{next(self._ids)}", requests, tokens
        )
        self._granting.add(raw)
        raw.add_done_callback(lambda f: self._granted(held, f, requests, tokens))

    def _granted(self, held: Allotment, f: asyncio.Future[Any], requests: int, tokens: int) -> None:
        self._granting.discard(f)
        held.pending = False
        now = time.monotonic()
        if f.cancelled() or f.exception() is not None:
            # It may still have run (a timeout): then it stays counted to its window's end, on the safe
            # side. The per-request path meets the outage meanwhile.
            held.quiet_until = now + allotment.QUIET_S
            if not f.cancelled() and self.outage is not None:
                self.outage.failed(f.exception())  # type: ignore[arg-type]
            return
        out = f.result()
        answer = self.store.parse(held.scopes, out)  # type: ignore[attr-defined]
        if not answer.ok:
            held.quiet_until = now + min(allotment.QUIET_S, max(0.05, answer.retry_after_s))
            return
        if held.window != answer.window:
            self._expire(held)  # a new window: what is left of the last one goes back first
            held.window = answer.window
        held.requests += requests
        held.tokens += tokens
        held.answer, held.answered_at = answer, now
        held.expires = allotment.window_end(out, now)
        held.last_take = now
        if self._closed:
            self._expire(held)  # answered while the gate closed: straight back
        elif held.timer is None:
            self._tick(held)

    def _tick(self, held: Allotment) -> None:
        """At its window's end, or once nobody drew on it for IDLE_S, an allotment gives back."""
        held.timer = None
        now = time.monotonic()
        if now >= held.expires or now - held.last_take >= allotment.IDLE_S:
            self._expire(held)
            return
        at = min(held.expires, held.last_take + allotment.IDLE_S)
        held.timer = asyncio.get_running_loop().call_later(max(0.0, at - now), self._tick, held)

    def _expire(self, held: Allotment) -> None:
        """What the allotment still holds goes back into its window (and the requests it handed out
        uncounted, where requests are not limited, are counted there)."""
        if held.timer is not None:
            held.timer.cancel()
            held.timer = None
        back_requests = held.requests - held.untracked
        back_tokens = max(0, held.tokens) if held.grant_tokens else 0
        if held.window >= 0 and (back_requests or back_tokens):
            self.store.give_back_nowait(  # type: ignore[attr-defined]
                held.scopes, held.window, back_requests, back_tokens
            )
        held.requests = held.tokens = held.untracked = 0
        held.expires = 0.0

    def _drop(self, scopes: tuple[Scope, ...]) -> None:
        self._seen.clear()
        held = self._allotments.pop(scopes, None)
        if held is not None:
            self._expire(held)

    def _store_failed(self, ticket: Ticket, exc: BaseException) -> bool:
        """The store did not answer: True when the request goes on uncounted (fail open).

        A call that timed out may still have run: its concurrency place is given back (a settlement of
        no tokens only frees places, so it is right whether or not the admission happened); the tokens
        it may have reserved stay counted to the window's end, erring on the side of the limit."""
        self.store.settle_nowait(ticket.scopes, ticket.id, 0, 0)
        if self.outage is not None:
            self.outage.failed(exc)
        if self.fail_open:
            ticket.settled = True  # nothing was taken: nothing to give back
            return True
        return False

    def _concluded(self, ticket: Ticket, admission: Admission) -> RateLimited | None:
        """The store's answer on the ticket; the refusal to raise, if it was refused."""
        if self.outage is not None:
            self.outage.recovered()
        ticket.window = admission.window
        ticket.headers = headers(admission)
        if not admission.ok:
            ticket.settled = True
            return _refusal(admission, ticket)
        ticket.admitted = True
        ticket.since = time.monotonic()
        self._held[ticket.id] = ticket
        if self._renewer is None or self._renewer.done():
            self._renewer = asyncio.create_task(self._renew_forever())
        return None

    def settle(self, ticket: Ticket, used_tokens: int) -> None:
        """The response is over: its real tokens in place of the reservation, its places freed (in the
        background; a failure is logged and the places expire after one lease)."""
        if ticket.settled or not ticket.admitted:
            return  # refused, not yet admitted (its caller left: the store undid it), or done
        ticket.settled = True
        local = ticket.local
        if local is not None:
            # From the allotment, which holds its tokens: what it did not use goes back there while
            # that window lasts, else into the window in the store.
            if not local.grant_tokens:
                return
            unused = ticket.reserved - used_tokens
            if unused > 0 and local.window == ticket.window and local.expires > time.monotonic():
                keep = min(unused, max(0, local.grant_tokens - local.tokens))  # it holds one grant at most
                local.tokens += keep
                unused -= keep
            if unused:  # beyond that, its window over, or more used than reserved: the store counts it
                self.store.settle_nowait(ticket.scopes, ticket.id, ticket.window, -unused)
            return
        self._held.pop(ticket.id, None)
        delta = used_tokens - ticket.reserved if ticket.reserved or used_tokens else 0
        self.store.settle_nowait(ticket.scopes, ticket.id, ticket.window, delta)

    async def _renew_forever(self) -> None:
        """Every third of a lease, the places of the requests still running; a ticket held longer than
        MAX_HOLD_S (no response runs that long: one that was never settled) is let go, its place expiring
        one lease later."""
        while self._held:
            await asyncio.sleep(self.renew_s)
            too_old = time.monotonic() - MAX_HOLD_S
            for stale in [t for t in self._held.values() if t.since < too_old]:
                log.error("limits: request %s held its place for %.0f s; letting it go", stale.id, MAX_HOLD_S)
                self._held.pop(stale.id, None)
            held = [(t.scopes, t.id) for t in self._held.values()]
            try:
                await self.store.renew(held)
            except Exception as exc:  # noqa: BLE001 - the next beat tries again
                if self.outage is not None:
                    self.outage.failed(exc)

    async def close(self) -> None:
        self._closed = True  # no new grant from here on
        # Grants on their way are answered (their callbacks run first) before everything held goes back,
        # ahead of the store's last batches.
        await asyncio.gather(*self._granting, return_exceptions=True)
        await asyncio.sleep(0)
        for scopes in list(self._allotments):
            self._drop(scopes)
        if self._renewer is not None:
            self._renewer.cancel()
            await asyncio.gather(self._renewer, return_exceptions=True)
        closing = getattr(self.store, "close", None)
        if closing is not None:
            await closing()


def _put(out: dict[str, str], kind: str, w: Window | None) -> None:
    if w is None:
        return
    out[f"x-ratelimit-limit-{kind}"] = str(w.limit)
    out[f"x-ratelimit-remaining-{kind}"] = str(w.remaining)
    out[f"x-ratelimit-reset-{kind}"] = duration(w.reset_s)


def headers(admission: Admission) -> dict[str, str]:
    """OpenAI's x-ratelimit-* headers for the tightest scope of each kind."""
    return _headers(admission.requests, admission.tokens)


def _headers(requests: Window | None, tokens: Window | None) -> dict[str, str]:
    out: dict[str, str] = {}
    _put(out, "requests", requests)
    _put(out, "tokens", tokens)
    return out


def _refusal(admission: Admission, ticket: Ticket) -> RateLimited:
    retry = {**ticket.headers, "Retry-After": str(max(1, math.ceil(admission.retry_after_s)))}
    kind = admission.refused
    if kind == "requests":
        message = "rate limit reached for requests per minute"
    elif kind == "tokens":
        message = f"rate limit reached for tokens per minute: this request reserves {ticket.reserved}"
    elif kind == "tokens_too_large":
        message = (
            f"request too large: it may use {ticket.reserved} tokens (prompt + max_tokens x n), more than your "
            "tokens-per-minute limit; send a smaller prompt or a lower max_tokens"
        )
        retry.pop("Retry-After")
    else:
        message = "too many concurrent requests"
    exc = RateLimited(f"{message}; retry after the time in Retry-After", headers=retry)
    exc.limit = kind
    exc.type = "tokens" if kind.startswith("tokens") else "requests"  # as OpenAI types its 429s
    return exc
