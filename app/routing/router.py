"""Puts each request on a backend: the adapter live there (one residency round trip when it is), or
loaded there now, evicting the least recently used idle adapter if the backend is full. Loads are
single-flight across every gateway sharing the residency store: one caller reserves, the others wait
for it to register the adapter."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import logging
import time
import uuid
from collections import Counter, OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from redis.exceptions import RedisError

from app.backends.vllm import BackendUnavailable, VllmClient
from app.errors import RateLimited, ServiceUnavailable
from app.metrics import Metrics
from app.outages import OUTAGES
from app.registry.snapshots import AdapterView, BackendView
from app.residency.state import BackendSlots, BackendState, Outcome, ResidencyStore
from app.routing.policy import Action, Decision, PlacementPolicy, Request
from app.store.files import CONFIG_NAME, WEIGHTS_NAME

log = logging.getLogger(__name__)

_KNOWN_MAX = 10_000  # (pool, adapter) pairs remembered for GATEWAY_REDIS_OUTAGE=warm
_KNOWN_BACKENDS = 4  # backends remembered per pair


@dataclass(slots=True)
class Lease:
    """A request's hold on an adapter on a backend; released when the response ends."""

    pool: str
    backend: BackendView
    adapter: str | None  # served name; None for a base-model request (nothing to hold)
    id: str
    released: bool = False
    local: bool = False  # placed from this process's memory while Redis was down: nothing to release there


@dataclass(slots=True, eq=False)
class _Waiter:
    """A request told to wait: the pool's dispatcher answers `turn` with the decision that lets it go."""

    request: Request
    slots: list[BackendSlots]
    started: float
    turn: asyncio.Future[Decision]


@dataclass(slots=True, eq=False)
class _Queue:
    """One pool's waiting requests, oldest first, and the task that decides for them."""

    waiters: deque[_Waiter] = field(default_factory=deque)
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None


# A backend list as handed out by the registry cache, by id, and as the residency store sees it.
_Fleet = tuple[tuple[BackendView, ...], dict[str, BackendView], list[BackendSlots]]


class Router:
    def __init__(
        self,
        *,
        store: ResidencyStore,
        policy: PlacementPolicy,
        client: VllmClient,
        adapter_root: str,
        local_store: Path | None = None,
        wait_timeout_s: float = 30.0,
        patience_s: float = 30.0,
        tick_s: float = 0.05,
        load_timeout_s: float | None = None,
        max_waiters: int = 1024,
        tenant_share: float = 0.5,
        redis_outage: str = "closed",
        metrics: Metrics | None = None,
    ) -> None:
        self.store = store
        self.metrics = metrics if metrics is not None else Metrics()
        self.policy = policy
        self.client = client
        self._adapter_root = PurePosixPath(adapter_root)
        # Where this process sees the same files, when it does: checked before any load, because a
        # vLLM server asked to load a folder that is not there can take its engine down with it.
        self._local_store = local_store
        self.wait_timeout_s = wait_timeout_s
        self.patience_s = patience_s
        # Requests of one pool waiting in this process at once, and the share of them one tenant may
        # hold: beyond either, a request is answered at once (503 / 429) instead of holding its body
        # and a connection for the whole wait.
        self.max_waiters = max_waiters
        self.tenant_waiters = max(1, int(max_waiters * tenant_share))
        # An unload + load ends within this, well inside the load lock's TTL: a lock that expired while
        # its load was still running would let a second gateway load the same adapter there.
        self.load_timeout_s = load_timeout_s if load_timeout_s is not None else 0.75 * store.lock_ttl_s
        if self.load_timeout_s >= store.lock_ttl_s:
            raise ValueError("the load timeout must be shorter than the load lock's TTL")
        self._rr = itertools.count()
        self.unhealthy: set[str] = set()  # backend ids failing health checks: skipped until they recover
        self._fleets: dict[int, _Fleet] = {}
        # This process's requests told to wait, still in the placement loop: pool -> adapter -> count, no
        # zero entries (so bounded by the requests waiting). The policy reads it (Request.waiting), with the
        # other replicas' counts when the store is shared, to drain adapters that hold slots while larger
        # groups wait.
        self._waiting: dict[str, Counter[str]] = {}
        # Waiting requests are not polled one by one: per pool, one dispatcher takes one snapshot and asks
        # the policy for every waiter, oldest first, whenever this process releases a lease or finishes a
        # load there, and every `tick_s` (for what other replicas change).
        self._queues: dict[str, _Queue] = {}
        self._pool_names: dict[str, str] = {}  # pool -> its base model's name (the metrics' label)
        self.tick_s = tick_s
        # With a shared store each process publishes its waiters and reads the others' (every tick while
        # anything waits anywhere, else every `idle_tick_s`), so that draining is fleet-wide: the policy
        # sees the sums, and no process feeds an adapter through `touch` that another one drains.
        self.replica = uuid.uuid4().hex
        self._others: dict[str, Counter[str]] = {}  # pool -> what the other processes wait for
        self._read_at: dict[str, float] = {}  # pool -> when the others' counts were last read
        self.idle_tick_s = 0.25
        self.store_outage = OUTAGES.redis  # one log line per outage, not per tick (shared by the process)
        self.waiting_ttl_s = 2.0
        # Called when a backend misbehaves (404 for a loaded adapter, refused connection): the
        # reconciler sets it, to check that backend at once rather than at its next round.
        self.on_trouble: Callable[[BackendView], None] | None = None
        # This process's leases, renewed in one batch per pool every third of the store's lease TTL:
        # a stream of any length keeps its lease, a killed process's leases expire after one TTL.
        # Bounded by the requests in flight (a lease leaves when its response ends).
        self._held: dict[str, Lease] = {}
        self.heartbeat_s = store.lease_ttl_s / 3
        self._heartbeat: asyncio.Task[None] | None = None
        # GATEWAY_REDIS_OUTAGE: "closed" (503 while the shared store is down) or "warm": adapters this
        # process recently placed keep going to the backends it placed them on, without the store (no
        # loads, no evictions, no fleet-wide counts meanwhile); anything else gets the 503. Bounded:
        # the most recently used (pool, adapter) pairs, a few backends each.
        if redis_outage not in ("closed", "warm"):
            raise ValueError(f"redis_outage must be 'closed' or 'warm', not {redis_outage!r}")
        self.redis_outage = redis_outage
        self._known: OrderedDict[tuple[str, str], dict[str, None]] = OrderedDict()

    def adapter_path(self, adapter: AdapterView) -> str:
        return str(self._adapter_root / adapter.storage_path)

    def _usable(self, backends: tuple[BackendView, ...], avoid: frozenset[str]) -> tuple[BackendView, ...]:
        # Unhealthy backends are avoided, not banned: if nothing else is left, trying them beats a 503
        # (a restarted backend answers before the next health check notices).
        if not self.unhealthy and not avoid:
            return backends
        healthy = tuple(b for b in backends if str(b.id) not in self.unhealthy and str(b.id) not in avoid)
        return healthy or backends

    def _fleet(self, backends: tuple[BackendView, ...]) -> tuple[dict[str, BackendView], list[BackendSlots]]:
        """The backends by id and as the residency store sees them: built once per backend list (the
        registry cache hands out the same tuple until it reloads)."""
        hit = self._fleets.get(id(backends))
        if hit is not None and hit[0] is backends:
            return hit[1], hit[2]
        by_id = {str(b.id): b for b in backends}
        slots = [
            BackendSlots(str(b.id), b.gpu_slots, b.capacity, b.max_num_seqs, self.policy.target(b.gpu_slots))
            for b in backends
        ]
        if len(self._fleets) >= 64:
            self._fleets.clear()
        self._fleets[id(backends)] = (backends, by_id, slots)  # holding the tuple keeps its id unique
        return by_id, slots

    def answered(self, backend: BackendView) -> None:
        """A backend served a request: whatever a health check said, it is up."""
        self.unhealthy.discard(str(backend.id))

    async def route(
        self,
        backends: tuple[BackendView, ...],
        adapter: AdapterView | None,
        *,
        pinned: frozenset[str] = frozenset(),
        tenant_cap: int | None = None,
        avoid: frozenset[str] = frozenset(),
        deadline: float | None = None,
        admission: asyncio.Future[None] | None = None,
    ) -> Lease:
        """A lease on a backend for the adapter. `deadline` (time.monotonic()) bounds the whole
        placement, a load included: a retry passes the first attempt's, so that all attempts together
        keep to one `wait_timeout_s`.

        `admission` is the request's admission under its tenant's limits, under way: the hot path's
        touch goes out beside it (one round trip's wait for both, not one after the other), and nothing
        is loaded or evicted before it is granted. Refused (it raises), the lease the touch took is given
        back at once."""
        if deadline is None:
            deadline = time.monotonic() + self.wait_timeout_s
        pool_ids = tuple(str(b.id) for b in backends)  # every backend of the pool: the pool's load cap
        backends = self._usable(backends, avoid)
        lease_id = uuid.uuid4().hex
        if adapter is None:
            if admission is not None:
                await admission
            return Lease("", backends[next(self._rr) % len(backends)], None, lease_id)
        pool, name = str(adapter.base_model.id), adapter.served_name
        by_id, slots = self._fleet(backends)
        hot: Lease | None = None
        try:
            if self.store.shared:
                self._watch(pool)
            # The hot path, while nothing waits: with waiters the policy must see them (draining).
            if self.policy.prefers_live and not self._waiting.get(pool) and not self._others.get(pool):
                got = await self.store.touch(pool, name, lease_id, slots)
                if got is not None:
                    hot = self._hold(Lease(pool, by_id[got], name, lease_id))
        except (RedisError, TimeoutError):
            hot = self._warm(pool, by_id, name, lease_id) if self.redis_outage == "warm" else None
            if hot is None:
                raise
        if admission is not None:
            try:
                await admission
            except BaseException:
                if hot is not None:
                    await asyncio.shield(self.release(hot))
                raise
        if hot is not None:
            if not hot.local:
                self.metrics.lookup(hit=True)  # a refused request was no use of the cache
            return hot
        try:
            return await self._place(
                pool, by_id, slots, adapter, lease_id, pinned, tenant_cap, pool_ids, deadline
            )
        except (RedisError, TimeoutError):
            lease = self._warm(pool, by_id, name, lease_id) if self.redis_outage == "warm" else None
            if lease is None:
                raise
            return lease

    def _warm(self, pool: str, by_id: dict[str, BackendView], name: str, lease_id: str) -> Lease | None:
        """The shared store is down: a backend this process last placed the adapter on, if any."""
        known = self._known.get((pool, name))
        if not known:
            return None
        usable = [b for b in known if b in by_id and b not in self.unhealthy] or [
            b for b in known if b in by_id
        ]
        if not usable:
            return None
        return Lease(pool, by_id[usable[next(self._rr) % len(usable)]], name, lease_id, local=True)

    async def _place(
        self,
        pool: str,
        by_id: dict[str, BackendView],
        slots: list[BackendSlots],
        adapter: AdapterView,
        lease_id: str,
        pinned: frozenset[str],
        tenant_cap: int | None,
        pool_ids: tuple[str, ...],
        deadline: float,
    ) -> Lease:
        name = adapter.served_name
        waiting = self._waiting.setdefault(pool, Counter())  # one per pool, kept: pools are few
        request = Request(name, str(adapter.tenant_id), pinned, tenant_cap, waiting=waiting)
        started = time.monotonic()
        queued = False  # admitted to the pool's queue once; a later turn that came to nothing re-queues
        refused: set[str] = set()  # backends that refused this request's load: never asked twice
        now = True  # decide on a fresh snapshot now; else wait for the dispatcher's word
        first = True  # the first decision: a USE there is a cache hit, anything else a miss
        others_load = False  # it was seen loading on a backend by another request (single flight)
        base_model = self._pool_names[pool] = adapter.base_model.name
        while True:
            # A backend that refused this request's load is out of its choice from then on, the
            # dispatcher's included: handed a turn there again, it would spin until its deadline.
            candidates = [s for s in slots if s.id not in refused]
            if not candidates:
                # Every backend refused the connection: a 503 now, not a spin (one attempt each).
                raise BackendUnavailable("no backend for this model is reachable; retry", never_reached=True)
            if now:
                if time.monotonic() > deadline:
                    raise self._waited_too_long(adapter.name)
                decision, loading = await self._decide(pool, request, self._healthy(candidates), started)
                others_load = others_load or loading
                if first:
                    first = False
                    self.metrics.lookup(hit=decision.action is Action.USE)
                if decision.action is Action.LOAD and self._has_waiters(pool):
                    # Loads are scarce (one at a time per backend): older waiters get them first, in
                    # the dispatcher's oldest-first pass, not a request that just arrived.
                    decision = await self._wait_turn(
                        pool, request, candidates, started, deadline, adapter.name, admit=not queued
                    )
                    queued = True
            else:
                decision = await self._wait_turn(
                    pool, request, candidates, started, deadline, adapter.name, admit=not queued
                )
                queued = True
            # Unless told otherwise below, someone else is loading it or every slot is busy: wait.
            now = False
            if decision.action is Action.USE and decision.backend is not None:
                if await self.store.acquire(pool, decision.backend, name, lease_id):
                    if others_load:
                        self.metrics.waited_for_load(base_model)
                    return self._hold(Lease(pool, by_id[decision.backend], name, lease_id))
                # Evicted or forgotten meanwhile: wait for the dispatcher's next word.
            elif decision.action is Action.LOAD and decision.backend is not None:
                backend = by_id[decision.backend]
                target = next(s for s in slots if s.id == decision.backend)
                r = await self.store.reserve(
                    pool,
                    target,
                    name,
                    request.tenant,
                    victim=decision.evict,
                    tenant_cap=tenant_cap,
                    pool_loads=self.policy.pool_loads,
                    pool_backends=pool_ids,
                )
                if r.outcome is Outcome.OK:
                    try:
                        loaded = await self._loaded(
                            pool, backend, adapter, decision.evict, r.token, lease_id, deadline
                        )
                    except BackendUnavailable as exc:
                        if not exc.never_reached or len(slots) == 1:
                            raise
                        await self.mark_down(backend)  # it refused the connection: place it elsewhere
                        refused.add(decision.backend)
                        loaded = False
                    if loaded:
                        return self._hold(Lease(pool, backend, name, lease_id))
                    now = True  # fenced out (our lock expired, someone else owns the load) or marked down
                elif r.outcome is Outcome.LIVE:
                    now = True  # loaded meanwhile: decide again, without waiting
                    others_load = True
                elif r.outcome is Outcome.BUSY:
                    others_load = True

    def _has_waiters(self, pool: str) -> bool:
        q = self._queues.get(pool)
        return q is not None and any(not w.turn.done() for w in q.waiters)

    def _healthy(self, slots: list[BackendSlots]) -> list[BackendSlots]:
        """A backend found down meanwhile drops out of the choice (unless it is the only one left)."""
        if not self.unhealthy:
            return slots
        return [s for s in slots if s.id not in self.unhealthy] or slots

    def _overfilled(self, request: Request, started: float, now: float) -> Request:
        """The request as the policy sees it after waiting since `started`: how long, and whether past
        its patience (then it may overfill)."""
        waited = now - started
        if waited <= 0.0:
            return request
        return dataclasses.replace(
            request, overfill=request.overfill or waited > self.patience_s, waited_s=waited
        )

    async def _decide(
        self, pool: str, request: Request, slots: list[BackendSlots], started: float
    ) -> tuple[Decision, bool]:
        """The policy's decision on a fresh snapshot, and whether the adapter is loading somewhere."""
        snapshot = await self.store.snapshot(pool, slots)
        if self._others.get(pool):
            request = dataclasses.replace(request, waiting=self._view(pool))
        loading = any(request.adapter in b.loading for b in snapshot)
        return self.policy.decide(self._overfilled(request, started, time.monotonic()), snapshot), loading

    def _view(self, pool: str) -> Counter[str]:
        """The waiting requests the policy counts: this process's, plus the others' as last read."""
        own = self._waiting.setdefault(pool, Counter())
        others = self._others.get(pool)
        if not others:
            return own
        merged = Counter(others)
        merged.update(own)
        return merged

    async def _wait_turn(
        self,
        pool: str,
        request: Request,
        slots: list[BackendSlots],
        started: float,
        deadline: float,
        shown: str,
        *,
        admit: bool = True,
    ) -> Decision:
        """Queue the request for its pool's dispatcher until it hands out a USE or LOAD; 503 at the
        deadline. A request joining the queue (`admit`) is refused at once when the pool's queue or its
        tenant's share of it is full."""
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise self._waited_too_long(shown)
        q = self._queue(pool)
        if admit:
            self._admit(q, request)
        waiter = _Waiter(request, slots, started, asyncio.get_running_loop().create_future())
        # Oldest first by arrival: one whose turn came to nothing (its acquire or reservation lost a race)
        # goes back where it was, not to the end.
        at = len(q.waiters)
        while at and q.waiters[at - 1].started > started:
            at -= 1
        q.waiters.insert(at, waiter)
        self._waiting[pool][request.adapter] += 1
        label = self._pool_names.get(pool, "")
        self.metrics.waiting(label, 1)
        if q.task is None or q.task.done():
            q.task = asyncio.create_task(self._dispatch(pool, q))
        elif self.store.shared:
            q.wake.set()  # publish it soon: other processes drain for it too
        try:
            return await asyncio.wait_for(waiter.turn, remaining)
        except TimeoutError:
            raise self._waited_too_long(shown) from None
        finally:
            self.metrics.waiting(label, -1)
            if not waiter.turn.done() or waiter.turn.cancelled():
                self._uncount(pool, request.adapter)  # left without a turn (timeout, disconnect)
                waiter.turn.cancel()

    def _admit(self, q: _Queue, request: Request) -> None:
        waiting = [w for w in q.waiters if not w.turn.done()]
        if sum(1 for w in waiting if w.request.tenant == request.tenant) >= self.tenant_waiters:
            raise RateLimited(
                f"too many of your requests are waiting for this model ({self.tenant_waiters}); "
                "retry shortly or send fewer at once",
                headers={"Retry-After": "2"},
            )
        if len(waiting) >= self.max_waiters:
            raise ServiceUnavailable(
                "too many requests are waiting for this model; retry shortly", headers={"Retry-After": "2"}
            )

    def _waited_too_long(self, shown: str) -> ServiceUnavailable:
        return ServiceUnavailable(
            f"no backend could take adapter '{shown}' within {self.wait_timeout_s:.0f} s; retry",
            headers={"Retry-After": "2"},
        )

    def _queue(self, pool: str) -> _Queue:
        q = self._queues.get(pool)
        if q is None:
            q = self._queues[pool] = _Queue()
        return q

    def _uncount(self, pool: str, adapter: str) -> None:
        waiting = self._waiting[pool]
        waiting[adapter] -= 1
        if waiting[adapter] <= 0:
            del waiting[adapter]

    def _kick(self, pool: str) -> None:
        """Something this process did may let waiters of the pool go: have its dispatcher look now."""
        q = self._queues.get(pool)
        if q is not None and q.waiters:
            q.wake.set()

    def _watch(self, pool: str) -> None:
        """Shared store: keep the pool's dispatcher running, to learn what other processes wait for."""
        q = self._queue(pool)
        if q.task is None or q.task.done():
            q.task = asyncio.create_task(self._dispatch(pool, q))

    async def _dispatch(self, pool: str, q: _Queue) -> None:
        """One pass per wake-up: one snapshot of every backend the waiters may use, then the policy for
        each waiter, oldest first, on that snapshot, updated with each turn handed out (so the next
        decision sees the seat or slot taken). A WAIT for an adapter holds for its other waiters in the
        pass (the policy is a function of the snapshot). Passes are spaced by at least twice the time the
        policy took in the last one, so a deep queue costs at most about a third of the process's time. With a shared
        store it also publishes this process's waiters and reads the others' each time, and runs on."""
        shared = self.store.shared
        while True:
            q.waiters = deque(w for w in q.waiters if not w.turn.done())
            if not q.waiters and not shared:
                return
            q.wake.clear()
            busy = 0.0
            if shared:
                await self._publish(pool)
            try:
                if q.waiters:
                    busy = await self._pass(pool, q)
            except Exception as exc:  # noqa: BLE001 - the store failed: each waiter gets it (503 upstream)
                for w in q.waiters:
                    if not w.turn.done():
                        self._uncount(pool, w.request.adapter)
                        w.turn.set_exception(exc)
                q.waiters.clear()
                if not shared:
                    return
            # Spaced by the time the policy took (not the store's round trips), so a slow store does
            # not also delay the turns that a release frees.
            gap = 2 * busy
            await asyncio.sleep(gap)
            tick = self.tick_s if q.waiters or self._others.get(pool) else self.idle_tick_s
            if not q.wake.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(q.wake.wait(), max(tick - gap, 0.0))

    async def _publish(self, pool: str) -> None:
        """Publish this process's waiters, read the others'. A failure is not the waiters' (their own
        snapshots will tell): the others' counts are kept until they are older than their ttl."""
        sent = dict(self._waiting.get(pool) or {})
        try:
            sums = await self.store.waiting(pool, self.replica, sent, self.waiting_ttl_s)
        except Exception as exc:  # noqa: BLE001 - logged; the counts age out below
            now = time.monotonic()
            if now - self._read_at.get(pool, now) > self.waiting_ttl_s:
                self._others.pop(pool, None)
            self.store_outage.failed(exc)
            return
        self.store_outage.recovered()
        self._read_at[pool] = time.monotonic()
        others = Counter({a: n - sent.get(a, 0) for a, n in sums.items() if n > sent.get(a, 0)})
        if others:
            self._others[pool] = others
        else:
            self._others.pop(pool, None)

    async def close(self) -> None:
        """Stop the dispatchers (at shutdown); other processes forget this one's waiters after their ttl."""
        tasks = [q.task for q in self._queues.values() if q.task is not None]
        if self._heartbeat is not None:
            tasks.append(self._heartbeat)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _pass(self, pool: str, q: _Queue) -> float:
        """Returns the seconds the policy took (the pass less its snapshot's round trip)."""
        waiters = list(q.waiters)  # those who came during the snapshot wait for the next pass
        union: dict[str, BackendSlots] = {}
        for w in waiters:
            for s in self._healthy(w.slots):
                union.setdefault(s.id, s)
        states = {b.id: b for b in await self.store.snapshot(pool, list(union.values()))}
        began = time.monotonic()
        view = self._view(pool)
        own = view is self._waiting[pool]
        # A WAIT holds for the same adapter, patience state and backends (waiters may see different
        # backends: a retry avoiding one, a backend down when it came).
        blocked: set[tuple[str, bool, tuple[str, ...]]] = set()
        for w in waiters:
            if w.turn.done():
                continue
            request = self._overfilled(w.request, w.started, began)
            usable = self._healthy(w.slots)
            key = (request.adapter, request.overfill, tuple(s.id for s in usable))
            if key in blocked:
                continue
            if not own:
                request = dataclasses.replace(request, waiting=view)
            mine: Sequence[BackendState] = [states[s.id] for s in usable if s.id in states]
            decision = self.policy.decide(request, mine)
            if decision.action is Action.WAIT or decision.backend not in states:
                blocked.add(key)
                continue
            _assume(states[decision.backend], decision, request)
            self._uncount(pool, w.request.adapter)
            if not own:
                view[request.adapter] -= 1
            w.turn.set_result(decision)
        return time.monotonic() - began

    async def _loaded(
        self,
        pool: str,
        backend: BackendView,
        adapter: AdapterView,
        victim: str | None,
        token: int,
        lease_id: str,
        deadline: float,
    ) -> bool:
        """Runs the load as its own task, so that the request leaving (its deadline, its client gone)
        never cuts a load short: the load ends by `load_timeout_s` and commits or aborts its reservation
        either way, and other requests waiting for the adapter get it. The request waits for it until
        its deadline; if it has left by then, the lease the load took for it is given back."""
        task = asyncio.ensure_future(self._load(pool, backend, adapter, victim, token, lease_id))
        task.add_done_callback(lambda _: self._kick(pool))  # a slot or a registration changed
        try:
            return await asyncio.wait_for(asyncio.shield(task), max(deadline - time.monotonic(), 0.0))
        except BaseException as exc:
            if task.done():
                if isinstance(exc, TimeoutError) and not task.cancelled():
                    return task.result()  # it ended just as the wait did (or raises what it raised)
                raise
            task.add_done_callback(lambda t: self._orphaned(t, pool, str(backend.id), adapter, lease_id))
            if isinstance(exc, TimeoutError):
                raise self._waited_too_long(adapter.name) from None
            raise

    def _orphaned(
        self, task: asyncio.Future[bool], pool: str, backend: str, adapter: AdapterView, lease_id: str
    ) -> None:
        """A load whose request left before it ended: the adapter stays registered, the lease goes."""
        if task.cancelled() or task.exception() is not None:
            return  # aborted and logged by _load
        if task.result():
            self.store.release_nowait(pool, backend, adapter.served_name, lease_id)

    async def _load(
        self,
        pool: str,
        backend: BackendView,
        adapter: AdapterView,
        victim: str | None,
        token: int,
        lease_id: str,
    ) -> bool:
        name = adapter.served_name
        until = time.monotonic() + self.load_timeout_s
        try:
            await self._check_files(adapter)
            if victim is not None:
                try:
                    await self.client.unload_adapter(
                        backend.url,
                        victim,
                        backend=backend.name,
                        token=backend.api_key,
                        timeout_s=until - time.monotonic(),
                    )
                    self.metrics.unloaded(backend.name, "evicted")
                    log.info("adapter evicted", extra={"adapter": victim, "backend": backend.name})
                finally:
                    await self.store.evicted(pool, str(backend.id), victim)
            began = time.monotonic()
            try:
                await self.client.load_adapter(
                    backend.url,
                    name,
                    self.adapter_path(adapter),
                    backend=backend.name,
                    token=backend.api_key,
                    timeout_s=max(until - time.monotonic(), 0.001),
                )
            except Exception:
                self.metrics.loaded(backend.name, None)
                raise
        except BaseException:
            await asyncio.shield(self.store.abort(pool, str(backend.id), name, token))
            raise
        took = time.monotonic() - began
        self.metrics.loaded(backend.name, took)
        log.info(
            "adapter loaded",
            extra={"adapter": name, "backend": backend.name, "load_s": round(took, 4), "evicted": victim},
        )
        return await self.store.commit(pool, str(backend.id), name, token, lease_id)

    def _hold(self, lease: Lease) -> Lease:
        self._held[lease.id] = lease
        if self.redis_outage == "warm" and lease.adapter is not None:
            key = (lease.pool, lease.adapter)
            where = self._known.get(key)
            if where is None:
                where = self._known[key] = {}
                if len(self._known) > _KNOWN_MAX:
                    self._known.popitem(last=False)
            else:
                self._known.move_to_end(key)
            where[str(lease.backend.id)] = None
            if len(where) > _KNOWN_BACKENDS:
                del where[next(iter(where))]
        if self._heartbeat is None or self._heartbeat.done():
            self._heartbeat = asyncio.create_task(self._renew_forever())
        return lease

    async def _renew_forever(self) -> None:
        """The heartbeat: while this process holds leases, renew them all every `heartbeat_s`."""
        while self._held:
            await asyncio.sleep(self.heartbeat_s)
            await self.renew()

    async def renew(self) -> None:
        by_pool: dict[str, list[tuple[str, str, str]]] = {}
        for lease in self._held.values():
            if lease.adapter is not None:
                by_pool.setdefault(lease.pool, []).append((str(lease.backend.id), lease.adapter, lease.id))
        for pool, leases in by_pool.items():
            try:
                await self.store.renew(pool, leases)
            except Exception as exc:  # noqa: BLE001 - the store is down: the next beat tries again
                self.store_outage.failed(exc)

    async def release(self, lease: Lease) -> None:
        if lease.released or lease.adapter is None:
            return
        lease.released = True
        if lease.local:
            return
        self._held.pop(lease.id, None)
        await self.store.release(lease.pool, str(lease.backend.id), lease.adapter, lease.id)
        self._kick(lease.pool)

    def release_nowait(self, lease: Lease) -> None:
        """The response is over: give the lease back without waiting for the store to confirm."""
        if lease.released or lease.adapter is None:
            return
        lease.released = True
        if lease.local:
            return
        self._held.pop(lease.id, None)
        self.store.release_nowait(lease.pool, str(lease.backend.id), lease.adapter, lease.id)
        self._kick(lease.pool)

    async def lost(self, lease: Lease) -> None:
        """The backend answered 404 for the adapter: it forgot it (restart, manual unload)."""
        if lease.adapter is None:
            return
        await self.release(lease)
        known = self._known.get((lease.pool, lease.adapter))
        if known is not None:
            known.pop(str(lease.backend.id), None)
        if lease.local:
            return  # the store is down: the reconciler repairs it once it answers
        await self.store.forget(lease.pool, str(lease.backend.id), lease.adapter)
        if self.on_trouble is not None:
            self.on_trouble(lease.backend)

    def suspect(self, backend: BackendView) -> None:
        """It failed a request (a 5xx): have the reconciler check its health now."""
        if self.on_trouble is not None:
            self.on_trouble(backend)

    async def mark_down(self, backend: BackendView) -> None:
        """No traffic from this process to it until it answers (a health check or a request). Only a
        flag: the fleet's state of it (what it holds, other gateways' leases there) stays, because one
        failed connection from one process proves nothing about the backend's adapters; reconciliation
        against its own /v1/models repairs that state once it answers (a restarted vLLM lists none)."""
        self.unhealthy.add(str(backend.id))
        if self.on_trouble is not None:
            self.on_trouble(backend)

    async def _check_files(self, adapter: AdapterView) -> None:
        """When this process sees the backends' adapter store, the adapter's files must be there
        before a backend is asked to load them: vLLM asked for a folder that is not there answers
        slowly at best, and the request would wait for nothing."""
        if self._local_store is None:
            return
        folder = self._local_store / adapter.storage_path
        if not await asyncio.to_thread(_complete, folder):
            log.error("adapter %s: its files are missing from the store (%s)", adapter.id, folder)
            raise ServiceUnavailable(
                f"adapter '{adapter.name}' cannot be served right now: its files are missing; "
                "the operator has been told",
                headers={"Retry-After": "60"},
            )


def _complete(folder: Path) -> bool:
    return (folder / CONFIG_NAME).is_file() and (folder / WEIGHTS_NAME).is_file()


def _assume(b: BackendState, decision: Decision, request: Request) -> None:
    """What a turn handed out will do to the backend, in the dispatcher's copy of the snapshot."""
    adapter = request.adapter
    if decision.action is Action.USE:
        b.inflight[adapter] = b.inflight.get(adapter, 0) + 1
        return
    if decision.evict is not None:
        b.registered.pop(decision.evict, None)
        b.tenants.pop(decision.evict, None)
        b.evicting.add(decision.evict)
    b.loading.add(adapter)
    b.tenants[adapter] = request.tenant  # counts against the tenant's cap for the rest of the pass
