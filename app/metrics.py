"""The gateway's Prometheus series, declared once per app, with bounded labels; served at /metrics.

Request series follow the OpenTelemetry GenAI server conventions in Prometheus form, labelled with the
public model name (`gen_ai_request_model`: the tenant's adapter name, or the base model's), as the
conventions ask for fine-tuned models; gateway_* series are the gateway's own.

Cardinality is bounded whatever tenants send: a model or tenant label takes at most `max_models` /
`max_tenants` values, the busiest by recent traffic (TopLabels), and everything else is counted under
"other"; a request that never named a resolvable model is labelled "" (a client's made-up names never
become labels). The tenant label can be turned off. On the request path: one dict lookup per series and
the observations themselves, no lock beyond prometheus-client's own.
"""

from __future__ import annotations

import heapq
import os
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

OTHER = "other"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# The conventions' advised bucket boundaries (seconds).
DURATION_BUCKETS = (0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92)
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)
TPOT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
# The gateway's own time per request: tens of microseconds to a few milliseconds.
OVERHEAD_BUCKETS = (0.0001, 0.00025, 0.0005, 0.00075, 0.001, 0.0015, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5)
# Adapter loads: ~0.05-0.3 s on a GPU, seconds when loads contend (bench/PLACEMENT.md).
LOAD_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.5, 5.0, 10.0, 30.0)
# One Redis or database round trip.
CALL_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0)
WAIT_BUCKETS = (0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)

OPERATIONS = {"/v1/chat/completions": "chat", "/v1/completions": "text_completion"}


class TopLabels:
    """Which values of one label keep their own series: at most `limit`, the busiest by a decayed count.

    Until `limit` values are admitted, each new value is admitted as it comes; after that a value counts
    under OTHER until a re-rank (`rerank`, at most every `rerank_s`, from the scrape) finds it among the
    busiest. Counts are halved at each re-rank, and when more than `track` values are counted at once
    (their memory bound), which drops those seen about once: amortised O(1) per call."""

    __slots__ = ("admitted", "counts", "limit", "next_rerank", "rerank_s", "track")

    def __init__(self, limit: int, *, rerank_s: float = 60.0, track: int | None = None) -> None:
        self.limit = limit
        self.rerank_s = rerank_s
        self.track = track if track is not None else max(64, 8 * limit)
        self.admitted: set[str] = set()
        self.counts: dict[str, float] = {}
        self.next_rerank = time.monotonic() + rerank_s

    def __call__(self, value: str) -> str:
        counts = self.counts
        counts[value] = counts.get(value, 0.0) + 1.0
        if len(counts) > self.track:
            self._decay()
        if value in self.admitted:
            return value
        if len(self.admitted) < self.limit:
            self.admitted.add(value)
            return value
        return OTHER

    def _decay(self) -> None:
        self.counts = {k: v / 2 for k, v in self.counts.items() if v >= 2.0}

    def rerank(self, now: float | None = None) -> set[str]:
        """Admits the busiest values when it is time; returns those that lost their series."""
        now = time.monotonic() if now is None else now
        if now < self.next_rerank:
            return set()
        self.next_rerank = now + self.rerank_s
        top = set(heapq.nlargest(self.limit, self.counts, key=self.counts.__getitem__))
        dropped = self.admitted - top
        self.admitted = top
        self._decay()
        return dropped


@dataclass(slots=True)
class RequestFacts:
    """What one /v1 request did, filled in as it goes (app.api.openai) and observed once at its end."""

    operation: str
    started: float
    tenant: str = ""
    model: str = ""  # the public model name, once resolved
    backend: str = ""
    error_type: str = ""
    placement_s: float = 0.0
    upstream_started: float | None = None
    upstream_ended: float | None = None
    first_token: float | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    limit: str = ""  # the limit that refused it (a 429), e.g. "waiters"
    limit_headers: dict[str, str] | None = None  # x-ratelimit-* of the tenant's limits (every response)


def multiprocess_dir() -> str | None:
    """Where prometheus-client keeps the values of several worker processes (`serve --workers N`)."""
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


@dataclass(slots=True)
class BackendSample:
    """One backend as the fleet gauges show it."""

    name: str
    base_model: str
    up: bool
    slots: int
    adapters: int


@dataclass(slots=True)
class FleetSample:
    """The fleet's state at a scrape: backends, the registry's adapters, promotion jobs."""

    backends: list[BackendSample] = field(default_factory=list)
    registered: dict[str, int] = field(default_factory=dict)  # base model -> adapters in the registry
    active: dict[str, int] = field(default_factory=dict)  # base model -> adapters loaded somewhere
    jobs: dict[tuple[str, str, str], int] = field(default_factory=dict)  # (kind, state, step) -> jobs


class FleetCollector(Collector):
    """Gauges of the fleet's state, read at scrape time (from the residency store, the registry and this
    process's health checks) rather than kept up to date on the request path. Any worker process may
    answer a scrape: these are facts about the fleet, not about the process."""

    def __init__(self) -> None:
        self.sample: FleetSample | None = None

    def collect(self) -> Iterator[GaugeMetricFamily]:
        sample = self.sample
        if sample is None:
            return
        where = ["backend", "base_model"]
        up = GaugeMetricFamily("gateway_backend_up", "1 while the backend passes health checks", labels=where)
        slots = GaugeMetricFamily("gateway_backend_slots", "GPU LoRA slots (vLLM --max-loras)", labels=where)
        held = GaugeMetricFamily("gateway_backend_adapters", "Adapters loaded on the backend", labels=where)
        for b in sample.backends:
            up.add_metric([b.name, b.base_model], 1.0 if b.up else 0.0)
            slots.add_metric([b.name, b.base_model], b.slots)
            held.add_metric([b.name, b.base_model], b.adapters)
        yield from (up, slots, held)
        registered = GaugeMetricFamily(
            "gateway_adapters_registered", "Adapters in the registry", labels=["base_model"]
        )
        for model, n in sample.registered.items():
            registered.add_metric([model], n)
        active = GaugeMetricFamily(
            "gateway_adapters_active", "Distinct adapters loaded on some backend", labels=["base_model"]
        )
        for model, n in sample.active.items():
            active.add_metric([model], n)
        jobs = GaugeMetricFamily(
            "gateway_promotion_jobs", "Promotion and demotion jobs by state and step", labels=["kind", "state", "step"]
        )
        for key, n in sorted(sample.jobs.items()):
            jobs.add_metric(list(key), n)
        yield from (registered, active, jobs)


class Metrics:
    def __init__(
        self,
        *,
        max_models: int = 100,
        max_tenants: int = 100,
        tenant_label: bool = True,
        rerank_s: float = 60.0,
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        # Several worker processes share their values through files (prometheus-client's multiprocess
        # mode): a series there cannot be removed, so labels are admitted and never re-ranked (at most
        # workers x the limit values, the first-comers of each process).
        self.multiprocess = multiprocess_dir()
        self.tenant_label = tenant_label
        self.models = TopLabels(max_models, rerank_s=rerank_s)
        self.tenants = TopLabels(max_tenants, rerank_s=rerank_s)
        self.fleet = FleetCollector()
        self._fleet_at = -1e9
        r = self.registry
        r.register(self.fleet)
        model = ["gen_ai_operation_name", "gen_ai_request_model"]
        self.duration = Histogram(
            "gen_ai_server_request_duration", "GenAI server request duration (the gateway's whole answer)",
            [*model, "error_type"], unit="seconds", buckets=DURATION_BUCKETS, registry=r,
        )  # fmt: skip
        self.ttft = Histogram(
            "gen_ai_server_time_to_first_token", "Time to the first streamed token (streaming requests)",
            model, unit="seconds", buckets=TTFT_BUCKETS, registry=r,
        )  # fmt: skip
        self.tpot = Histogram(
            "gen_ai_server_time_per_output_token", "Time per output token after the first (streaming requests)",
            model, unit="seconds", buckets=TPOT_BUCKETS, registry=r,
        )  # fmt: skip
        who = ["tenant", "gen_ai_request_model"] if tenant_label else ["gen_ai_request_model"]
        self.tokens = Counter(
            "gateway_tokens", "Tokens by type, from the backends' usage reports",
            [*who, "gen_ai_token_type"], registry=r,
        )  # fmt: skip
        self.requests = Counter(
            "gateway_requests", "Requests on the OpenAI routes by outcome",
            [*who, "backend", "status", "error_type"], registry=r,
        )  # fmt: skip
        self.overhead = Histogram(
            "gateway_overhead", "Time a request spent in the gateway itself: outside the upstream call and "
            "outside the placement wait", ["gen_ai_operation_name"], unit="seconds", buckets=OVERHEAD_BUCKETS,
            registry=r,
        )  # fmt: skip
        self.placement = Histogram(
            "gateway_placement_wait", "Time to a backend holding the adapter (loads and queueing included)",
            ["outcome"], unit="seconds", buckets=WAIT_BUCKETS, registry=r,
        )  # fmt: skip
        self.rate_limited = Counter(
            "gateway_rate_limited", "Requests refused by a limit (429)",
            ["tenant", "limit"] if tenant_label else ["limit"], registry=r,
        )  # fmt: skip
        # Residency: backends are registered by operators (a handful), base models fewer still.
        self.loads = Counter(
            "gateway_adapter_loads", "Adapter loads asked of backends, by outcome", ["backend", "outcome"],
            registry=r,
        )  # fmt: skip
        self.load_time = Histogram(
            "gateway_adapter_load_duration", "Time a backend took to load an adapter (successful loads)",
            ["backend"], unit="seconds", buckets=LOAD_BUCKETS, registry=r,
        )  # fmt: skip
        self.unloads = Counter(
            "gateway_adapter_unloads", "Adapters unloaded from backends: evicted (to make room for another) "
            "or trimmed (over capacity after the state was repaired)", ["backend", "reason"], registry=r,
        )  # fmt: skip
        self.evictions = Counter(
            "gateway_adapter_evictions", "Adapters evicted to make room for another", ["backend"], registry=r
        )
        self.cache = Counter(
            "gateway_adapter_cache", "Placements by whether the adapter was live on a backend when the "
            "request came (hit) or had to be loaded or waited for (miss)", ["result"], registry=r,
        )  # fmt: skip
        self.single_flight = Counter(
            "gateway_single_flight_waits", "Requests that waited for a load another request started",
            ["base_model"], registry=r,
        )  # fmt: skip
        self.waiters = Gauge(
            "gateway_placement_waiters", "Requests waiting to be placed now", ["base_model"],
            multiprocess_mode="livesum", registry=r,
        )  # fmt: skip
        self.store_time = Histogram(
            "gateway_store_duration", "Residency-store calls (Redis round trips, or in-process)",
            ["store", "op"], unit="seconds", buckets=CALL_BUCKETS, registry=r,
        )  # fmt: skip
        self.store_failures = Counter(
            "gateway_store_failures", "Residency-store calls that failed (Redis errors and timeouts)",
            ["store", "op"], registry=r,
        )  # fmt: skip
        self.db_time = Histogram(
            "gateway_db_duration", "Database statements", ["op"], unit="seconds", buckets=CALL_BUCKETS,
            registry=r,
        )  # fmt: skip
        self.db_failures = Counter("gateway_db_failures", "Database statements that failed", ["op"], registry=r)
        # Labelled children, looked up once: labels() validates and locks on every call.
        self._children: dict[tuple[Any, tuple[str, ...]], Any] = {}

    def _child(self, metric: Any, labels: tuple[str, ...]) -> Any:
        key = (metric, labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def observe(self, facts: RequestFacts, status: int, ended: float) -> None:
        """One finished request (however it ended)."""
        op = facts.operation
        model = self.models(facts.model) if facts.model else ""
        who: tuple[str, ...] = (model,)
        tenant: tuple[str, ...] = ()
        if self.tenant_label:
            tenant = (self.tenants(facts.tenant) if facts.tenant else "",)
            who = (*tenant, model)
        self._child(self.requests, (*who, facts.backend, str(status), facts.error_type)).inc()
        self._child(self.duration, (op, model, facts.error_type)).observe(ended - facts.started)
        if status == 429:
            self._child(self.rate_limited, (*tenant, facts.limit or "other")).inc()
        if facts.prompt_tokens:
            self._child(self.tokens, (*who, "input")).inc(facts.prompt_tokens)
        if facts.completion_tokens:
            self._child(self.tokens, (*who, "output")).inc(facts.completion_tokens)
        if facts.first_token is not None and not facts.error_type:  # of successful responses
            self._child(self.ttft, (op, model)).observe(facts.first_token - facts.started)
            if facts.completion_tokens > 1:
                per_token = (ended - facts.first_token) / (facts.completion_tokens - 1)
                self._child(self.tpot, (op, model)).observe(per_token)
        upstream = 0.0
        if facts.upstream_started is not None:
            upstream = (facts.upstream_ended or ended) - facts.upstream_started
        overhead = ended - facts.started - upstream - facts.placement_s
        self._child(self.overhead, (op,)).observe(max(0.0, overhead))

    def placed(self, seconds: float, outcome: str) -> None:
        self._child(self.placement, (outcome,)).observe(seconds)

    # Residency events (app.routing): each is one counter increment.
    def loaded(self, backend: str, seconds: float | None) -> None:
        """A load ended: `seconds` it took, or None if it failed."""
        self._child(self.loads, (backend, "ok" if seconds is not None else "failed")).inc()
        if seconds is not None:
            self._child(self.load_time, (backend,)).observe(seconds)

    def unloaded(self, backend: str, reason: str) -> None:
        self._child(self.unloads, (backend, reason)).inc()
        if reason == "evicted":
            self._child(self.evictions, (backend,)).inc()

    def lookup(self, hit: bool) -> None:
        self._child(self.cache, ("hit" if hit else "miss",)).inc()

    def waited_for_load(self, base_model: str) -> None:
        self._child(self.single_flight, (base_model,)).inc()

    def waiting(self, base_model: str, delta: int) -> None:
        self._child(self.waiters, (base_model,)).inc(delta)

    def store_call(self, store: str, op: str, seconds: float, failed: bool) -> None:
        self._child(self.store_time, (store, op)).observe(seconds)
        if failed:
            self._child(self.store_failures, (store, op)).inc()

    def db_call(self, op: str, seconds: float | None) -> None:
        """A statement ended: `seconds` it took, or None if it failed."""
        if seconds is None:
            self._child(self.db_failures, (op,)).inc()
        else:
            self._child(self.db_time, (op,)).observe(seconds)

    def watch_database(self, engine: Any) -> None:
        """Time every statement of an (async) SQLAlchemy engine, failures counted apart."""
        from sqlalchemy import event

        sync = getattr(engine, "sync_engine", engine)
        ops = {"select", "insert", "update", "delete"}

        def op_of(statement: str) -> str:
            word = statement.lstrip().split(None, 1)[0].lower() if statement.strip() else ""
            return word if word in ops else "other"

        @event.listens_for(sync, "before_cursor_execute")
        def _before(conn: Any, cursor: Any, statement: str, *_: Any) -> None:
            conn.info.setdefault("lgw_started", []).append(time.monotonic())

        @event.listens_for(sync, "after_cursor_execute")
        def _after(conn: Any, cursor: Any, statement: str, *_: Any) -> None:
            started = conn.info.get("lgw_started")
            if started:
                self.db_call(op_of(statement), time.monotonic() - started.pop())

        @event.listens_for(sync, "handle_error")
        def _error(context: Any) -> None:
            started = context.connection.info.get("lgw_started") if context.connection is not None else None
            if started:
                started.pop()
            self.db_call(op_of(context.statement or ""), None)

    async def refresh_fleet(self, sample: Callable[[], Awaitable[FleetSample]], max_age_s: float = 5.0) -> None:
        """Read the fleet's state for the next scrape, at most every `max_age_s` (scrapes from several
        Prometheus replicas cost one read); a failed read keeps the last sample."""
        now = time.monotonic()
        if now - self._fleet_at < max_age_s:
            return
        self._fleet_at = now
        self.fleet.sample = await sample()

    def scrape(self) -> bytes:
        """The exposition text; re-ranks the model and tenant labels first when it is time."""
        mp = self.multiprocess
        if mp is not None:
            from prometheus_client import multiprocess

            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry, path=mp)  # type: ignore[no-untyped-call]
            registry.register(self.fleet)
            return generate_latest(registry)
        self._drop(self.models.rerank(), "gen_ai_request_model")
        if self.tenant_label:
            self._drop(self.tenants.rerank(), "tenant")
        return generate_latest(self.registry)

    def _drop(self, values: Iterable[str], label: str) -> None:
        values = set(values)
        if not values:
            return
        for (metric, labels) in list(self._children):
            names = metric._labelnames
            if label in names and labels[names.index(label)] in values:
                metric.remove(*labels)
                del self._children[metric, labels]

    def series(self) -> int:
        """How many labelled series exist now (for the cardinality bound's test and operators)."""
        return len(self._children)
