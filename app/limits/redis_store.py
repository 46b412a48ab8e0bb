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

from redis.asyncio import Redis

from app.limits.state import WINDOW_S, Admission, Scope, tightest

_MAX_PENDING = 10_000  # settlements under way at once

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

# KEYS: per scope its counters hash and its in-flight zset. ARGV: window ms, request id, tokens, lease ms,
# then per scope rpm, tpm, concurrency (-1: none). Returns {ok, window, refused, retry ms, then per scope
# rc, rp, tc, tp after the call}; counts only change when every scope admits.
_ADMIT = (
    _COMMON
    + """
local id, tokens, lease = ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
local n = #KEYS / 2
local S = {}
local refused, retry = '', 0
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
for i = 1, n do
  local s = load(KEYS[2 * i - 1])
  S[i] = s
  if refused == '' then
    local rpm, tpm, conc = tonumber(ARGV[2 + 3 * i]), tonumber(ARGV[3 + 3 * i]), tonumber(ARGV[4 + 3 * i])
    if rpm >= 0 then
      local w = wait_for(s.rc, s.rp, 1, rpm)
      if w ~= 0 then refused, retry = 'requests', w end
    end
    if refused == '' and tpm >= 0 then
      local w = wait_for(s.tc, s.tp, tokens, tpm)
      if w < 0 then refused, retry = 'tokens_too_large', 0
      elseif w > 0 then refused, retry = 'tokens', w end
    end
    if refused == '' and conc >= 0 then
      local f = KEYS[2 * i]
      redis.call('ZREMRANGEBYSCORE', f, '-inf', now)
      if redis.call('ZCARD', f) >= conc then refused, retry = 'concurrency', 1000 end
    end
  end
end
local out = {refused == '' and 1 or 0, win, refused, tostring(retry)}
for i = 1, n do
  local s = S[i]
  if refused == '' then
    s.rc, s.tc = s.rc + 1, s.tc + tokens
    local h = KEYS[2 * i - 1]
    redis.call('HSET', h, 'w', s.w, 'rc', s.rc, 'rp', s.rp, 'tc', s.tc, 'tp', s.tp)
    redis.call('PEXPIRE', h, 2 * W + 1000)
    if tonumber(ARGV[4 + 3 * i]) >= 0 then
      local f = KEYS[2 * i]
      redis.call('ZADD', f, now + lease, id)
      redis.call('PEXPIRE', f, lease + 1000)
    end
  end
  table.insert(out, tostring(s.rc)); table.insert(out, tostring(s.rp))
  table.insert(out, tostring(s.tc)); table.insert(out, tostring(s.tp))
end
table.insert(out, tostring(frac))
return out
"""
)

# KEYS as for admission. ARGV: window ms, request id, the window of the reservation, token delta.
_SETTLE = (
    _COMMON
    + """
local id, at, delta = ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
for i = 1, #KEYS / 2 do
  local h = KEYS[2 * i - 1]
  if delta ~= 0 and redis.call('EXISTS', h) == 1 then
    local s = load(h)
    if s.w == at then s.tc = math.max(0, s.tc + delta)
    elseif s.w == at + 1 then s.tp = math.max(0, s.tp + delta) end
    redis.call('HSET', h, 'w', s.w, 'rc', s.rc, 'rp', s.rp, 'tc', s.tc, 'tp', s.tp)
  end
  redis.call('ZREM', KEYS[2 * i], id)
end
return 1
"""
)

# KEYS: in-flight zsets; ARGV: lease ms, then one request id per key. Pushes the expiry of those held.
_RENEW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local lease = tonumber(ARGV[1])
for i = 1, #KEYS do
  if redis.call('ZADD', KEYS[i], 'XX', 'CH', now + lease, ARGV[i + 1]) >= 0 then
    redis.call('PEXPIRE', KEYS[i], lease + 1000)
  end
end
return 1
"""


class RedisLimits:
    shared = True

    def __init__(self, redis: Redis, *, prefix: str = "lgw", lease_s: float = 60.0) -> None:
        self.prefix = prefix.rstrip(":") + ":"
        self.lease_s = lease_s
        self.on_error: Callable[[BaseException], None] | None = None
        self._pending: set[asyncio.Task[None]] = set()
        self._admit = redis.register_script(_ADMIT)
        self._settle = redis.register_script(_SETTLE)
        self._renew = redis.register_script(_RENEW)

    def _keys(self, scopes: Sequence[Scope]) -> list[str]:
        keys = []
        for s in scopes:
            base = f"{self.prefix}lim:{{{s.tag}}}:"
            keys += [f"{base}c:{s.key}", f"{base}f:{s.key}"]
        return keys

    async def admit(self, scopes: Sequence[Scope], request_id: str, tokens: int) -> Admission:
        args: list[str | int | float] = [int(WINDOW_S * 1000), request_id, tokens, int(self.lease_s * 1000)]
        for s in scopes:
            lim = s.limits
            for v in (lim.requests_per_minute, lim.tokens_per_minute, lim.concurrent_requests):
                args.append(-1 if v is None else v)
        out = await self._admit(keys=self._keys(scopes), args=args)
        ok, window = int(out[0]) == 1, int(out[1])
        refused = out[2].decode() if isinstance(out[2], bytes) else str(out[2])
        retry_s = float(out[3]) / 1000.0
        frac = float(out[-1])
        counts = [float(x) for x in out[4:-1]]
        rows = [(s.limits, counts[4 * i : 4 * i + 4]) for i, s in enumerate(scopes)]
        requests = tightest((lim.requests_per_minute, c[0], c[1]) for lim, c in rows)(frac)
        tokens_w = tightest((lim.tokens_per_minute, c[2], c[3]) for lim, c in rows)(frac)
        return Admission(ok, window, requests, tokens_w, refused, retry_s)

    async def settle(self, scopes: Sequence[Scope], request_id: str, window: int, delta: int) -> None:
        await self._settle(keys=self._keys(scopes), args=[int(WINDOW_S * 1000), request_id, window, delta])

    def settle_nowait(self, scopes: Sequence[Scope], request_id: str, window: int, delta: int) -> None:
        """In a task of its own (at most _MAX_PENDING at once; beyond, the places expire after a lease and
        the tokens stay reserved to the window's end); a failure goes to `on_error`."""
        if len(self._pending) >= _MAX_PENDING:
            return
        task = asyncio.ensure_future(self._settle_quietly(scopes, request_id, window, delta))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _settle_quietly(self, scopes: Sequence[Scope], request_id: str, window: int, delta: int) -> None:
        try:
            await self.settle(scopes, request_id, window, delta)
        except Exception as exc:  # noqa: BLE001 - reported; the store recovers by expiry
            if self.on_error is not None:
                self.on_error(exc)

    async def close(self) -> None:
        await asyncio.gather(*self._pending, return_exceptions=True)

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
