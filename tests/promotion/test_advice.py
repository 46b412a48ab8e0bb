"""Promotion advice: the traffic meter (in process and on a real Redis shared by two "replicas") and the
decision tree applied to measured traffic."""

from __future__ import annotations

import os
import socket
import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import pytest
from redis.asyncio import Redis

from app.promotion.advice import AWQ_BATCH1_SPEEDUP, MERGE_SPEEDUP, AdapterFacts, AdviceParams, advise
from app.traffic import BASE, OTHER, MemoryTraffic, RedisTraffic, Totals, TrafficMeter, Window

REDIS_URL = os.environ.get("GATEWAY_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
NOW = datetime(2026, 12, 3, 12, 0, tzinfo=UTC)


@pytest.fixture
async def redis() -> AsyncIterator[Redis]:
    r = Redis.from_url(REDIS_URL)
    yield r
    await r.aclose()


def traffic(meter: TrafficMeter, adapter: uuid.UUID | None, n: int, *, seconds: float = 0.5, dedicated: bool = False) -> None:
    for _ in range(n):
        meter.record(adapter, seconds=seconds, dedicated=dedicated, prompt_tokens=10, completion_tokens=4)


async def test_two_replicas_add_into_the_same_redis_buckets(redis: Redis) -> None:
    prefix = f"lgw-test-{uuid.uuid4().hex[:8]}"
    a, b = uuid.uuid4(), uuid.uuid4()
    replicas = [TrafficMeter(RedisTraffic(redis, prefix=prefix, bucket_s=60)) for _ in range(2)]
    try:
        traffic(replicas[0], a, 3)
        traffic(replicas[1], a, 2, dedicated=True)
        traffic(replicas[1], b, 1)
        traffic(replicas[1], None, 4)
        for m in replicas:
            await m.flush()
        await replicas[0].flush()  # nothing new: adds nothing
        w = await replicas[1].window(3600)
        ta, tb = w.totals[a.hex], w.totals[b.hex]
        assert (ta.requests, ta.prompt_tokens, ta.completion_tokens) == (5, 50, 20)
        assert ta.shared_s == pytest.approx(1.5) and ta.dedicated_s == pytest.approx(1.0)
        assert (tb.requests, w.totals[BASE].requests) == (1, 4)
        assert w.buckets == 60 and ta.buckets == 1
        assert 0 < await redis.ttl(f"{prefix}:traffic:{replicas[0].bucket()}") <= 25 * 3600
    finally:
        await redis.delete(*[k async for k in redis.scan_iter(f"{prefix}:*")])


async def test_a_redis_outage_drops_the_interval_and_the_next_flush_works(redis: Redis) -> None:
    with socket.socket() as s:  # a port nothing listens on: a real refused connection
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    down = Redis.from_url(f"redis://127.0.0.1:{port}/0", socket_connect_timeout=0.5)
    meter = TrafficMeter(RedisTraffic(down, prefix="lgw-test-down", bucket_s=60))
    traffic(meter, uuid.uuid4(), 2)
    await meter.flush()  # logged and dropped, not raised: the advice is not on any request's path
    assert meter._sums == {}
    await down.aclose()
    prefix = f"lgw-test-{uuid.uuid4().hex[:8]}"
    meter.store = RedisTraffic(redis, prefix=prefix, bucket_s=60)
    adapter = uuid.uuid4()
    traffic(meter, adapter, 1)
    await meter.flush()
    try:
        assert (await meter.window(60)).totals[adapter.hex].requests == 1
    finally:
        await redis.delete(*[k async for k in redis.scan_iter(f"{prefix}:*")])


async def test_bounded_keys_and_buckets() -> None:
    store = MemoryTraffic(bucket_s=60, retention_s=180)
    meter = TrafficMeter(store, max_keys=3)
    ids = [uuid.uuid4() for _ in range(10)]
    for i in ids:
        traffic(meter, i, 1)
    assert len(meter._sums) == 4  # three adapters, then the rest summed together
    assert meter._sums[OTHER][0] == 7
    for bucket in range(10):
        await store.add(bucket, {"x": [1.0, 0, 0, 0, 0]})
    assert len(store._buckets) == 3  # the retention's worth
    assert sorted((await store.window(0, 100)).keys()) == [7, 8, 9]


def facts(adapter: uuid.UUID, *, age: timedelta = timedelta(days=2), promoted: bool = False) -> AdapterFacts:
    return AdapterFacts(id=adapter, tenant="acme", name=f"a-{adapter.hex[:4]}", version=1, created_at=NOW - age, promoted=promoted)


def window(**totals: Totals) -> Window:
    return Window(seconds=3600, buckets=12, totals=totals)


def row(shared_s: float, requests: int, buckets: int, dedicated_s: float = 0.0) -> Totals:
    return Totals(requests=requests, prompt_tokens=requests * 200, completion_tokens=requests * 100,
                  shared_s=shared_s, dedicated_s=dedicated_s, buckets=buckets)  # fmt: skip


def test_the_decision_tree() -> None:
    hot_busy, hot_quiet, cold, new, bursty, cooled, busy_promoted = (uuid.uuid4() for _ in range(7))
    w = window(**{
        hot_busy.hex: row(36_000, 5_000, 12),  # 10 requests in flight on average
        hot_quiet.hex: row(7_200, 900, 12),  # 2 in flight: latency-bound
        cold.hex: row(100, 40, 3),
        new.hex: row(7_200, 900, 12),
        bursty.hex: row(7_200, 900, 2),
        cooled.hex: row(0, 20, 1, dedicated_s=10),
        busy_promoted.hex: row(0, 5_000, 12, dedicated_s=30_000),
        BASE: row(3_600, 100, 12),
        OTHER: row(6_000, 100, 12),
    })  # fmt: skip
    f = {k: facts(uuid.UUID(hex=k)) for k in w.totals if k not in (BASE, OTHER)}
    f[new.hex] = facts(new, age=timedelta(minutes=10))
    f[cooled.hex] = facts(cooled, promoted=True)
    f[busy_promoted.hex] = facts(busy_promoted, promoted=True)
    advice = advise(w, f, AdviceParams(min_share=0.05), NOW)
    by = {r.adapter_id: r for r in advice.data}
    assert advice.data[0].adapter_id == hot_busy  # ranked by share of shared-backend time
    assert advice.shared_backend_seconds == pytest.approx(36_000 + 7_200 * 3 + 100 + 3_600 + 6_000)
    assert (by[hot_busy].action, by[hot_busy].quantization, by[hot_busy].expected_speedup) == ("promote", "none", MERGE_SPEEDUP)
    assert by[hot_busy].mean_concurrency == pytest.approx(10.0)
    assert (by[hot_quiet].action, by[hot_quiet].quantization) == ("promote", "awq")
    assert by[hot_quiet].expected_speedup == pytest.approx(round(MERGE_SPEEDUP * AWQ_BATCH1_SPEEDUP, 2))
    assert by[cold].action == "keep" and "shared LoRA path" in by[cold].reasons[0]
    assert by[new].action == "keep" and "uploaded within the window" in by[new].reasons[0]
    assert by[bursty].action == "keep" and "17% of the window" in by[bursty].reasons[0]
    assert by[cooled].action == "demote" and by[busy_promoted].action == "keep"
    assert by[hot_busy].tokens_per_s == pytest.approx(5_000 * 300 / 3600, rel=1e-3)
    assert sum(r.shared_time_share for r in advice.data) < 1  # base model and "other" share the rest
    cpu = advise(w, f, AdviceParams(min_share=0.05, target="cpu"), NOW)
    assert {r.adapter_id: r.quantization for r in cpu.data}[hot_quiet] == "gguf"
    # A threshold nobody reaches: nothing to promote; limit cuts the list.
    strict = advise(w, f, AdviceParams(min_share=0.9, limit=2), NOW)
    assert len(strict.data) == 2 and all(r.action != "promote" for r in strict.data)


def test_deleted_adapters_are_left_out() -> None:
    gone = uuid.uuid4()
    assert advise(window(**{gone.hex: row(10, 500, 12)}), {}, AdviceParams(), NOW).data == []


async def test_window_spans_whole_buckets_up_to_now() -> None:
    meter = TrafficMeter(MemoryTraffic(bucket_s=60))
    traffic(meter, uuid.uuid4(), 1)
    await meter.flush()
    w = await meter.window(600)
    assert w.buckets == 10
    assert 540 <= w.seconds <= 600 + 1 and w.seconds - 540 == pytest.approx(time.time() % 60, abs=1)
