"""Limits in Redis, shared by every gateway replica: admission is one Lua script over all of a request's
scopes (all-or-nothing, so limit x replicas can never happen and concurrent requests cannot slip past),
settling is another; time comes from the server (TIME), so replicas with skewed clocks agree on windows.

Keys (declared in KEYS, one Redis Cluster slot per tenant through the hash tag {tenant}):
<prefix>lim:{tenant}:c:<scope> (hash: w = window index, rc / rp = requests in the current / previous
window, tc / tp = tokens) and <prefix>lim:{tenant}:f:<scope> (zset request id -> expiry ms: requests in
flight, for the concurrency limit). Both expire when unused: counters after two windows, the zset after
its newest lease."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import RedisError

from app.limits.state import WINDOW_S, Admission, Scope, tightest
from app.scriptcall import ScriptCall

_MAX_BATCHES = 10_000  # tenants with a batch object kept; idle ones are dropped beyond it
_MAX_TAILS = 64  # sets of scopes a tenant's batch keeps the operation tails of
_MAX_KEYS = 64  # a batch's KEYS start afresh beyond this, once it is idle
_BATCH_OPS = 256  # operations per script call
# The most a settlement waits for a call to ride on: its place is freed, its tokens given back this much
# later (a refusal at the very edge of a concurrency limit may come this much sooner than it need).
SETTLE_DELAY_S = 0.005

# Shared by both scripts: the window arithmetic of app.limits.state, in Lua.
_COMMON = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local W = tonumber(ARGV[1])
local win = math.floor(now / W)
local frac = (now - win * W) / W
local function load(h)
  local v = redis.call('HMGET', h, 'w', 'rc', 'rp', 'tc', 'tp')
  local w = tonumber(v[1]) or win
  local rc, rp = tonumber(v[2]) or 0, tonumber(v[3]) or 0
  local tc, tp = tonumber(v[4]) or 0, tonumber(v[5]) or 0
  if w < win then
    if w == win - 1 then rp, tp = rc, tc else rp, tp = 0, 0 end
    rc, tc = 0, 0
    w = win
  end
  return {w = w, rc = rc, rp = rp, tc = tc, tp = tp}
end
"""

# One tenant's admissions and settlements, in the order they were queued (group commit: see _Batch).
# KEYS: the counters hash and the in-flight zset of every scope the batch names (pairs). ARGV: window ms,
# lease ms, then one string per operation (space-separated: one argument to encode instead of ten):
#   "A rid tokens n (key-index rpm tpm conc) x n"   admit: rates/concurrency -1 when not limited
#   "G rid count tokens n (key-index rpm tpm -1) x n" grant: `count` requests and `tokens` at once, for a
#                                                   process to admit from locally (never with concurrency;
#                                                   a kind asked 0 of is not checked)
#   "S rid window delta n (key-index) x n"           settle: tokens back into their window, place freed
#   "U rid window requests tokens n (key-index) x n" unused: what a grant's holder gives back (negative)
# Returns one entry per operation: for A and G {ok, window, refused, retry ms, (rc rp tc tp) per scope,
# frac}, for S and U 1. An admission or grant changes nothing unless all of its scopes admit all of it.
_BATCH = (
    _COMMON
    + """
local lease = tonumber(ARGV[2])
local function wait_for(cur, before, need, limit)
  if need > limit then return -1 end
  if cur + before * (1 - frac) + need <= limit then return 0 end
  local left = (1 - frac) * W
  if cur + need <= limit and before > 0 then
    local f = 1 - (limit - need - cur) / before
    return math.max(0, (f - frac) * W)
  end
  if cur > 0 then return left + math.max(0, (1 - (limit - need) / cur) * W) end
  return left
end
local function save(h, s)
  redis.call('HSET', h, 'w', s.w, 'rc', s.rc, 'rp', s.rp, 'tc', s.tc, 'tp', s.tp)
  redis.call('PEXPIRE', h, 2 * W + 1000)
end
local out = {}
for a = 3, #ARGV do
  local f = {}
  for w in string.gmatch(ARGV[a], '%S+') do f[#f + 1] = w end
  local i = 1
  if f[1] == 'A' or f[1] == 'G' then
    local id, count, tokens, n = f[2], 1, tonumber(f[3]), tonumber(f[4])
    i = 5
    if f[1] == 'G' then count, tokens, n, i = tonumber(f[3]), tonumber(f[4]), tonumber(f[5]), 6 end
    local S, refused, retry = {}, '', 0
    -- A grant checks only the kinds it asks for (it may top up one and not the other).
    local check_requests, check_tokens = count > 0, f[1] == 'A' or tokens > 0
    for j = 1, n do
      local k, rpm, tpm, conc = tonumber(f[i]), tonumber(f[i + 1]), tonumber(f[i + 2]), tonumber(f[i + 3])
      i = i + 4
      local s = load(KEYS[k])
      S[j] = {s = s, k = k, conc = conc}
      if refused == '' and rpm >= 0 and check_requests then
        local w = wait_for(s.rc, s.rp, count, rpm)
        if w ~= 0 then refused, retry = 'requests', w end
      end
      if refused == '' and tpm >= 0 and check_tokens then
        local w = wait_for(s.tc, s.tp, tokens, tpm)
        if w < 0 then refused, retry = 'tokens_too_large', 0
        elseif w > 0 then refused, retry = 'tokens', w end
      end
      if refused == '' and conc >= 0 then
        local f = KEYS[k + 1]
        redis.call('ZREMRANGEBYSCORE', f, '-inf', now)
        if redis.call('ZCARD', f) >= conc then refused, retry = 'concurrency', 1000 end
      end
    end
    local r = {refused == '' and 1 or 0, win, refused, tostring(retry)}
    for j = 1, n do
      local e = S[j]
      local s = e.s
      if refused == '' then
        s.rc, s.tc = s.rc + count, s.tc + tokens
        save(KEYS[e.k], s)
        if e.conc >= 0 then
          redis.call('ZADD', KEYS[e.k + 1], now + lease, id)
          redis.call('PEXPIRE', KEYS[e.k + 1], lease + 1000)
        end
      end
      table.insert(r, tostring(s.rc)); table.insert(r, tostring(s.rp))
      table.insert(r, tostring(s.tc)); table.insert(r, tostring(s.tp))
    end
    table.insert(r, tostring(frac))
    table.insert(out, r)
  elseif f[1] == 'U' then
    local at, requests, tokens, n = tonumber(f[3]), tonumber(f[4]), tonumber(f[5]), tonumber(f[6])
    i = 7
    for j = 1, n do
      local h = KEYS[tonumber(f[i])]
      i = i + 1
      if redis.call('EXISTS', h) == 1 then
        local s = load(h)
        if s.w == at then s.rc, s.tc = math.max(0, s.rc + requests), math.max(0, s.tc + tokens)
        elseif s.w == at + 1 then s.rp, s.tp = math.max(0, s.rp + requests), math.max(0, s.tp + tokens) end
        save(h, s)
      end
    end
    table.insert(out, 1)
  else  -- 'S'
    local id, at, delta, n = f[2], tonumber(f[3]), tonumber(f[4]), tonumber(f[5])
    i = 6
    for j = 1, n do
      local k = tonumber(f[i])
      i = i + 1
      local h = KEYS[k]
      if delta ~= 0 and redis.call('EXISTS', h) == 1 then
        local s = load(h)
        if s.w == at then s.tc = math.max(0, s.tc + delta)
        elseif s.w == at + 1 then s.tp = math.max(0, s.tp + delta) end
        save(h, s)
      end
      redis.call('ZREM', KEYS[k + 1], id)
    end
    table.insert(out, 1)
  end
end
return out
"""
)

# KEYS: in-flight zsets; ARGV: lease ms, then one request id per key. Pushes the expiry of those held.
_RENEW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local lease = tonumber(ARGV[1])
for i = 1, #KEYS do
  if redis.call('ZADD', KEYS[i], 'XX', 'CH', now + lease, ARGV[i + 1]) > 0 then
    redis.call('PEXPIRE', KEYS[i], lease + 1000)
  end
end
return 1
"""


class _Tails:
    """One set of scopes' parts of its operation strings (the script's format, above), with its keys
    named by their places in the batch's KEYS."""

    __slots__ = ("admit", "scopes", "settle")

    def __init__(self, scopes: Sequence[Scope], admit: str, settle: str) -> None:
        self.scopes, self.admit, self.settle = scopes, admit, settle


class _Batch:
    """Group commit for one tenant's admissions and settlements (its keys share a Cluster slot): what is
    queued while the loop runs, and while the previous call is on its way, goes out as one script call,
    in the order it was queued (a settlement before the admissions after it, whichever key they use).
    KEYS is the batch's growing list of the tenant's keys, so each operation's string is made once, at
    submit. An admission whose caller left meanwhile (cancelled) is settled in the next batch: its
    reservation and its place are given back.

    A settlement nobody waits for rides on the next call, an admission's or its own after SETTLE_DELAY_S:
    under load most settlements then cost no call of their own."""

    __slots__ = ("index", "keys", "ops", "running", "store", "tails", "timer", "waiters")

    def __init__(self, store: RedisLimits) -> None:
        self.store = store
        self.index: dict[str, int] = {}  # key -> its place in KEYS (1-based, as Lua counts)
        self.keys: list[str] = []
        # A set of scopes' tails, found by the set's identity (the gate's plan hands out the same tuple
        # for a registry view until it reloads); holding the set keeps its id unique.
        self.tails: dict[int, _Tails] = {}
        self.ops: list[tuple[str, str, int, _Tails]] = []  # (operation, request id, tokens, its tails)
        self.waiters: list[asyncio.Future[Any] | None] = []
        self.running = False
        self.timer: asyncio.TimerHandle | None = None

    def _tails(self, scopes: Sequence[Scope]) -> _Tails:
        tails = self.tails.get(id(scopes))
        if tails is not None and tails.scopes is scopes:
            return tails
        if len(self.tails) >= _MAX_TAILS:
            self.tails.clear()
        if len(self.keys) >= _MAX_KEYS and not self.ops and not self.running:
            self.index, self.keys, self.tails = {}, [], {}  # idle: start KEYS afresh
        keys = self.store._keys(scopes)
        for key in keys:  # in pairs: a scope's in-flight set comes right after its counters
            if key not in self.index:
                self.keys.append(key)
                self.index[key] = len(self.keys)
        admit = [str(len(scopes))]
        for i, sc in enumerate(scopes):
            lim = sc.limits
            admit.append(str(self.index[keys[2 * i]]))
            admit += [
                str(-1 if v is None else v)
                for v in (lim.requests_per_minute, lim.tokens_per_minute, lim.concurrent_requests)
            ]
        settle = " ".join([str(len(scopes)), *(str(self.index[keys[2 * i]]) for i in range(len(scopes)))])
        tails = self.tails[id(scopes)] = _Tails(scopes, " ".join(admit), settle)
        return tails

    def admit(self, scopes: Sequence[Scope], request_id: str, tokens: int) -> asyncio.Future[Any]:
        fut = asyncio.get_running_loop().create_future()
        tails = self._tails(scopes)
        self.ops.append((f"A {request_id} {tokens} {tails.admit}", request_id, tokens, tails))
        self.waiters.append(fut)
        self._start()
        return fut

    def grant(self, scopes: Sequence[Scope], request_id: str, count: int, tokens: int) -> asyncio.Future[Any]:
        fut = asyncio.get_running_loop().create_future()
        tails = self._tails(scopes)
        self.ops.append((f"G {request_id} {count} {tokens} {tails.admit}", request_id, 0, tails))
        self.waiters.append(fut)
        self._start()
        return fut

    def give_back(self, scopes: Sequence[Scope], window: int, requests: int, tokens: int) -> None:
        tails = self._tails(scopes)
        self.ops.append((f"U - {window} {-requests} {-tokens} {tails.settle}", "-", 0, tails))
        self.waiters.append(None)
        if not self.running and self.timer is None:
            self.timer = asyncio.get_running_loop().call_later(SETTLE_DELAY_S, self._start)

    def settle(
        self, scopes: Sequence[Scope], request_id: str, window: int, delta: int, *, wait: bool
    ) -> asyncio.Future[Any] | None:
        fut = asyncio.get_running_loop().create_future() if wait else None
        tails = self._tails(scopes)
        self.ops.append((f"S {request_id} {window} {delta} {tails.settle}", request_id, 0, tails))
        self.waiters.append(fut)
        if wait:
            self._start()
        elif not self.running and self.timer is None:
            self.timer = asyncio.get_running_loop().call_later(SETTLE_DELAY_S, self._start)
        return fut

    def _start(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.running or not self.ops:
            return
        self.running = True
        # The task's first step runs after the callers ready in this iteration: they join this call.
        task = asyncio.get_running_loop().create_task(self._drain())
        self.store.background.add(task)
        task.add_done_callback(self.store.background.discard)

    async def _drain(self) -> None:
        waiters: list[asyncio.Future[Any] | None] = []
        head = [int(WINDOW_S * 1000), int(self.store.lease_s * 1000)]
        try:
            while self.ops:
                # At most _BATCH_OPS per call: one script run stays short for every other client.
                ops, waiters = self.ops[:_BATCH_OPS], self.waiters[:_BATCH_OPS]
                self.ops, self.waiters = self.ops[_BATCH_OPS:], self.waiters[_BATCH_OPS:]
                try:
                    results = await self.store._batch_script(
                        keys=self.keys, args=[*head, *(o[0] for o in ops)]
                    )
                except Exception as exc:  # noqa: BLE001 - every caller in the batch gets it
                    for w in waiters:
                        if w is not None and not w.done():
                            w.set_exception(exc)
                    if None in waiters and self.store.on_error is not None:
                        self.store.on_error(exc)
                    continue
                for (op, request_id, tokens, tails), w, r in zip(ops, waiters, results, strict=True):
                    if w is None:
                        continue
                    if not w.cancelled():
                        w.set_result(r)
                    elif op[0] == "A" and int(r[0]) == 1:  # admitted for a caller that left
                        self.settle(tails.scopes, request_id, int(r[1]), -tokens, wait=False)
                waiters = []
        except BaseException as exc:
            # The drain itself failed (a bug, shutdown): nobody may wait for an answer forever.
            for w in waiters + self.waiters:
                if w is not None and not w.done():
                    w.set_exception(exc if isinstance(exc, Exception) else RedisError("limits batch stopped"))
            self.ops, self.waiters = [], []
            raise
        finally:
            self.running = False


class RedisLimits:
    shared = True

    def __init__(self, redis: Redis, *, prefix: str = "lgw", lease_s: float = 60.0) -> None:
        self.prefix = prefix.rstrip(":") + ":"
        self.lease_s = lease_s
        self.on_error: Callable[[BaseException], None] | None = None
        self.background: set[asyncio.Task[None]] = set()
        self._batch_script = ScriptCall(redis, _BATCH)  # on connections of its own: app/scriptcall.py
        self._renew = redis.register_script(_RENEW)
        self._batches: dict[str, _Batch] = {}  # one per tenant (its tag)

    def _keys(self, scopes: Sequence[Scope]) -> list[str]:
        keys = []
        for s in scopes:
            base = f"{self.prefix}lim:{{{s.tag}}}:"
            keys += [f"{base}c:{s.key}", f"{base}f:{s.key}"]
        return keys

    def _batch(self, tag: str) -> _Batch:
        batch = self._batches.get(tag)
        if batch is None:
            if len(self._batches) >= _MAX_BATCHES:
                for idle in [t for t, b in self._batches.items() if not b.running and not b.ops]:
                    del self._batches[idle]
            batch = self._batches[tag] = _Batch(self)
        return batch

    async def admit(self, scopes: Sequence[Scope], request_id: str, tokens: int) -> Admission:
        return self.parse(scopes, await self.admit_raw(scopes, request_id, tokens))

    def admit_raw(self, scopes: Sequence[Scope], request_id: str, tokens: int) -> asyncio.Future[Any]:
        """The admission queued into its tenant's next batch: a future of the script's answer (`parse`
        makes it an Admission). Cancelling it before the answer comes undoes the admission."""
        return self._batch(scopes[0].tag).admit(scopes, request_id, tokens)

    def grant_raw(self, scopes: Sequence[Scope], request_id: str, count: int, tokens: int) -> asyncio.Future[Any]:
        """`count` requests and `tokens` taken at once (all or nothing) for this process to admit from
        itself; the answer parses as an admission's. Never for scopes with a concurrency limit."""
        return self._batch(scopes[0].tag).grant(scopes, request_id, count, tokens)

    def give_back_nowait(self, scopes: Sequence[Scope], window: int, requests: int, tokens: int) -> None:
        """What is left of a grant goes back into the window it was taken in (rides on the next call)."""
        self._batch(scopes[0].tag).give_back(scopes, window, requests, tokens)

    @staticmethod
    def parse(scopes: Sequence[Scope], out: Any) -> Admission:
        ok, window = int(out[0]) == 1, int(out[1])
        refused = out[2].decode() if isinstance(out[2], bytes) else str(out[2])
        retry_s = float(out[3]) / 1000.0
        frac = float(out[-1])
        counts = [float(x) for x in out[4:-1]]
        rows = [(s.limits, counts[4 * i : 4 * i + 4]) for i, s in enumerate(scopes)]
        requests = tightest(((lim.requests_per_minute, c[0], c[1]) for lim, c in rows), frac)
        tokens_w = tightest(((lim.tokens_per_minute, c[2], c[3]) for lim, c in rows), frac)
        return Admission(ok, window, requests, tokens_w, refused, retry_s)

    async def settle(self, scopes: Sequence[Scope], request_id: str, window: int, delta: int) -> None:
        fut = self._batch(scopes[0].tag).settle(scopes, request_id, window, delta, wait=True)
        assert fut is not None
        await fut

    def settle_nowait(self, scopes: Sequence[Scope], request_id: str, window: int, delta: int) -> None:
        """Queued into its tenant's next batch (at most SETTLE_DELAY_S away); a failure goes to `on_error`
        (the places expire after a lease, the tokens stay reserved to the window's end)."""
        self._batch(scopes[0].tag).settle(scopes, request_id, window, delta, wait=False)

    async def renew(self, scopes_by_request: Sequence[tuple[Sequence[Scope], str]]) -> None:
        by_tag: dict[str, tuple[list[str], list[str]]] = {}
        for scopes, request_id in scopes_by_request:
            for s in scopes:
                if s.limits.concurrent_requests is None:
                    continue
                keys, ids = by_tag.setdefault(s.tag, ([], []))
                keys.append(self._keys([s])[1])
                ids.append(request_id)
        for keys, ids in by_tag.values():  # one script per tenant: its keys share a slot
            await self._renew(keys=keys, args=[int(self.lease_s * 1000), *ids])

    async def close(self) -> None:
        for batch in self._batches.values():
            batch._start()  # settlements still waiting for a call go out now
        await asyncio.gather(*self.background, return_exceptions=True)
        await self._batch_script.close()
