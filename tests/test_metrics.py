"""app.metrics on its own: the label budget (TopLabels) and what a scrape holds when tenants send traffic
to far more adapters than the budget allows. Traffic through a real gateway and vLLM:
tests/integration/test_metrics.py."""

from __future__ import annotations

import os
import time
from collections import defaultdict
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from redis.exceptions import RedisError
from sqlalchemy.exc import OperationalError

from app.metrics import OTHER, Metrics, RequestFacts, TopLabels

REDIS_URL = os.environ.get("GATEWAY_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


def labels_by_name(text: bytes) -> dict[str, set[str]]:
    """Every value each label takes in the exposition."""
    values: dict[str, set[str]] = defaultdict(set)
    for family in text_string_to_metric_families(text.decode()):
        for sample in family.samples:
            for k, v in sample.labels.items():
                values[k].add(v)
    return values


def samples(text: bytes) -> int:
    return sum(len(f.samples) for f in text_string_to_metric_families(text.decode()))


def request(m: Metrics, tenant: str, model: str, *, stream: bool = False, status: int = 200) -> None:
    now = time.monotonic()
    facts = RequestFacts("chat", now - 0.05, tenant=tenant, model=model, backend="b0")
    facts.upstream_started, facts.upstream_ended = now - 0.04, now - 0.001
    facts.prompt_tokens, facts.completion_tokens = 12, 8
    if stream:
        facts.first_token = now - 0.03
    m.observe(facts, status, now)


def test_top_labels_admits_first_comers_then_the_busiest() -> None:
    top = TopLabels(3, rerank_s=60.0)
    assert [top(v) for v in ("a", "b", "c", "d")] == ["a", "b", "c", OTHER]
    for _ in range(50):
        top("d")
        top("e")
    assert top("d") == OTHER  # not before a re-rank
    assert top.rerank(now=time.monotonic()) == set()  # not time yet
    dropped = top.rerank(now=time.monotonic() + 61)
    assert top.admitted == {"d", "e", "a"} or top.admitted == {"d", "e", "b"} or top.admitted == {"d", "e", "c"}
    assert len(dropped) == 2 and dropped <= {"a", "b", "c"}
    assert top("d") == "d" and top("e") == "e"


def test_top_labels_memory_is_bounded() -> None:
    top = TopLabels(10, track=100)
    for i in range(100_000):
        top(f"cold-{i}")
        if i % 10 == 0:
            top("hot")
        assert len(top.counts) <= 101
    top.rerank(now=time.monotonic() + 120)
    assert "hot" in top.admitted  # the one busy value survives every decay


def test_ten_thousand_adapters_keep_the_series_and_the_scrape_bounded() -> None:
    max_models, max_tenants = 100, 20
    m = Metrics(max_models=max_models, max_tenants=max_tenants, rerank_s=1e9)
    started = time.perf_counter()
    for i in range(10_000):
        request(m, f"tenant-{i % 200}", f"adapter-{i}", stream=i % 2 == 0, status=200 if i % 10 else 503)
    per_request_us = (time.perf_counter() - started) / 10_000 * 1e6
    scrape_started = time.perf_counter()
    text = m.scrape()
    scrape_s = time.perf_counter() - scrape_started
    values = labels_by_name(text)
    print(  # noqa: T201 - the bound's figures (-s)
        f"\n10,000 adapters of 200 tenants: {m.series()} labelled series, {samples(text)} samples, "
        f"{len(text):,} bytes, scrape {scrape_s * 1000:.1f} ms, observe {per_request_us:.1f} us per request"
    )
    # Each label holds at most its budget plus "other" (and "" on series that may lack a model).
    assert len(values["gen_ai_request_model"] - {OTHER, ""}) <= max_models
    assert OTHER in values["gen_ai_request_model"]
    assert len(values["tenant"] - {OTHER, ""}) <= max_tenants
    # The bound: per model value (budget + other), the series of every histogram and counter, whatever
    # the traffic; tenants multiply only the two gateway_* counters.
    models, tenants = max_models + 1, max_tenants + 1
    bound = models * 3 + models * tenants * (2 + 2) + 1 + 1  # duration x2 statuses, ttft, tpot; requests x2, tokens x2
    assert m.series() <= bound
    assert samples(text) < 60 * bound
    # Loose enough for a busy 2-core machine; measured ~0.3 s here for ~2,000 series.
    assert scrape_s < 5.0


def test_a_re_rank_gives_the_busy_adapters_series_and_removes_the_others() -> None:
    m = Metrics(max_models=5, max_tenants=5, rerank_s=60.0)
    for i in range(5):
        request(m, "acme", f"early-{i}")
    for _ in range(30):
        for hot in ("hot-1", "hot-2"):
            request(m, "acme", hot)
    before = labels_by_name(m.scrape())["gen_ai_request_model"]
    assert "hot-1" not in before and OTHER in before  # the budget was full when they came
    m.models.next_rerank = 0.0  # due now
    after = labels_by_name(m.scrape())["gen_ai_request_model"]
    assert len(after - {OTHER}) == 3  # two early ones lost their series to the busy two
    assert m.models.admitted == {"hot-1", "hot-2"} | (after - {OTHER})
    request(m, "acme", "hot-1")
    text = m.scrape().decode()
    assert "hot-1" in labels_by_name(text.encode())["gen_ai_request_model"]
    line = next(x for x in text.splitlines() if x.startswith("gateway_requests_total{") and '"hot-1"' in x)
    assert line.endswith(" 1.0")  # counted from its admission on; what came before is in "other"


def test_tenant_label_off() -> None:
    m = Metrics(tenant_label=False)
    request(m, "acme", "support")
    values = labels_by_name(m.scrape())
    assert "tenant" not in values and "support" in values["gen_ai_request_model"]


def test_overhead_is_what_the_upstream_and_the_placement_did_not_take() -> None:
    m = Metrics()
    facts = RequestFacts("text_completion", 100.0, tenant="acme", model="legal", placement_s=0.5)
    facts.upstream_started, facts.upstream_ended = 100.6, 101.9
    facts.completion_tokens, facts.first_token = 11, 100.8
    m.observe(facts, 200, 102.0)
    families = {f.name: f for f in text_string_to_metric_families(m.scrape().decode())}
    total = {s.name: s.value for s in families["gateway_overhead_seconds"].samples}
    assert abs(total["gateway_overhead_seconds_sum"] - (2.0 - 1.3 - 0.5)) < 1e-9
    ttft = {s.name: s.value for s in families["gen_ai_server_time_to_first_token_seconds"].samples}
    assert abs(ttft["gen_ai_server_time_to_first_token_seconds_sum"] - 0.8) < 1e-9
    tpot = {s.name: s.value for s in families["gen_ai_server_time_per_output_token_seconds"].samples}
    assert abs(tpot["gen_ai_server_time_per_output_token_seconds_sum"] - 1.2 / 10) < 1e-9


def families(m: Metrics) -> dict[str, dict[tuple[str, frozenset[tuple[str, str]]], float]]:
    out: dict[str, dict[tuple[str, frozenset[tuple[str, str]]], float]] = defaultdict(dict)
    for family in text_string_to_metric_families(m.scrape().decode()):
        for s in family.samples:
            out[family.name][s.name, frozenset(s.labels.items())] = s.value
    return out


def value(m: Metrics, family: str, sample: str, **labels: str) -> float:
    return sum(v for (n, ls), v in families(m)[family].items() if n == sample and set(labels.items()) <= ls)


async def test_store_calls_are_timed_and_redis_failures_counted() -> None:
    from app.main import redis_client
    from app.residency.instrumented import InstrumentedStore
    from app.residency.memory import MemoryResidency
    from app.residency.redis_store import RedisResidency
    from app.residency.state import BackendSlots

    m = Metrics()
    slots = [BackendSlots("b0", 2, 4)]
    memory = InstrumentedStore(MemoryResidency(), m, "memory")
    assert await memory.touch("pool", "lgw-a", "lease-1", slots) is None
    await memory.snapshot("pool", slots)
    assert value(m, "gateway_store_duration_seconds", "gateway_store_duration_seconds_count", store="memory") == 2
    # A real Redis client on a port nothing listens on: the call fails, and is counted as failed.
    dead = redis_client("redis://127.0.0.1:9/0", 0.2)
    try:
        broken = InstrumentedStore(RedisResidency(dead, prefix="t-metrics"), m, "redis")
        with pytest.raises((RedisError, OSError)):
            await broken.touch("pool", "lgw-a", "lease-2", slots)
    finally:
        await dead.aclose()
    assert value(m, "gateway_store_failures", "gateway_store_failures_total", store="redis", op="touch") == 1
    assert value(m, "gateway_store_failures", "gateway_store_failures_total", store="memory") == 0
    # A working Redis: timed, not failed.
    live = redis_client(REDIS_URL, 1.0)
    try:
        store = InstrumentedStore(RedisResidency(live, prefix="t-metrics-live"), m, "redis")
        await store.snapshot("pool", slots)
    finally:
        await live.aclose()
    assert value(m, "gateway_store_duration_seconds", "gateway_store_duration_seconds_count", op="snapshot", store="redis") == 1


async def test_database_statements_are_timed_and_failures_counted(tmp_path: Path) -> None:
    from sqlalchemy import text

    from app.db.session import create_engine

    m = Metrics()
    engine = create_engine(f"sqlite+aiosqlite:///{tmp_path / 'm.db'}", timeout_s=5)
    m.watch_database(engine)
    try:
        async with engine.connect() as conn:
            await conn.execute(text("select 1"))
            await conn.execute(text("create table t (x int)"))
            await conn.execute(text("insert into t values (1)"))
            with pytest.raises(OperationalError):
                await conn.execute(text("select * from no_such_table"))
    finally:
        await engine.dispose()
    count = "gateway_db_duration_seconds_count"
    assert value(m, "gateway_db_duration_seconds", count, op="select") == 1  # the failed one is not timed
    assert value(m, "gateway_db_duration_seconds", count, op="insert") == 1
    assert value(m, "gateway_db_duration_seconds", count, op="other") == 1  # create table
    assert value(m, "gateway_db_failures", "gateway_db_failures_total", op="select") == 1


async def test_fleet_gauges_come_from_the_last_sample_and_are_read_at_most_every_max_age() -> None:
    from app.metrics import BackendSample, FleetSample

    m = Metrics()
    reads = 0

    async def sample() -> FleetSample:
        nonlocal reads
        reads += 1
        return FleetSample(
            backends=[BackendSample("gpu-1", "llama", True, 4, 3), BackendSample("gpu-2", "llama", False, 4, 1)],
            registered={"llama": 10},
            active={"llama": 4},
            jobs={("promote", "running", "quantize"): 1, ("promote", "succeeded", ""): 2},
        )

    assert "gateway_backend_up" not in families(m)  # nothing read yet: no made-up zeros
    await m.refresh_fleet(sample, max_age_s=60)
    await m.refresh_fleet(sample, max_age_s=60)
    assert reads == 1
    assert value(m, "gateway_backend_up", "gateway_backend_up", backend="gpu-1") == 1
    assert value(m, "gateway_backend_up", "gateway_backend_up", backend="gpu-2") == 0
    assert value(m, "gateway_backend_slots", "gateway_backend_slots") == 8
    assert value(m, "gateway_backend_adapters", "gateway_backend_adapters", backend="gpu-1") == 3
    assert value(m, "gateway_adapters_registered", "gateway_adapters_registered", base_model="llama") == 10
    assert value(m, "gateway_adapters_active", "gateway_adapters_active") == 4
    assert value(m, "gateway_promotion_jobs", "gateway_promotion_jobs", state="running", step="quantize") == 1


def test_residency_events_and_rate_limits() -> None:
    m = Metrics()
    m.loaded("gpu-1", 0.2)
    m.loaded("gpu-1", None)
    m.unloaded("gpu-1", "evicted")
    m.unloaded("gpu-1", "trimmed")
    m.lookup(hit=True)
    m.lookup(hit=False)
    m.waited_for_load("llama")
    m.waiting("llama", 1)
    m.waiting("llama", 1)
    m.waiting("llama", -1)
    request(m, "acme", "support", status=429)
    assert value(m, "gateway_adapter_loads", "gateway_adapter_loads_total", outcome="ok") == 1
    assert value(m, "gateway_adapter_loads", "gateway_adapter_loads_total", outcome="failed") == 1
    assert value(m, "gateway_adapter_load_duration_seconds", "gateway_adapter_load_duration_seconds_count") == 1
    assert value(m, "gateway_adapter_evictions", "gateway_adapter_evictions_total") == 1
    assert value(m, "gateway_adapter_unloads", "gateway_adapter_unloads_total") == 2
    assert value(m, "gateway_adapter_cache", "gateway_adapter_cache_total", result="hit") == 1
    assert value(m, "gateway_single_flight_waits", "gateway_single_flight_waits_total") == 1
    assert value(m, "gateway_placement_waiters", "gateway_placement_waiters", base_model="llama") == 1
    assert value(m, "gateway_rate_limited", "gateway_rate_limited_total", tenant="acme") == 1
