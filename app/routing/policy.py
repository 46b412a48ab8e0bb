"""Placement policies: given every backend's residency, where should a request for an adapter go, and
what (if anything) must be evicted there first. Pure functions of the snapshot: the same classes run in
the gateway and in bench/placement.py's simulator.

`PackPolicy` is the product's default (GATEWAY_PLACEMENT_POLICY); `LruPolicy` is the earlier one, which
holds requests in the gateway for a slot; `AffinityPolicy`, `RoundRobinPolicy` and `RandomPolicy` are
baselines. Every policy loads at most one adapter at a time per backend, and at most `pool_loads` at
once across a pool's backends (`_load_or_evict`)."""

from __future__ import annotations

import enum
import itertools
import math
import random
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from operator import attrgetter
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
    # This gateway process's requests waiting to be placed, per adapter of the pool (this request
    # included): read-only, kept by the router as requests enter and leave its wait loop.
    waiting: Mapping[str, int] = field(default_factory=dict, hash=False)
    # How long this request has waited in the gateway so far (0 on arrival): its deadline is near when
    # this approaches the router's wait limit.
    waited_s: float = 0.0


class PlacementPolicy(Protocol):
    name: str
    # Whether the data path may skip the policy when the adapter is live and has room (the one-round-trip
    # hot path). Baselines set it False: they route without looking at residency.
    prefers_live: bool
    # Most runtime loads under way at once in a pool, fleet-wide (None: one per backend, no pool cap).
    pool_loads: int | None

    def target(self, slots: int) -> int:
        """Active adapters it aims for on a backend with `slots` GPU slots (what `touch` admits)."""
        ...

    def decide(self, request: Request, backends: Sequence[BackendState]) -> Decision: ...


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


def _pool_full(backends: Sequence[BackendState], cap: int | None) -> bool:
    """Whether `cap` loads are under way in the pool already (None: no cap)."""
    return cap is not None and sum(len(b.loading) for b in backends) >= cap


def _load_or_evict(request: Request, b: BackendState, pool_full: bool = False) -> Decision | None:
    """How this backend could take the adapter, if at all. One load at a time per backend: vLLM runs a
    runtime load inside its engine loop and decodes nothing meanwhile, so loads sent together only
    queue there and stop its batch back to back (bench/PLACEMENT.md); none while the pool is at its cap
    (`pool_full`: two replicas of one GPU loading at once take 2.0-2.9 s a load instead of 0.1-0.3 s)."""
    if pool_full or b.loading or request.adapter in b.evicting:
        return None
    at_cap = request.tenant_cap is not None and b.tenant_count(request.tenant) >= request.tenant_cap
    if b.occupied < b.capacity and not at_cap:
        return Decision(Action.LOAD, b.id)
    victim = _victim(request, b)
    return Decision(Action.LOAD, b.id, victim) if victim is not None else None


class _Whereabouts:
    """What draining asks of every backend, gathered once per decision."""

    __slots__ = ("engaged", "homed")

    def __init__(self, backends: Sequence[BackendState]) -> None:
        self.engaged: set[str] = set()  # active or loading somewhere
        self.homed: set[str] = set()  # registered somewhere
        for b in backends:
            self.engaged.update(b.inflight, b.loading)
            self.homed.update(b.registered)


class LruPolicy:
    """Keeps each backend near its target T of open adapters and its batches full, and never thrashes.
    C is a backend's batch size (`seats`, vLLM's --max-num-seqs; unknown: no seat rule); T is
    `target(slots)`: 4 of 8 GPU slots by default, never fewer than 4 (bench/PLACEMENT.md: up to 4 active
    adapters cost ~2% of throughput, each one more ~4.5%, all 8 cost 19%); "room" on a backend is fewer
    than C requests in flight and fewer than T slots taken (active adapters plus loads under way):
    1. active on a backend with fewer than C requests: USE it there (the backend with the fewest), unless
       it drains there (below);
    2. registered, idle, on a backend with room: USE it there (activating a registered adapter is free);
    3. being loaded anywhere: WAIT for that load (single flight, fleet-wide);
    4. registered somewhere but active nowhere: WAIT for room at one of its holders ("home") rather than
       load a copy elsewhere (a load stops a backend's decoding for ~90 ms; room frees within a request);
    5. LOAD on a backend with room: free capacity first, else evicting the least recently used idle
       adapter (globally oldest first; pins and the tenant's cap honoured), then the fewest requests.
       This is also how an adapter whose holders' batches are all full gets a second copy;
    6. else WAIT in the gateway: a request is never queued inside a full backend nor adds an adapter
       beyond T, so it goes to whichever backend has room first ("late binding").
    Draining: under a backlog the T slots would stay with the adapters that hold them (new requests keep
    arriving for them), while colder adapters with larger backlogs wait for a slot that rarely frees.
    Per backend, the largest groups waiting in this gateway (`Request.waiting`, at least `drain_min`
    requests, active nowhere and able to take a slot there) first take its free slots below T; each
    further one displaces the weakest active adapter (fewest requests in flight plus waiting) if it is at
    least `drain_ratio` x larger: one drains for one claimer, never a whole backend for one group. A
    draining adapter takes no new requests there; its last ones run out and its slot goes back.
    Handover: the claimer need not wait for that. Every drained adapter lets one claimer in at once in a
    slot above T, up to `ceiling(slots)` = T + `handover` (at most the GPU slots), so the seats a draining
    adapter leaves are refilled as they free; while more than T slots are taken and a claimer waits, the
    weakest adapters beyond T drain too, which brings the backend back to T.
    A request that has waited its patience out (`overfill`) ignores C, T and draining (and GPU slots), so
    none starves: it goes to a holder (the fewest requests), else loads wherever capacity or a victim allows.
    Steps 1 and 2 are `BackendSlots.has_room`, the residency store's `touch` (`prefers_live`); the router
    calls `touch` only while nothing waits in it, so draining applies whenever it can matter (with nothing
    waiting, nothing drains and no slot above T is used: `decide` and `touch` agree)."""

    name = "lru"
    prefers_live = True
    pool_loads: int | None = None

    def __init__(
        self,
        target_share: float = 1 / 2,
        target_floor: int = 4,
        handover: int = 2,
        drain_ratio: float = 2.0,
        drain_min: int = 8,
    ) -> None:
        self.target_share = target_share
        self.target_floor = target_floor
        self.handover = handover
        self.drain_ratio = drain_ratio
        self.drain_min = drain_min

    def target(self, slots: int) -> int:
        return max(1, min(slots, max(self.target_floor, math.ceil(slots * self.target_share))))

    def ceiling(self, slots: int) -> int:
        """Slots a backend may have taken while drained adapters hand theirs over."""
        return min(slots, self.target(slots) + self.handover)

    def _seat(self, request: Request, b: BackendState) -> bool:
        return request.overfill or b.seats is None or b.requests < b.seats

    def _groups(self, request: Request) -> list[tuple[str, int]]:
        """This gateway's waiting groups large enough to claim a slot, largest first."""
        if request.overfill:
            return []
        big = [(w, n) for w, n in request.waiting.items() if n >= self.drain_min]
        big.sort(key=lambda g: -g[1])
        return big

    def _strength(self, a: str, b: BackendState, request: Request) -> int:
        return b.inflight.get(a, 0) + request.waiting.get(a, 0)

    def _drained(
        self,
        request: Request,
        b: BackendState,
        fleet: _Whereabouts,
        groups: list[tuple[str, int]],
    ) -> list[str]:
        """The adapters active on b that take no new requests there (see the class's "Draining")."""
        if not groups or not b.inflight:
            return []
        t, taken = self.target(b.slots), b.slots_taken
        claimers: list[int] = []
        for w, n in groups:
            if len(claimers) >= len(b.inflight) + t:
                break
            if self._could_take(w, b, fleet):
                claimers.append(n)
        del claimers[: max(t - taken, 0)]  # the largest take the free slots below T
        if not claimers:
            return []
        active = sorted(b.inflight, key=lambda a: (self._strength(a, b, request), a))
        excess = max(taken - t, 0)
        drained = active[:excess]  # handovers went above T: the weakest give their slots back
        for n, a in zip(claimers, active[excess:], strict=False):
            if n < max(self.drain_min, self.drain_ratio * self._strength(a, b, request)):
                break
            drained.append(a)
        return drained

    def _room(
        self,
        request: Request,
        b: BackendState,
        fleet: _Whereabouts,
        groups: list[tuple[str, int]],
        drained: Callable[[BackendState], list[str]],
    ) -> bool:
        """Whether the adapter, active nowhere on b, may take a slot there now."""
        if request.overfill:
            return True
        if not self._seat(request, b) or b.slots_taken >= self.ceiling(b.slots):
            return False
        t = self.target(b.slots)
        free = t - b.slots_taken
        if free <= 0 and groups:
            free += len(drained(b))  # handover: each drained adapter frees a slot above T at once
        if free <= 0:
            return False
        # Left to larger groups if they would take every such slot.
        bar = max(self.drain_min, self.drain_ratio * request.waiting.get(request.adapter, 0))
        larger = 0
        for w, n in groups:
            if n < bar:
                break
            if w != request.adapter and self._could_take(w, b, fleet):
                larger += 1
                if larger >= free:
                    return False
        return True

    @staticmethod
    def _could_take(w: str, b: BackendState, fleet: _Whereabouts) -> bool:
        """Whether adapter w, were a slot to free on b, would take it: active and loading nowhere, and
        registered on b, or registered nowhere while b could load it (free capacity or an idle adapter)."""
        if w in fleet.engaged:
            return False
        if w in b.registered:
            return True
        if w in fleet.homed:
            return False  # it waits at home, elsewhere
        return b.occupied < b.capacity or any(x not in b.inflight for x in b.registered)

    def decide(self, request: Request, backends: Sequence[BackendState]) -> Decision:
        a = request.adapter
        groups = self._groups(request)
        fleet = _Whereabouts(backends if groups else ())
        plans: dict[str, list[str]] = {}

        def drained(b: BackendState) -> list[str]:
            if b.id not in plans:
                plans[b.id] = self._drained(request, b, fleet, groups)
            return plans[b.id]

        live = [b for b in backends if a in b.inflight]
        seated = [b for b in live if self._seat(request, b)]
        if seated:
            kept = [b for b in seated if a not in drained(b)]
            # Draining everywhere it has a seat: WAIT, its slots go to larger groups (no copy elsewhere).
            return Decision(Action.USE, min(kept, key=attrgetter("requests")).id) if kept else WAIT
        room = [b for b in backends if self._room(request, b, fleet, groups, drained)]
        idle = [b for b in room if a in b.registered]
        if idle:
            return Decision(Action.USE, min(idle, key=attrgetter("requests")).id)
        if any(a in b.loading for b in backends):
            return WAIT  # single flight: a load of it is under way; never start a second copy meanwhile
        if not live and any(a in b.registered for b in backends):
            return WAIT  # at home: room frees there within a request's time
        options: list[tuple[tuple[int, float, int], Decision]] = []
        full = _pool_full(backends, self.pool_loads)
        for b in room:
            d = _load_or_evict(request, b, full)
            if d is None:
                continue
            # No eviction beats eviction; among evictions the globally least recently used victim goes.
            age = b.registered[d.evict] if d.evict else float("-inf")
            options.append(((1 if d.evict else 0, age, b.requests), d))
        if options:
            return min(options, key=lambda o: o[0])[1]
        return WAIT


def _least(options: Sequence[BackendState], key: Callable[[BackendState], tuple[int, ...]]) -> str:
    return min(options, key=key).id


class PackPolicy:
    """Keeps each adapter's requests together where it is active and lets vLLM's own scheduler share
    the GPU slots, holding nothing in the gateway that a backend could start on. vLLM runs at most
    --max-loras (S) distinct adapters per step and keeps the others' requests queued inside it, first
    come first served, until a slot frees: so a request sent to a backend whose slots are all busy loses
    nothing it would not lose waiting in the gateway, while a request held in the gateway leaves a seat
    empty that it could fill (bench/PLACEMENT.md). C is a backend's seats (--max-num-seqs); "active" are
    adapters with requests in flight there, queued in vLLM or running:
    1. active on a backend with a free seat: USE it there (the fewest requests);
    2. registered, idle, on a backend with a free seat and a free slot: USE it there (fewest active);
    3. being loaded anywhere: WAIT for that load (single flight: a copy is never loaded twice at once);
       a load waits too while its backend loads another adapter or the pool is at `pool_loads`;
    4. LOAD on a backend with a free seat and a free slot (free capacity first, else evicting the least
       recently used idle adapter, pins and the tenant's cap honoured; then the fewest active): a second
       copy of an adapter whose holders' seats are all taken also comes from here;
    5. no seat with a free slot anywhere: queue it in vLLM where it is served soonest: where it is
       active (the fewest requests: it joins its running group as seats free) unless another backend
       has at least C fewer requests (then its copy there, or a second copy loaded there), else at a
       holder (the fewest active), else loaded on the backend with the fewest active adapters;
    6. WAIT only when no backend can hold it at all (every registered adapter busy or pinned).
    Fair share: on a backend whose slots are all active, one tenant's adapters may take at most
    `tenant_share` of the slots; a further cold adapter of that tenant waits in the gateway for a slot
    to free (or goes to another backend) instead of queueing in vLLM ahead of other tenants' adapters,
    so one tenant's burst of cold adapters cannot take every slot. A request that has waited
    `urgent_after_s` (`Request.waited_s`; 5 s by default) is exempt: the hold reorders who gets the
    next slot, it never keeps a request near its deadline (a longer hold, 20 s, cost ~2 s of p99 in
    bench/placement.py and bought no fairness a shorter one does not).
    Nothing depends on waiting counts, so `decide` and the store's `touch` (steps 1 and 2, with T = S)
    agree and the hot path stays one round trip."""

    name = "pack"
    prefers_live = True
    pool_loads: int | None = None

    def __init__(self, tenant_share: float = 1 / 2, urgent_after_s: float = 5.0) -> None:
        self.tenant_share = tenant_share
        self.urgent_after_s = urgent_after_s

    def target(self, slots: int) -> int:
        return slots

    @staticmethod
    def _seat(b: BackendState) -> bool:
        return b.seats is None or b.requests < b.seats

    def _fair(self, request: Request, b: BackendState) -> bool:
        """Whether one more adapter of this tenant may queue for a slot on b."""
        if b.slots_taken < b.slots or request.waited_s >= self.urgent_after_s:
            return True
        share = max(1, math.floor(b.slots * self.tenant_share))
        mine = sum(1 for x in b.inflight if b.tenants.get(x) == request.tenant)
        return mine < share

    def decide(self, request: Request, backends: Sequence[BackendState]) -> Decision:
        a = request.adapter
        live = [b for b in backends if a in b.inflight]
        seated = [b for b in live if self._seat(b)]
        if seated:
            return Decision(Action.USE, _least(seated, lambda b: (b.requests,)))
        free = [b for b in backends if self._seat(b) and b.slots_taken < b.slots]
        idle = [b for b in free if a in b.registered]
        if idle:
            return Decision(Action.USE, _least(idle, lambda b: (b.slots_taken, b.requests)))
        if any(a in b.loading for b in backends):
            return WAIT
        full = _pool_full(backends, self.pool_loads)
        load = self._load(request, free, full)
        if load is not None:
            return load
        if live:
            home = min(live, key=attrgetter("requests"))
            spill = self._spill(request, home, [b for b in backends if b not in live], full)
            return spill or Decision(Action.USE, home.id)
        holders = [
            b for b in backends if a in b.registered and a not in b.evicting and self._fair(request, b)
        ]
        if holders:
            return Decision(Action.USE, _least(holders, lambda b: (b.slots_taken, b.requests)))
        return self._load(request, [b for b in backends if self._fair(request, b)], full) or WAIT

    def _spill(
        self, request: Request, home: BackendState, others: Sequence[BackendState], full: bool
    ) -> Decision | None:
        """Step 5's exception: a backend with a whole batch (C) fewer requests than the adapter's
        least busy holder serves it sooner, even through a slot it must wait for there: the holder is
        seat-bound, the other slot-bound (measured on the H200 at 80% open-loop load: one replica
        running 61 of 64 with 323 queued, the other 36 with 68). Its copy there, or a second one."""
        if home.seats is None:
            return None
        near = [b for b in others if b.requests + home.seats <= home.requests and self._fair(request, b)]
        copies = [b for b in near if request.adapter in b.registered and request.adapter not in b.evicting]
        if copies:
            return Decision(Action.USE, _least(copies, lambda b: (b.requests,)))
        return self._load(request, near, full)

    @staticmethod
    def _load(request: Request, options: Sequence[BackendState], full: bool) -> Decision | None:
        best: tuple[tuple[int, float, int, int], Decision] | None = None
        for b in options:
            d = _load_or_evict(request, b, full)
            if d is None:
                continue
            age = b.registered[d.evict] if d.evict else float("-inf")
            key = (1 if d.evict else 0, age, b.slots_taken, b.requests)
            if best is None or key < best[0]:
                best = (key, d)
        return None if best is None else best[1]


class AffinityPolicy:
    """Baseline: each adapter has a home backend (a stable hash of its name); its requests go there,
    loading it (evicting the least recently used idle adapter) if needed, and spill to the next backend
    in the ring whose seats are not all taken when home's are. Nothing is held for a slot: what a user
    running a hash-routing proxy in front of vLLM gets."""

    name = "affinity"
    prefers_live = False
    pool_loads: int | None = None

    def target(self, slots: int) -> int:
        return slots

    def decide(self, request: Request, backends: Sequence[BackendState]) -> Decision:
        if not backends:
            return WAIT
        ring = sorted(backends, key=attrgetter("id"))
        home = zlib.crc32(request.adapter.encode()) % len(ring)
        order = ring[home:] + ring[:home]
        open_ = [b for b in order if b.seats is None or b.requests < b.seats]
        full = _pool_full(backends, self.pool_loads)
        for b in open_ + [b for b in order if b not in open_]:
            if request.adapter in b.registered and request.adapter not in b.evicting:
                return Decision(Action.USE, b.id)
            if request.adapter in b.loading:
                return WAIT
            if full or b.loading:
                return WAIT  # it waits for its load turn there: a spill is for a full backend, not a busy one
            d = _load_or_evict(request, b, full)
            if d is not None:
                return d
        return WAIT


class RoundRobinPolicy:
    """Baseline: the next backend in turn, loading (and evicting LRU) there whatever lives elsewhere."""

    name = "round-robin"
    prefers_live = False
    pool_loads: int | None = None

    def __init__(self) -> None:
        self._turn = itertools.count()

    def target(self, slots: int) -> int:
        return slots

    def _pick(self, backends: Sequence[BackendState]) -> int:
        return next(self._turn) % len(backends)

    def decide(self, request: Request, backends: Sequence[BackendState]) -> Decision:
        if not backends:
            return WAIT
        start = self._pick(backends)
        full = _pool_full(backends, self.pool_loads)
        for i in range(len(backends)):
            b = backends[(start + i) % len(backends)]
            if request.adapter in b.registered:
                return Decision(Action.USE, b.id)
            d = _load_or_evict(request, b, full)
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
    PACK = "pack"
    LRU = "lru"
    AFFINITY = "affinity"
    ROUND_ROBIN = "round-robin"
    RANDOM = "random"


def make_policy(name: PolicyName | str, *, pool_loads: int | None = None) -> PlacementPolicy:
    policy: PlacementPolicy
    match PolicyName(name):
        case PolicyName.PACK:
            policy = PackPolicy()
        case PolicyName.AFFINITY:
            policy = AffinityPolicy()
        case PolicyName.LRU:
            policy = LruPolicy()
        case PolicyName.ROUND_ROBIN:
            policy = RoundRobinPolicy()
        case PolicyName.RANDOM:
            policy = RandomPolicy()
    policy.pool_loads = pool_loads
    return policy
