"""Placement policies: given every backend's residency, where should a request for an adapter go, and
what (if anything) must be evicted there first. Pure functions of the snapshot: the same classes run in
the gateway and in bench/placement.py's simulator.

`LruPolicy` is the product's policy; `RoundRobinPolicy` and `RandomPolicy` are kept as baselines."""

from __future__ import annotations

import enum
import itertools
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from app.residency.state import BackendState


class Action(enum.StrEnum):
    USE = "use"  # registered there: send it there
    LOAD = "load"  # load it there (after evicting `evict`, if set)
    WAIT = "wait"  # nothing can take it right now: wait for a slot to free up


@dataclass(frozen=True, slots=True)
class Decision:
    action: Action
    backend: str | None = None
    evict: str | None = None


WAIT = Decision(Action.WAIT)


@dataclass(frozen=True, slots=True)
class Request:
    adapter: str
    tenant: str
    pinned: frozenset[str] = frozenset()  # adapters that must never be evicted
    tenant_cap: int | None = None  # most adapters this tenant may hold on one backend
    # Set once the request has waited its patience out: then it may go where every GPU slot is active
    # (slower for that backend, but no request starves behind adapters that stay busy).
    overfill: bool = False


class PlacementPolicy(Protocol):
    name: str
    # Whether the data path may skip the policy when the adapter is live and has room (the one-round-trip
    # hot path). Baselines set it False: they route without looking at residency.
    prefers_live: bool

    def decide(self, request: Request, backends: Sequence[BackendState]) -> Decision: ...


def _slots_taken(b: BackendState) -> int:
    """GPU slots in use: adapters with requests in flight, plus loads under way (each will need one)."""
    return b.active + len(b.loading - b.inflight.keys())


def _victim(request: Request, b: BackendState) -> str | None:
    """The least recently used adapter there that is idle, not pinned and not being moved; if the tenant
    is at its cap on that backend, it must be one of the tenant's own."""
    at_cap = request.tenant_cap is not None and b.tenant_count(request.tenant) >= request.tenant_cap
    idle = [
        (last, a)
        for a, last in b.registered.items()
        if a not in b.inflight
        and a not in request.pinned
        and (not at_cap or b.tenants.get(a) == request.tenant)
    ]
    return min(idle)[1] if idle else None


def _load_or_evict(request: Request, b: BackendState) -> Decision | None:
    """How this backend could take the adapter, if at all."""
    if request.adapter in b.loading or request.adapter in b.evicting:
        return None
    at_cap = request.tenant_cap is not None and b.tenant_count(request.tenant) >= request.tenant_cap
    if b.occupied < b.capacity and not at_cap:
        return Decision(Action.LOAD, b.id)
    victim = _victim(request, b)
    return Decision(Action.LOAD, b.id, victim) if victim is not None else None


class LruPolicy:
    """Keeps each backend's active adapters within its GPU slots and never thrashes:
    1. live somewhere with room (active there already, or a slot free that no load under way claims):
       the least busy such holder;
    2. being loaded somewhere: wait for that load (single flight, fleet-wide);
    3. else load where a GPU slot is free, preferring free capacity, else evicting the least recently
       used idle adapter (globally oldest first), so hot adapters stay put;
    4. else wait in the gateway for a slot. Never add an adapter to a backend whose slots are all
       active (past --max-loras every request there slows down: bench/placement.py measures it),
       unless the request has waited its patience out (`overfill`), so none starves."""

    name = "lru"
    prefers_live = True

    def decide(self, request: Request, backends: Sequence[BackendState]) -> Decision:
        a = request.adapter
        holders = [b for b in backends if a in b.registered]
        roomy = [b for b in holders if a in b.inflight or _slots_taken(b) < b.slots or request.overfill]
        if roomy:
            return Decision(Action.USE, min(roomy, key=lambda b: (b.inflight.get(a, 0), b.active)).id)
        if any(a in b.loading for b in backends):
            return WAIT  # single flight: a load of it is under way; never start a second copy meanwhile
        # Not live with room: load where a GPU slot is free (loads under way will take theirs).
        free_slot = [b for b in backends if _slots_taken(b) < b.slots or request.overfill]
        options: list[tuple[tuple[int, float, int], Decision]] = []
        for b in free_slot:
            d = _load_or_evict(request, b)
            if d is None:
                continue
            # No eviction beats eviction; among evictions the globally least recently used victim goes.
            age = b.registered[d.evict] if d.evict else float("-inf")
            options.append(((1 if d.evict else 0, age, b.active), d))
        if options:
            return min(options, key=lambda o: o[0])[1]
        return WAIT


class RoundRobinPolicy:
    """Baseline: the next backend in turn, loading (and evicting LRU) there whatever lives elsewhere."""

    name = "round-robin"
    prefers_live = False

    def __init__(self) -> None:
        self._turn = itertools.count()

    def _pick(self, backends: Sequence[BackendState]) -> int:
        return next(self._turn) % len(backends)

    def decide(self, request: Request, backends: Sequence[BackendState]) -> Decision:
        if not backends:
            return WAIT
        start = self._pick(backends)
        for i in range(len(backends)):
            b = backends[(start + i) % len(backends)]
            if request.adapter in b.registered:
                return Decision(Action.USE, b.id)
            d = _load_or_evict(request, b)
            if d is not None:
                return d
        return WAIT


class RandomPolicy(RoundRobinPolicy):
    """Baseline: a random backend, loading (and evicting LRU) there whatever lives elsewhere."""

    name = "random"

    def __init__(self, seed: int | None = None) -> None:
        super().__init__()
        self._rng = random.Random(seed)

    def _pick(self, backends: Sequence[BackendState]) -> int:
        return self._rng.randrange(len(backends))


class PolicyName(enum.StrEnum):
    LRU = "lru"
    ROUND_ROBIN = "round-robin"
    RANDOM = "random"


def make_policy(name: PolicyName | str) -> PlacementPolicy:
    match PolicyName(name):
        case PolicyName.LRU:
            return LruPolicy()
        case PolicyName.ROUND_ROBIN:
            return RoundRobinPolicy()
        case PolicyName.RANDOM:
            return RandomPolicy()
