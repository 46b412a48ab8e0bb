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
import time
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

OTHER = "other"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# The conventions' advised bucket boundaries (seconds).
DURATION_BUCKETS = (0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92)
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)
TPOT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
# The gateway's own time per request: tens of microseconds to a few milliseconds.
OVERHEAD_BUCKETS = (0.0001, 0.00025, 0.0005, 0.00075, 0.001, 0.0015, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5)
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
        self.tenant_label = tenant_label
        self.models = TopLabels(max_models, rerank_s=rerank_s)
        self.tenants = TopLabels(max_tenants, rerank_s=rerank_s)
        r = self.registry
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
        if self.tenant_label:
            who = (self.tenants(facts.tenant) if facts.tenant else "", model)
        self._child(self.requests, (*who, facts.backend, str(status), facts.error_type)).inc()
        self._child(self.duration, (op, model, facts.error_type)).observe(ended - facts.started)
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

    def scrape(self) -> bytes:
        """The exposition text; re-ranks the model and tenant labels first when it is time."""
        self._drop(self.models.rerank(), "gen_ai_request_model")
        if self.tenant_label:
            self._drop(self.tenants.rerank(), "tenant")
        return generate_latest(self.registry)

    def _drop(self, values: set[str], label: str) -> None:
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

