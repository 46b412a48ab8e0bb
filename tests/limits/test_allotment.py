"""Allotments (app.limits.allotment) on the real Redis: gateway processes that admit from a share of a
limit taken at once never admit more than the limit together, leave at most their shares unused, and give
back what they hold; tokens settle into the allotment they came from."""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis

from app.errors import RateLimited
from app.limits.gate import LimitGate, Ticket
from app.limits.redis_store import RedisLimits
from app.limits.state import Limits, Scope

REDIS_URL = os.environ.get("GATEWAY_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


@pytest.fixture
async def prefix() -> AsyncIterator[str]:
    prefix = f"lgw-allot-test-{uuid.uuid4().hex[:8]}"
    yield prefix
    redis = Redis.from_url(REDIS_URL)
    keys = [k async for k in redis.scan_iter(match=f"{prefix}:*")]
    if keys:
        await redis.delete(*keys)
    await redis.aclose()


CLIENTS: dict[int, Redis] = {}


def replicas(prefix: str, n: int, share: float) -> list[LimitGate]:
    """`n` gateway processes' gates: each its own client and store, as replicas have."""
    gates = []
    for _ in range(n):
        client = Redis.from_url(REDIS_URL)
        gates.append(LimitGate(RedisLimits(client, prefix=prefix), local_share=share))
        CLIENTS[id(gates[-1])] = client
    return gates


async def counters(prefix: str, s: Scope) -> dict[str, float]:
    redis = Redis.from_url(REDIS_URL)
    raw = await redis.hgetall(f"{prefix}:lim:{{{s.tag}}}:c:{s.key}")
    await redis.aclose()
    return {k.decode(): float(v) for k, v in raw.items()}


async def admit(gate: LimitGate, scopes: list[Scope], reserved: int = 0) -> Ticket | None:
    ticket = Ticket(scopes, uuid.uuid4().hex, reserved)
    try:
        await gate.admit_soon(ticket)
    except RateLimited:
        return None
    return ticket


async def close(gates: list[LimitGate]) -> None:
    for g in gates:
        await g.close()
        await CLIENTS.pop(id(g)).aclose()


async def test_replicas_admitting_from_allotments_never_pass_the_limit(prefix: str) -> None:
    limit, share, n = 1000, 0.01, 4  # grants of 10 requests: at most 4 x 10 held unused at once
    s = [Scope("t:a", "a", Limits(requests_per_minute=limit))]
    gates = replicas(prefix, n, share)
    admitted: list[Ticket] = []
    try:
        for wave in range(40):  # waves of 40 at once: 1,600 asked for, 1,000 may pass
            got = await asyncio.gather(*(admit(gates[(wave + i) % n], s) for i in range(40)))
            admitted += [t for t in got if t is not None]
            await asyncio.sleep(0.005)  # grants land between waves, as between a gateway's requests
        local = sum(t.local is not None for t in admitted)
        assert len(admitted) <= limit  # never more than the limit, however the grants fell
        assert len(admitted) >= limit - n * int(limit * share), len(admitted)
        assert local > len(admitted) // 2, local  # most of them without a round trip of their own
        # Every response names where the limit stands, the local ones too.
        assert {"x-ratelimit-limit-requests", "x-ratelimit-remaining-requests"} <= set(admitted[-1].headers)
    finally:
        await close(gates)  # what the allotments still hold goes back
    assert (await counters(prefix, s[0]))["rc"] == len(admitted)


async def test_an_allotments_tokens_settle_back_into_it_and_the_rest_is_given_back(prefix: str) -> None:
    s = [Scope("t:b", "b", Limits(tokens_per_minute=100_000))]  # share 1%: grants of 1,000 tokens
    (gate,) = replicas(prefix, 1, 0.01)
    try:
        first = await admit(gate, s, 100)  # nothing held: the store admits it (one request is no demand)
        assert first is not None and first.local is None
        gate.settle(first, 30)
        second = await admit(gate, s, 100)  # a second close behind it: a grant is asked for too
        assert second is not None and second.local is None
        await asyncio.sleep(0.1)
        local = [await admit(gate, s, 100) for _ in range(5)]
        assert all(t is not None and t.local is not None for t in local)
        # Where the limit stands as the store last said (at the grant), with what the allotment still
        # holds: off by at most what was counted in between (the second request's reservation).
        remaining = int(local[-1].headers["x-ratelimit-remaining-tokens"])  # type: ignore[union-attr]
        assert abs(remaining - (100_000 - 30 - 100 - 5 * 100)) <= 100, remaining
        gate.settle(second, 30)
        for t in local:
            gate.settle(t, 30)  # type: ignore[arg-type]
        held = local[0].local  # type: ignore[union-attr]
        assert held is not None and held.tokens == 1_000 - 5 * 100 + 5 * 70
    finally:
        await close([gate])
    # Counted: what the seven used, and nothing of what the allotment still held when it went back; the
    # requests it handed out uncounted (this scope limits no requests) are counted now.
    after = await counters(prefix, s[0])
    assert (after["tc"], after["rc"]) == (7 * 30, 7)


async def test_near_the_limit_every_admission_asks_the_store(prefix: str) -> None:
    s = [Scope("t:c", "c", Limits(requests_per_minute=30))]  # share 10%: grants of 3
    gates = replicas(prefix, 2, 0.1)
    try:
        got = [await admit(gates[i % 2], s) for i in range(40)]
        await asyncio.sleep(0.05)
        assert sum(t is not None for t in got) >= 30 - 2 * 3  # at most both grants' worth unused
        assert sum(t is not None for t in got) <= 30
    finally:
        await close(gates)
    assert (await counters(prefix, s[0]))["rc"] <= 30


async def test_scopes_with_a_concurrency_limit_are_never_allotted(prefix: str) -> None:
    s = [Scope("t:d", "d", Limits(requests_per_minute=100_000, concurrent_requests=1_000))]
    (gate,) = replicas(prefix, 1, 0.05)
    try:
        tickets = [await admit(gate, s) for _ in range(20)]
        assert all(t is not None and t.local is None for t in tickets)  # each place seen by every replica
        for t in tickets:
            gate.settle(t, 0)  # type: ignore[arg-type]
    finally:
        await close([gate])
    assert (await counters(prefix, s[0]))["rc"] == 20


async def test_a_request_counted_against_several_scopes_is_never_allotted(prefix: str) -> None:
    # A key's limits on top of the tenant's: an allotment per key would each take a share of the
    # tenant's limit, so such requests are admitted by the store one by one.
    s = [Scope("t:e", "e", Limits(requests_per_minute=100_000)), Scope("k:e1", "e", Limits(requests_per_minute=100_000))]
    (gate,) = replicas(prefix, 1, 0.05)
    try:
        tickets = [await admit(gate, s) for _ in range(20)]
        assert all(t is not None and t.local is None for t in tickets)
    finally:
        await close([gate])
    assert (await counters(prefix, s[0]))["rc"] == 20


async def test_a_grant_tops_up_only_the_kind_running_low(prefix: str) -> None:
    # Tokens run low ten times faster than requests: their grants must not pile requests up in the store
    # (which would refuse the tenant's other traffic long before its request limit).
    s = [Scope("t:f", "f", Limits(requests_per_minute=30_000, tokens_per_minute=1_000_000))]
    (gate,) = replicas(prefix, 1, 0.002)  # grants of 60 requests and 2,000 tokens: two requests' worth
    admitted = 0
    try:
        for _ in range(200):
            t = await admit(gate, s, 900)
            admitted += t is not None
            await asyncio.sleep(0.002)  # room for the grants to land
        counted = (await counters(prefix, s[0]))["rc"]
        assert counted <= admitted + 60, (counted, admitted)  # at most one grant of requests held
    finally:
        await close([gate])
    assert (await counters(prefix, s[0]))["rc"] == admitted


async def test_a_grant_still_on_its_way_when_the_gate_closes_is_given_back(prefix: str) -> None:
    s = [Scope("t:g", "g", Limits(requests_per_minute=100_000))]  # share 0.2%: grants of 200
    (gate,) = replicas(prefix, 1, 0.002)
    try:
        assert await admit(gate, s) is not None
        assert await admit(gate, s) is not None  # asks for a grant, answered during the close
    finally:
        await close([gate])
    assert (await counters(prefix, s[0]))["rc"] == 2


async def test_an_allotment_nobody_draws_on_gives_back_before_its_window_ends(
    prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from app.limits import allotment

    monkeypatch.setattr(allotment, "IDLE_S", 0.3)
    s = [Scope("t:h", "h", Limits(requests_per_minute=100_000))]
    (gate,) = replicas(prefix, 1, 0.002)
    try:
        for _ in range(3):
            assert await admit(gate, s) is not None
            await asyncio.sleep(0.05)
        assert (await counters(prefix, s[0]))["rc"] > 3  # a grant is held
        await asyncio.sleep(0.8)  # idle past IDLE_S (and the give-back's ride to the store)
        assert (await counters(prefix, s[0]))["rc"] == 3
    finally:
        await close([gate])
