"""Traffic per adapter over time, for the promotion advice: requests, tokens, and the seconds requests
spent on shared LoRA backends or on a dedicated deployment.

On the request path a finished request costs one dict lookup and five float additions (`record`); no
I/O. Every `flush_s` the sums go into time buckets of a TrafficStore: Redis hashes when the gateway has
Redis (every replica adds into the same buckets, so the advice sees the whole fleet), else an in-process
ring (one replica). Everything is bounded: at most `max_keys` adapters per flush interval (the rest are
summed under OTHER), at most `retention_s / bucket_s` buckets, Redis keys expire.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
import uuid
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Protocol

from redis.asyncio import Redis
from redis.exceptions import RedisError

log = logging.getLogger(__name__)

FIELDS = ("requests", "prompt_tokens", "completion_tokens", "shared_s", "dedicated_s")
BASE = "base"  # requests for the base model itself (no adapter): part of the shared backends' time
OTHER = "other"  # adapters past the per-interval key limit, summed together
_REQ, _PROMPT, _COMPLETION, _SHARED, _DEDICATED = range(5)


@dataclass
class Totals:
    requests: float = 0.0
    prompt_tokens: float = 0.0
    completion_tokens: float = 0.0
    shared_s: float = 0.0
    dedicated_s: float = 0.0
    buckets: int = 0  # how many buckets of the window had traffic

    @property
    def tokens(self) -> float:
        return self.prompt_tokens + self.completion_tokens

    def add(self, values: Iterable[float]) -> None:
        for name, value in zip(FIELDS, values, strict=True):
            setattr(self, name, getattr(self, name) + value)


@dataclass(frozen=True)
class Window:
    seconds: float  # the span the buckets cover (the current, partial bucket included)
    buckets: int
    totals: dict[str, Totals] = field(default_factory=dict)  # adapter id hex (or BASE, OTHER) -> sums


class TrafficStore(Protocol):
    bucket_s: int

    async def add(self, bucket: int, sums: dict[str, list[float]]) -> None: ...

    async def window(self, first: int, last: int) -> dict[int, dict[str, list[float]]]: ...


class MemoryTraffic:
    """One process's buckets, newest last; the oldest fall off past the retention."""

    def __init__(self, bucket_s: int = 300, retention_s: int = 25 * 3600) -> None:
        self.bucket_s = bucket_s
        self._buckets: deque[tuple[int, dict[str, list[float]]]] = deque(maxlen=max(1, retention_s // bucket_s))

    async def add(self, bucket: int, sums: dict[str, list[float]]) -> None:
        if not self._buckets or self._buckets[-1][0] != bucket:
            self._buckets.append((bucket, {}))
        into = self._buckets[-1][1]
        for key, values in sums.items():
            have = into.setdefault(key, [0.0] * len(FIELDS))
            for i, v in enumerate(values):
                have[i] += v

    async def window(self, first: int, last: int) -> dict[int, dict[str, list[float]]]:
        return {b: {k: list(v) for k, v in sums.items()} for b, sums in self._buckets if first <= b <= last}


class RedisTraffic:
    """Bucket b is the hash {prefix}:traffic:{b} of fields "<key>|<field>" -> float, added to with
    HINCRBYFLOAT by every replica and expiring after the retention."""

    def __init__(self, redis: Redis, *, prefix: str, bucket_s: int = 300, retention_s: int = 25 * 3600) -> None:
        self.redis, self.prefix, self.bucket_s, self.retention_s = redis, prefix, bucket_s, retention_s

    def _key(self, bucket: int) -> str:
        return f"{self.prefix}:traffic:{bucket}"

    async def add(self, bucket: int, sums: dict[str, list[float]]) -> None:
        key = self._key(bucket)
        async with self.redis.pipeline(transaction=False) as pipe:
            for name, values in sums.items():
                for field_name, value in zip(FIELDS, values, strict=True):
                    if value:
                        pipe.hincrbyfloat(key, f"{name}|{field_name}", value)
            pipe.expire(key, self.retention_s)
            await pipe.execute()

    async def window(self, first: int, last: int) -> dict[int, dict[str, list[float]]]:
        buckets = list(range(first, last + 1))
        async with self.redis.pipeline(transaction=False) as pipe:
            for b in buckets:
                pipe.hgetall(self._key(b))
            found = await pipe.execute()
        out: dict[int, dict[str, list[float]]] = {}
        index = {name: i for i, name in enumerate(FIELDS)}
        for b, raw in zip(buckets, found, strict=True):
            if not raw:
                continue
            sums: dict[str, list[float]] = {}
            for k, v in raw.items():
                name, _, field_name = (k.decode() if isinstance(k, bytes) else k).rpartition("|")
                if field_name in index:
                    sums.setdefault(name, [0.0] * len(FIELDS))[index[field_name]] = float(v)
            out[b] = sums
        return out


class TrafficMeter:
    def __init__(self, store: TrafficStore, *, flush_s: float = 10.0, max_keys: int = 10_000) -> None:
        self.store = store
        self.flush_s = flush_s
        self.max_keys = max_keys
        self._sums: dict[str, list[float]] = {}
        self._failures = 0

    def record(
        self,
        adapter: uuid.UUID | None,
        *,
        seconds: float,
        dedicated: bool,
        prompt_tokens: int = 0,
        completion_tokens: int = 0,
    ) -> None:
        """One finished request (hot path: no I/O)."""
        key = adapter.hex if adapter is not None else BASE
        sums = self._sums.get(key)
        if sums is None:
            if len(self._sums) >= self.max_keys:
                key = OTHER
            sums = self._sums.setdefault(key, [0.0] * len(FIELDS))
        sums[_REQ] += 1
        sums[_PROMPT] += prompt_tokens
        sums[_COMPLETION] += completion_tokens
        sums[_DEDICATED if dedicated else _SHARED] += seconds

    def bucket(self, at: float | None = None) -> int:
        return int((time.time() if at is None else at) // self.store.bucket_s)

    async def flush(self) -> None:
        if not self._sums:
            return
        sums, self._sums = self._sums, {}
        try:
            await self.store.add(self.bucket(), sums)
        except (RedisError, OSError, TimeoutError) as exc:
            # Advice only: a lost interval makes it a little less exact, never wrong about who is hot.
            self._failures += 1
            if self._failures == 1 or self._failures % 100 == 0:
                log.warning("could not record traffic for the promotion advice (%s); dropped %d adapters' sums",
                            type(exc).__name__, len(sums))  # fmt: skip
        else:
            self._failures = 0

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.flush_s)
            await self.flush()

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self.flush()

    async def window(self, seconds: float) -> Window:
        """The sums of the last `seconds` (rounded up to whole buckets, the current one included)."""
        last = self.bucket()
        count = max(1, math.ceil(seconds / self.store.bucket_s))
        found = await self.store.window(last - count + 1, last)
        totals: dict[str, Totals] = {}
        for sums in found.values():
            for key, values in sums.items():
                t = totals.setdefault(key, Totals())
                t.add(values)
                t.buckets += 1
        span = (count - 1) * self.store.bucket_s + (time.time() - last * self.store.bucket_s)
        return Window(seconds=span, buckets=count, totals=totals)
