"""Residency in Redis, shared by every gateway replica. Each operation is one Lua script, so it is
atomic on the server and costs one round trip; time comes from the server (TIME), so replicas with
skewed clocks agree on last use and expiry.

Every script declares every key it touches (KEYS, never a name built inside the script), so the
scripts are correct under Redis Cluster and under ACLs that restrict key patterns. The layout is fixed
per pool and backend, which is what makes that possible. Keys of a pool share the hash tag {pool}:
lgw:{pool}:fence (counter), :waiters (zset replica -> expiry ms) and :wait (hash 'replica adapter' ->
waiting requests) for the pool; and per backend lgw:{pool}:reg:<backend> (zset adapter -> last use ms),
:ten:<backend> (hash adapter -> tenant), :load:<backend> (zset adapter -> expiry ms) and :tok:<backend>
(hash adapter -> fencing token) for loads under way, :evict:<backend> (zset adapter -> expiry ms),
:gone:<backend> (zset adapter -> expiry ms: unloaded, so a listing taken before must not bring it
back), :lease:<backend> (zset 'adapter lease' -> expiry ms) and :inf:<backend> (hash adapter -> live
leases, kept equal to the lease zset's count by every script)."""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Mapping, Sequence
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import RedisError

from app.residency.memory import GONE_GRACE_S
from app.residency.state import BackendSlots, BackendState, Outcome, Reservation
from app.scriptcall import ScriptCall

log = logging.getLogger(__name__)

_RENEW_CHUNK = 1000  # leases per renewal call: one script run stays short for every other client

# The keys of one backend, in the order the scripts read them from KEYS.
_KINDS = ("reg", "ten", "load", "tok", "evict", "gone", "lease", "inf")


@functools.lru_cache(maxsize=256)
def _keys(prefix: str, backends: tuple[str, ...]) -> tuple[str, ...]:
    """KEYS for a script run on `backends` of the pool whose key prefix is `prefix`: the pool's own
    three, then eight per backend."""
    pool = (f"{prefix}fence", f"{prefix}waiters", f"{prefix}wait")
    return pool + tuple(f"{prefix}{kind}:{b}" for b in dict.fromkeys(backends) for kind in _KINDS)


_COMMON = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local FENCE, WAITERS, WAIT = KEYS[1], KEYS[2], KEYS[3]
local P = string.sub(FENCE, 1, #FENCE - 5)  -- the pool's prefix ('<P>fence')
local K = {}
for i = 4, #KEYS, 8 do
  K[string.sub(KEYS[i], #P + 5)] = {  -- '<P>reg:<backend>'
    reg = KEYS[i], ten = KEYS[i + 1], load = KEYS[i + 2], tok = KEYS[i + 3],
    evict = KEYS[i + 4], gone = KEYS[i + 5], lease = KEYS[i + 6], inf = KEYS[i + 7],
  }
end
-- The declared keys of backend b; a backend the caller did not declare is a bug, never a new key.
local function k(b)
  local kb = K[b]
  if not kb then error('undeclared backend ' .. tostring(b)) end
  return kb
end

-- Both lease keys live as long as their longest lease (and vanish with the last one).
local function extend(kb, ms)
  for _, key in ipairs({kb.lease, kb.inf}) do
    if redis.call('PTTL', key) < ms then redis.call('PEXPIRE', key, ms) end
  end
end

-- Drops backend b's expired leases (once per run: `now` does not move within one).
local pruned = {}
local function prune_leases(b)
  if pruned[b] then return end
  pruned[b] = true
  local kb = k(b)
  local dead = redis.call('ZRANGEBYSCORE', kb.lease, '-inf', now)
  if #dead == 0 then return end
  redis.call('ZREMRANGEBYSCORE', kb.lease, '-inf', now)
  for _, m in ipairs(dead) do
    local a = string.match(m, '^(%S+) ')
    if redis.call('HINCRBY', kb.inf, a, -1) <= 0 then redis.call('HDEL', kb.inf, a) end
  end
end

-- Adapters with requests in flight, and those requests, on backend b.
local function usage(b)
  prune_leases(b)
  local flat = redis.call('HGETALL', k(b).inf)
  local n, requests = 0, 0
  for j = 2, #flat, 2 do n = n + 1; requests = requests + tonumber(flat[j]) end
  return n, requests
end

local function inflight(b, a)
  prune_leases(b)
  return tonumber(redis.call('HGET', k(b).inf, a) or 0)
end

local function prune_busy(b)
  local kb = k(b)
  for _, a in ipairs(redis.call('ZRANGEBYSCORE', kb.load, '-inf', now)) do
    redis.call('ZREM', kb.load, a)
    redis.call('HDEL', kb.tok, a)
    if not redis.call('ZSCORE', kb.reg, a) then redis.call('HDEL', kb.ten, a) end
  end
  redis.call('ZREMRANGEBYSCORE', kb.evict, '-inf', now)
end

local function take_lease(b, a, lease, lease_ms)
  local kb = k(b)
  prune_leases(b)
  redis.call('ZADD', kb.reg, now, a)
  if redis.call('ZADD', kb.lease, now + lease_ms, a .. ' ' .. lease) == 1 then
    redis.call('HINCRBY', kb.inf, a, 1)
  end
  extend(kb, lease_ms)
end

local function drop_lease(b, a, lease)
  local kb = k(b)
  if redis.call('ZREM', kb.lease, a .. ' ' .. lease) == 1 then
    if redis.call('HINCRBY', kb.inf, a, -1) <= 0 then redis.call('HDEL', kb.inf, a) end
  end
end
"""

# The hot path's two calls, batched: every touch and release made by this process in one event-loop
# iteration (and while the previous batch was on its way) travels as one script call.
# ARGV: lease_ms, then one argument per operation, its fields separated by spaces (one argument, not
# several, because packing arguments is most of the client's cost):
#   'T adapter lease' then per backend ' id slots seats target' (0 for none): touch; result the backend
#     chosen, or ''
#   'R backend adapter lease': release; result 1
# Returns one result per operation, in order. Each operation is atomic (the whole batch is).
# Touch applies BackendSlots.has_room: a free seat (requests < seats), and the adapter active there
# already or the active adapters plus loads under way below min(target, slots); among the holders that
# qualify, those where it is active first, then the fewest requests, then the first given.
_HOT = (
    _COMMON
    + """
local lease_ms = tonumber(ARGV[1])

local function touch(f)
  local a, lease = f[2], f[3]
  local best, best_key = nil, nil
  for i = 4, #f, 4 do
    local b, slots, seats, target = f[i], tonumber(f[i + 1]), tonumber(f[i + 2]), tonumber(f[i + 3])
    if redis.call('ZSCORE', k(b).reg, a) then
      local mine = inflight(b, a)
      local active, requests = usage(b)
      local taken = active + redis.call('ZCOUNT', k(b).load, now, '+inf')
      local limit = slots
      if target > 0 and target < slots then limit = target end
      if (seats == 0 or requests < seats) and (mine > 0 or taken < limit) then
        local key = requests
        if mine == 0 then key = key + 1e12 end  -- where it is active already comes first
        if best == nil or key < best_key then best, best_key = b, key end
      end
    end
  end
  if best == nil then return '' end
  take_lease(best, a, lease, lease_ms)
  return best
end

local out = {}
for i = 2, #ARGV do
  local f = {}
  for word in string.gmatch(ARGV[i], '%S+') do f[#f + 1] = word end
  if f[1] == 'T' then
    out[#out + 1] = touch(f)
  else
    drop_lease(f[2], f[3], f[4])
    out[#out + 1] = 1
  end
end
return out
"""
)

# ARGV: backend, adapter, lease, lease_ms
_ACQUIRE = (
    _COMMON
    + """
local b, a = ARGV[1], ARGV[2]
if not redis.call('ZSCORE', k(b).reg, a) then return 0 end
take_lease(b, a, ARGV[3], tonumber(ARGV[4]))
return 1
"""
)

# ARGV: lease_ms, then 'backend adapter lease' per lease. Extends each lease that still exists (an
# expired or released one is not brought back); returns how many were extended.
_RENEW = (
    _COMMON
    + """
local lease_ms, n = tonumber(ARGV[1]), 0
for i = 2, #ARGV do
  local b, a, lease = string.match(ARGV[i], '^(%S+) (%S+) (%S+)$')
  if b then
    local kb = k(b)
    prune_leases(b)
    local member = a .. ' ' .. lease
    if redis.call('ZSCORE', kb.lease, member) then
      redis.call('ZADD', kb.lease, now + lease_ms, member)
      extend(kb, lease_ms)
      n = n + 1
    end
  end
end
return n
"""
)

# ARGV: backend ids. Returns per backend: {reg (flat adapter,score), ten (flat), loading, evicting, inflight (flat)}
_SNAPSHOT = (
    _COMMON
    + """
local out = {}
for i = 1, #ARGV do
  local b = ARGV[i]
  local kb = k(b)
  prune_busy(b)
  prune_leases(b)
  table.insert(out, {
    redis.call('ZRANGE', kb.reg, 0, -1, 'WITHSCORES'),
    redis.call('HGETALL', kb.ten),
    redis.call('ZRANGE', kb.load, 0, -1),
    redis.call('ZRANGE', kb.evict, 0, -1),
    redis.call('HGETALL', kb.inf),
  })
end
return out
"""
)

# ARGV: backend, adapter, tenant, victim ('' for none), capacity, tenant_cap (-1 for none), lock_ms,
# pool_loads (-1 for no cap), then the pool's other backend ids
_RESERVE = (
    _COMMON
    + """
local b, a, tenant, victim = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local capacity, cap, lock_ms = tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7])
local kb = k(b)
local reg, ten, load = kb.reg, kb.ten, kb.load
prune_busy(b)
if redis.call('ZSCORE', reg, a) then return {'live', 0} end
-- Its own load, or another one on this backend (one at a time: vLLM decodes nothing while it loads).
if redis.call('ZCARD', load) > 0 or redis.call('ZSCORE', kb.evict, a) then return {'busy', 0} end
local pool_cap = tonumber(ARGV[8])
if pool_cap >= 0 then
  local n = 0
  for i = 9, #ARGV do
    prune_busy(ARGV[i])
    n = n + redis.call('ZCARD', k(ARGV[i]).load)
  end
  if n >= pool_cap then return {'busy', 0} end
end
local victim_tenant = false
if victim ~= '' then
  if not redis.call('ZSCORE', reg, victim) or inflight(b, victim) > 0 then return {'full', 0} end
  victim_tenant = redis.call('HGET', ten, victim)
end
-- A swap (with a victim) never raises occupancy, so it is allowed even above capacity (a backend can
-- end up there when the state was lost and rebuilt from what the backend reports).
if victim == '' and redis.call('ZCARD', reg) + redis.call('ZCARD', load) >= capacity then return {'full', 0} end
if cap >= 0 then
  local held = 0
  local flat = redis.call('HGETALL', ten)
  for j = 2, #flat, 2 do if flat[j] == tenant then held = held + 1 end end
  if victim_tenant == tenant then held = held - 1 end
  if held >= cap then return {'tenant_cap', 0} end
end
if victim ~= '' then
  redis.call('ZREM', reg, victim)
  redis.call('HDEL', ten, victim)
  redis.call('ZADD', kb.evict, now + lock_ms, victim)
end
local token = redis.call('INCR', FENCE)
redis.call('ZADD', load, now + lock_ms, a)
redis.call('HSET', kb.tok, a, token)
redis.call('HSET', ten, a, tenant)
return {'ok', token}
"""
)

# ARGV: backend, adapter, token, lease, lease_ms
_COMMIT = (
    _COMMON
    + """
local b, a = ARGV[1], ARGV[2]
local kb = k(b)
prune_busy(b)
if redis.call('HGET', kb.tok, a) ~= ARGV[3] then return 0 end
redis.call('ZREM', kb.load, a)
redis.call('HDEL', kb.tok, a)
take_lease(b, a, ARGV[4], tonumber(ARGV[5]))
return 1
"""
)

# ARGV: backend, adapter, token
_ABORT = (
    _COMMON
    + """
local b, a = ARGV[1], ARGV[2]
local kb = k(b)
if redis.call('HGET', kb.tok, a) == ARGV[3] then
  redis.call('ZREM', kb.load, a)
  redis.call('HDEL', kb.tok, a)
  if not redis.call('ZSCORE', kb.reg, a) then redis.call('HDEL', kb.ten, a) end
end
return 1
"""
)

# ARGV: backend, adapter, grace_ms
_FORGET = (
    _COMMON
    + """
local b, a = ARGV[1], ARGV[2]
local kb = k(b)
redis.call('ZREM', kb.reg, a)
if not redis.call('ZSCORE', kb.load, a) then redis.call('HDEL', kb.ten, a) end
redis.call('ZADD', kb.gone, now + tonumber(ARGV[3]), a)
return 1
"""
)

# ARGV: backend, capacity, lock_ms, then the pinned adapters. Returns the adapters taken out.
_TRIM = (
    _COMMON
    + """
local b, capacity, lock_ms = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local kb = k(b)
local reg, load = kb.reg, kb.load
prune_busy(b)
local excess = redis.call('ZCARD', reg) + redis.call('ZCARD', load) - capacity
local out = {}
if excess <= 0 then return out end
local pinned = {}
for i = 4, #ARGV do pinned[ARGV[i]] = true end
for _, a in ipairs(redis.call('ZRANGE', reg, 0, -1)) do
  if #out >= excess then break end
  if not pinned[a] and inflight(b, a) == 0 and not redis.call('ZSCORE', load, a) then
    redis.call('ZREM', reg, a)
    redis.call('HDEL', kb.ten, a)
    redis.call('ZADD', kb.evict, now + lock_ms, a)
    table.insert(out, a)
  end
end
return out
"""
)

# ARGV: replica, ttl_ms, then adapter, count pairs. Replaces this replica's counts; returns the sums
# over live replicas as pairs. A replica that stops reporting drops out after its ttl.
_WAITING = (
    _COMMON
    + """
local replica, ttl = ARGV[1], tonumber(ARGV[2])
if #ARGV > 2 then
  redis.call('ZADD', WAITERS, now + ttl, replica)
else
  redis.call('ZREM', WAITERS, replica)
end
redis.call('ZREMRANGEBYSCORE', WAITERS, '-inf', now)
local live = {}
for _, r in ipairs(redis.call('ZRANGE', WAITERS, 0, -1)) do live[r] = true end
local sums, out = {}, {}
local flat = redis.call('HGETALL', WAIT)
for j = 1, #flat, 2 do
  local r, a = string.match(flat[j], '^(%S+) (%S+)$')
  if r == replica or not live[r] then
    redis.call('HDEL', WAIT, flat[j])
  else
    sums[a] = (sums[a] or 0) + tonumber(flat[j + 1])
  end
end
for i = 3, #ARGV, 2 do
  redis.call('HSET', WAIT, replica .. ' ' .. ARGV[i], ARGV[i + 1])
  sums[ARGV[i]] = (sums[ARGV[i]] or 0) + tonumber(ARGV[i + 1])
end
if #ARGV > 2 then
  for _, key in ipairs({WAITERS, WAIT}) do
    if redis.call('PTTL', key) < ttl then redis.call('PEXPIRE', key, ttl) end
  end
end
for a, n in pairs(sums) do table.insert(out, a); table.insert(out, n) end
return out
"""
)

# ARGV: backend, adapter, grace_ms
_EVICTED = (
    _COMMON
    + """
local b, a = ARGV[1], ARGV[2]
local kb = k(b)
redis.call('ZREM', kb.evict, a)
redis.call('ZADD', kb.gone, now + tonumber(ARGV[3]), a)
return 1
"""
)

# ARGV: backend, count of adapters known before the listing, those adapters, then the listing.
# Returns {added, removed}.
_RECONCILE = (
    _COMMON
    + """
local b = ARGV[1]
local kb = k(b)
prune_busy(b)
local reg, load, evict, gone = kb.reg, kb.load, kb.evict, kb.gone
redis.call('ZREMRANGEBYSCORE', gone, '-inf', now)
local n_known = tonumber(ARGV[2])
local known, actual = {}, {}
for i = 3, 2 + n_known do known[ARGV[i]] = true end
for i = 3 + n_known, #ARGV do actual[ARGV[i]] = true end
local function busy(a) return redis.call('ZSCORE', load, a) or redis.call('ZSCORE', evict, a) end
local added, removed = {}, {}
for _, a in ipairs(redis.call('ZRANGE', reg, 0, -1)) do
  if not actual[a] and known[a] and not busy(a) then
    redis.call('ZREM', reg, a); redis.call('HDEL', kb.ten, a); table.insert(removed, a)
  end
end
for a, _ in pairs(actual) do
  if not redis.call('ZSCORE', reg, a) and not busy(a) and not redis.call('ZSCORE', gone, a) then
    redis.call('ZADD', reg, now, a); table.insert(added, a)
  end
end
return {added, removed}
"""
)


def _s(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def _pairs(flat: list[Any]) -> list[tuple[str, str]]:
    return [(_s(flat[i]), _s(flat[i + 1])) for i in range(0, len(flat), 2)]


class _HotBatch:
    """Group commit for one pool's hot-path calls: operations queued while the loop runs (and while the
    previous batch is on its way) go out together as one `_HOT` call. Under load this is what keeps Redis
    to a few tens of microseconds of gateway CPU per request; an idle gateway sends each call at once.

    Each queued operation has a future for its caller, or none (a release nobody waits for). A touch
    whose caller was cancelled meanwhile still happens on the server: the lease it took is released in
    the next batch."""

    def __init__(self, script: ScriptCall, prefix: str, lease_ms: int) -> None:
        self.script, self.prefix, self.lease_ms = script, prefix, lease_ms
        self.ops: list[str] = []
        self.backends: dict[str, None] = {}  # the backends the queued operations name, for KEYS
        self.waiters: list[asyncio.Future[Any] | None] = []
        self.running = False

    def submit(self, op: str, backends: Sequence[str], *, wait: bool = True) -> asyncio.Future[Any] | None:
        """Queues an operation on `backends`; `wait=False` for one nobody waits for (a release at the end
        of a response)."""
        loop = asyncio.get_running_loop()
        fut = loop.create_future() if wait else None
        self.ops.append(op)
        for b in backends:
            self.backends[b] = None
        self.waiters.append(fut)
        if not self.running:
            self.running = True
            # The task's first step runs after the callbacks already ready in this loop iteration, so the
            # callers that run alongside this one queue their operations into the same batch.
            task = loop.create_task(self._drain())
            _BACKGROUND.add(task)
            task.add_done_callback(_BACKGROUND.discard)
        return fut

    async def _drain(self) -> None:
        waiters: list[asyncio.Future[Any] | None] = []
        try:
            while self.waiters:
                ops, waiters, backends = self.ops, self.waiters, tuple(self.backends)
                self.ops, self.waiters, self.backends = [], [], {}
                try:
                    keys = _keys(self.prefix, backends)
                    results = await self.script(keys=keys, args=[self.lease_ms, *ops])
                except (RedisError, OSError) as exc:  # every caller in the batch gets it (a 503 upstream)
                    if None in waiters:
                        log.warning("residency releases failed (%s); their leases expire", type(exc).__name__)
                    _fail(waiters, exc)
                    continue
                self._deliver(ops, waiters, results)
        except BaseException:
            # The drain itself died (a bug, shutdown): nobody may wait for an answer forever.
            _fail(waiters + self.waiters, RedisError("residency batch stopped"))
            self.ops, self.waiters, self.backends = [], [], {}
            raise
        finally:
            self.running = False

    def _deliver(self, ops: list[str], waiters: list[asyncio.Future[Any] | None], results: list[Any]) -> None:
        for op, w, r in zip(ops, waiters, results, strict=True):
            if w is None:
                continue
            if not w.cancelled():
                w.set_result(r)
            elif r and op.startswith("T "):  # the caller left: give back the lease taken for it
                _, adapter, lease = op.split(" ", 3)[:3]
                self.submit(f"R {_s(r)} {adapter} {lease}", (_s(r),), wait=False)


@functools.lru_cache(maxsize=64)
def _encode_backends(backends: tuple[BackendSlots, ...]) -> tuple[str, tuple[str, ...]]:
    """A touch's backend part and the backends' ids; the same few backend lists come back on every
    request."""
    return (
        "".join(f" {b.id} {b.slots} {b.seats or 0} {b.target or 0}" for b in backends),
        tuple(b.id for b in backends),
    )


def _fail(waiters: list[asyncio.Future[Any] | None], exc: BaseException) -> None:
    for w in waiters:
        if w is not None and not w.done():
            w.set_exception(exc)


_BACKGROUND: set[asyncio.Task[None]] = set()


class RedisResidency:
    shared = True  # every gateway replica of the deployment

    def __init__(
        self, redis: Redis, *, prefix: str = "lgw", lock_ttl_s: float = 60.0, lease_ttl_s: float = 30.0
    ) -> None:
        self.redis = redis
        self.prefix = prefix
        self.lock_ttl_s = lock_ttl_s
        self.lock_ms = int(lock_ttl_s * 1000)
        self.lease_ttl_s = lease_ttl_s
        self.lease_ms = int(lease_ttl_s * 1000)
        self._hot = ScriptCall(redis, _HOT)  # the hot path's calls, on connections of their own
        self._batches: dict[str, _HotBatch] = {}  # one per pool (base model)
        self._acquire = redis.register_script(_ACQUIRE)
        self._snapshot = redis.register_script(_SNAPSHOT)
        self._reserve = redis.register_script(_RESERVE)
        self._commit = redis.register_script(_COMMIT)
        self._abort = redis.register_script(_ABORT)
        self._forget = redis.register_script(_FORGET)
        self._reconcile = redis.register_script(_RECONCILE)
        self._evicted = redis.register_script(_EVICTED)
        self._trim = redis.register_script(_TRIM)
        self._waiting = redis.register_script(_WAITING)
        self._renew = redis.register_script(_RENEW)
        self.gone_ms = int(GONE_GRACE_S * 1000)

    def _key(self, pool: str) -> str:
        return f"{self.prefix}:{{{pool}}}:"

    def _on(self, pool: str, *backends: str) -> tuple[str, ...]:
        """KEYS for a script run on these backends of `pool`."""
        return _keys(self._key(pool), backends)

    def _batch(self, pool: str) -> _HotBatch:
        batch = self._batches.get(pool)
        if batch is None:
            batch = self._batches[pool] = _HotBatch(self._hot, self._key(pool), self.lease_ms)
        return batch

    async def touch(
        self, pool: str, adapter: str, lease: str, backends: Sequence[BackendSlots]
    ) -> str | None:
        encoded, ids = _encode_backends(tuple(backends))
        fut = self._batch(pool).submit(f"T {adapter} {lease}{encoded}", ids)
        assert fut is not None
        return _s(await fut) or None

    async def renew(self, pool: str, leases: Sequence[tuple[str, str, str]]) -> int:
        # Idempotent (it only pushes expiries forward), so a retried call does no harm.
        n = 0
        for i in range(0, len(leases), _RENEW_CHUNK):
            part = leases[i : i + _RENEW_CHUNK]
            keys = _keys(self._key(pool), tuple(b for b, _, _ in part))
            chunk = [f"{b} {a} {lease}" for b, a, lease in part]
            n += int(await self._renew(keys=keys, args=[self.lease_ms, *chunk]))
        return n

    async def acquire(self, pool: str, backend: str, adapter: str, lease: str) -> bool:
        return bool(
            await self._acquire(keys=self._on(pool, backend), args=[backend, adapter, lease, self.lease_ms])
        )

    async def release(self, pool: str, backend: str, adapter: str, lease: str) -> None:
        fut = self._batch(pool).submit(f"R {backend} {adapter} {lease}", (backend,))
        assert fut is not None
        await asyncio.shield(fut)

    def release_nowait(self, pool: str, backend: str, adapter: str, lease: str) -> None:
        self._batch(pool).submit(f"R {backend} {adapter} {lease}", (backend,), wait=False)

    async def snapshot(self, pool: str, backends: Sequence[BackendSlots]) -> list[BackendState]:
        ids = [b.id for b in backends]
        raw = await self._snapshot(keys=self._on(pool, *ids), args=ids)
        out = []
        for slots, (reg, ten, loading, evicting, infl) in zip(backends, raw, strict=True):
            out.append(
                BackendState(
                    id=slots.id,
                    slots=slots.slots,
                    capacity=slots.capacity,
                    seats=slots.seats,
                    registered={a: float(s) / 1000 for a, s in _pairs(reg)},
                    inflight={a: int(n) for a, n in _pairs(infl) if int(n) > 0},
                    tenants=dict(_pairs(ten)),
                    loading={_s(a) for a in loading},
                    evicting={_s(a) for a in evicting},
                )
            )
        return out

    async def reserve(
        self,
        pool: str,
        backend: BackendSlots,
        adapter: str,
        tenant: str,
        *,
        victim: str | None,
        tenant_cap: int | None,
        pool_loads: int | None = None,
        pool_backends: Sequence[str] = (),
    ) -> Reservation:
        others = [x for x in pool_backends if x != backend.id] if pool_loads is not None else []
        outcome, token = await self._reserve(
            keys=self._on(pool, backend.id, *others),
            args=[
                backend.id, adapter, tenant, victim or "", backend.capacity,
                -1 if tenant_cap is None else tenant_cap, self.lock_ms,
                -1 if pool_loads is None else pool_loads, *others,
            ],
        )  # fmt: skip
        return Reservation(Outcome(_s(outcome)), int(token))

    async def commit(self, pool: str, backend: str, adapter: str, token: int, lease: str) -> bool:
        args: list[str | int] = [backend, adapter, token, lease, self.lease_ms]
        return bool(await self._commit(keys=self._on(pool, backend), args=args))

    async def abort(self, pool: str, backend: str, adapter: str, token: int) -> None:
        await self._abort(keys=self._on(pool, backend), args=[backend, adapter, token])

    async def trim(self, pool: str, backend: BackendSlots, pinned: frozenset[str]) -> list[str]:
        args: list[str | int] = [backend.id, backend.capacity, self.lock_ms, *sorted(pinned)]
        return [_s(a) for a in await self._trim(keys=self._on(pool, backend.id), args=args)]

    async def evicted(self, pool: str, backend: str, adapter: str) -> None:
        await self._evicted(keys=self._on(pool, backend), args=[backend, adapter, self.gone_ms])

    async def forget(self, pool: str, backend: str, adapter: str) -> None:
        await self._forget(keys=self._on(pool, backend), args=[backend, adapter, self.gone_ms])

    async def reconcile(
        self, pool: str, backend: str, actual: set[str], known_before: set[str]
    ) -> tuple[set[str], set[str]]:
        args: list[str | int] = [backend, len(known_before), *sorted(known_before), *sorted(actual)]
        added, removed = await self._reconcile(keys=self._on(pool, backend), args=args)
        return {_s(a) for a in added}, {_s(a) for a in removed}

    async def waiting(
        self, pool: str, replica: str, counts: Mapping[str, int], ttl_s: float
    ) -> dict[str, int]:
        args: list[str | int] = [replica, max(1, int(ttl_s * 1000))]
        for a, n in counts.items():
            if n > 0:
                args += [a, n]
        flat = await self._waiting(keys=self._on(pool), args=args)
        return {_s(flat[i]): int(flat[i + 1]) for i in range(0, len(flat), 2)}

    async def drop_backend(self, pool: str, backend: str) -> None:
        await self.redis.delete(*_keys(self._key(pool), (backend,))[3:])

    async def close(self) -> None:
        """Closes the hot path's own connections (at shutdown, before the client)."""
        await self._hot.close()
