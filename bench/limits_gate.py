"""The limit gate's own cost: CPU per request of prepare, admit and settle (LimitGate over the in-process
store and over real Redis), with C callers at once, in this process alone (no HTTP, no upstream), so that
changes to the gate and the Redis store can be compared without the noise of a whole gateway.

    .venv/bin/python -m bench.limits_gate [--callers 1 64] [--requests 20000] [--redis redis://127.0.0.1:6379/0]

Prints microseconds of this process's CPU per request (and requests per second) for each store and
caller count. bench/overhead.py --tenant-limits is the figure of record for the whole gateway.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
import uuid

import uvloop
from redis.asyncio import Redis

from app.limits.gate import LimitGate
from app.limits.memory import MemoryLimits
from app.limits.redis_store import RedisLimits
from app.limits.state import Limits, LimitStore
from app.main import redis_client
from app.registry.snapshots import TenantView

LIMITS = Limits(
    requests_per_minute=10**9, tokens_per_minute=10**12, concurrent_requests=10**6
)  # never refuse
BODY = {
    "model": "bench",
    "messages": [{"role": "user", "content": "Hello there, how are you?"}],
    "max_tokens": 16,
}


def _tenant() -> TenantView:
    return TenantView(id=uuid.uuid4(), name="bench", key_id=uuid.uuid4(), limits=LIMITS)


async def _run(store: LimitStore, callers: int, requests: int) -> tuple[float, float]:
    gate = LimitGate(store)
    tenant = _tenant()
    left = requests

    async def one() -> None:
        ticket = gate.prepare(tenant, dict(BODY))
        assert ticket is not None
        await gate.admit_soon(ticket)
        await asyncio.sleep(0)  # the response
        gate.settle(ticket, 30)

    async def caller() -> None:
        nonlocal left
        while left > 0:
            left -= 1
            await one()

    for _ in range(200):  # warm: connections, the script loaded
        await one()
    cpu, wall = time.process_time(), time.monotonic()
    await asyncio.gather(*(caller() for _ in range(callers)))
    await asyncio.sleep(0.02)  # the last settlements
    cpu, wall = time.process_time() - cpu, time.monotonic() - wall
    await gate.close()
    return 1e6 * cpu / requests, requests / wall


async def main(args: argparse.Namespace) -> None:
    stores = ["memory", *(["redis"] if args.redis else [])]
    for name in stores:
        for callers in args.callers:
            redis: Redis | None = None
            if name == "redis":
                redis = redis_client(args.redis, 5.0)
                store: LimitStore = RedisLimits(redis, prefix=f"lgw-bench-gate-{os.getpid()}")
            else:
                store = MemoryLimits()
            us, rate = await _run(store, callers, args.requests)
            print(f"{name:6s} callers {callers:3d}: {us:6.1f} us CPU per request, {rate:8,.0f} req/s")  # noqa: T201
            if redis is not None:
                keys = [k async for k in redis.scan_iter(match=f"lgw-bench-gate-{os.getpid()}:*")]
                if keys:
                    await redis.delete(*keys)
                await redis.aclose(close_connection_pool=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--callers", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument(
        "--redis", default="redis://127.0.0.1:6379/0", help="'' for the in-process store only"
    )
    uvloop.run(main(parser.parse_args()))
