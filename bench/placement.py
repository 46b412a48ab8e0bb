"""Placement simulator: the judged workloads of a LoRA fleet, vLLM alone or behind the gateway's policies.

It decides how placement policies are judged before they meet a GPU. A seeded, deterministic
discrete-event simulation of the gateway (app/routing/router.py's flow, with the real policy classes of
app/routing/policy.py deciding on BackendState snapshots) in front of vLLM engines modelled step by step
(bench/vllm_engine.py: vLLM's own scheduler, which runs at most --max-loras distinct adapters per step
and keeps the rest waiting inside vLLM; step costs fitted to H200 measurements from bench/gpu/).

Sides (each run of a workload compares them):
- `single`: one adapter on every replica, requests round-robin: the reference rate of "fraction";
- `direct`: vLLM alone, every replica holding every adapter, requests round-robin, no gateway;
- any policy name of app/routing/policy.py (`lru`, `affinity`, `round-robin`, ...): the gateway.
Judged workloads (issue 8): Zipf(1.0) over 64 adapters on 2 replicas x 8 slots sharing one GPU (the
H200 set-up of bench/gpu/) and over 200 adapters on 4 backends x 8 slots (one GPU each); closed loop at
1x and 2x the fleet's seats, open loop at 50% and 80% of the single-adapter rate.

    .venv/bin/python -m bench.placement                       # judged workloads, table, PASS/MISS
    .venv/bin/python -m bench.placement --fleet gpu --runs closed:1 --sides direct,lru,pack
    .venv/bin/python -m bench.placement --gpu-results results.jsonl   # beside the GPU's figures
"""

from __future__ import annotations

import argparse
import heapq
import itertools
import json
import math
import sys
import time
from collections import Counter, deque
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace

import numpy as np

from app.residency.state import BackendSlots, BackendState
from app.routing.policy import Action, PlacementPolicy, PolicyName, Request, make_policy
from app.settings import Settings
from bench.vllm_engine import Engine, EngineCost, EngineRequest

WAIT_TIMEOUT_S: float = Settings.model_fields["PLACEMENT_WAIT_S"].default
PATIENCE_S: float = Settings.model_fields["PLACEMENT_PATIENCE_S"].default
PROMPT_TOKENS, OUTPUT_TOKENS = 256, 128
OPEN_DRAIN_S = 60.0  # as bench/gpu/fleet.py's open-loop runs
DIRECT, SINGLE = "direct", "single"


@dataclass(frozen=True, slots=True)
class Fleet:
    name: str
    adapters: int
    tenants: int
    backends: int
    per_gpu: int  # replicas sharing one GPU
    slots: int = 8  # --max-loras
    seats: int = 64  # --max-num-seqs, registered as max_num_seqs
    # Registered capacity: vLLM's --max-cpu-loras (its host cache; 64 rank-16 adapters of a 7B are 1.7 GB).
    capacity: int = 64


FLEETS = {
    "gpu": Fleet("gpu", adapters=64, tenants=4, backends=2, per_gpu=2),
    "large": Fleet("large", adapters=200, tenants=20, backends=4, per_gpu=1),
}


@dataclass(frozen=True, slots=True)
class Workload:
    fleet: Fleet
    loop: str  # "closed" (level: clients per fleet seat) or "open" (level: share of the single rate)
    level: float
    seconds: float = 240.0  # measured
    warm: float = 30.0
    zipf_s: float = 1.0
    seed: int = 1

    @property
    def label(self) -> str:
        return f"{self.loop}:{self.level:g}"


@dataclass(slots=True, eq=False)
class SimRequest:
    adapter: str
    tenant: str
    client: int  # closed loop: who sent it; -1 open loop
    arrival: float
    first_token: float = math.nan
    done: float = math.nan
    failed: bool = False  # the gateway answered 503 after the wait limit
    sent: float = math.nan  # when the gateway sent it to a backend (or began loading for it)
    backend: int = -1


@dataclass(slots=True, eq=False)
class SimBackend:
    index: int
    gpu: int
    state: BackendState
    engine: Engine
    ops: deque[tuple[SimRequest, str | None]] = field(default_factory=deque)  # runtime loads, in order
    in_op: bool = False
    loads: int = 0
    unloads: int = 0


@dataclass(slots=True)
class Result:
    side: str
    workload: str
    goodput_tok_s: float
    fraction: float | None
    p50_s: float | None
    p99_s: float | None
    ttft_p50_s: float | None
    ttft_p99_s: float | None
    failed: int  # requests the gateway answered 503 (waited past the limit)
    requests: int
    loads: int
    unloads: int
    mean_running: float  # per backend, time-average
    mean_waiting_vllm: float
    mean_waiting_gateway: float
    wall_s: float


_ARRIVE, _STEP, _OP, _TICK, _SUBMIT, _DONE = 0, 1, 2, 3, 4, 5


class Simulator:
    def __init__(self, wl: Workload, side: str, cost: EngineCost, single_rate: float | None) -> None:
        self.wl, self.side, self.cost = wl, side, cost
        f = wl.fleet
        rng = np.random.default_rng(wl.seed)
        self.names = [f"a{i:03d}" for i in range(f.adapters)]  # a000 is the hottest
        self.owner = {a: f"t{i % f.tenants:02d}" for i, a in enumerate(self.names)}
        p = 1.0 / np.arange(1, f.adapters + 1, dtype=float) ** wl.zipf_s
        n_draw = 200_000
        if side == SINGLE:
            self.sequence = [self.names[0]] * n_draw
        else:
            self.sequence = [self.names[i] for i in rng.choice(f.adapters, size=n_draw, p=p / p.sum())]
        u = rng.uniform(0.0, 1.0, size=20_000)
        self.load_s = [cost.draw(cost.load, x) for x in u]
        self.load_shared_s = [cost.draw(cost.load_shared, x) for x in u]
        if wl.loop == "open":
            if single_rate is None:
                raise ValueError("open loop needs the single-adapter rate")
            rate = wl.level * single_rate / OUTPUT_TOKENS
            self.gaps = rng.exponential(1.0 / rate, size=n_draw).tolist()
        self.policy: PlacementPolicy | None = None
        # `<policy>@<capacity>`: that policy with the backends registered at that capacity.
        name, _, cap = side.partition("@")
        capacity = int(cap) if cap else f.capacity
        if side not in (DIRECT, SINGLE):
            # Replicas sharing a GPU load one at a time (GATEWAY_PLACEMENT_POOL_LOADS=1, as bench/gpu runs).
            self.policy = make_policy(name, pool_loads=1 if f.per_gpu > 1 else None)
        target = self.policy.target(f.slots) if self.policy else f.slots
        self.backends = [
            SimBackend(
                i,
                i // f.per_gpu,
                BackendState(id=f"b{i}", slots=f.slots, capacity=capacity, seats=f.seats),
                Engine(f.slots, f.seats, cost),
            )
            for i in range(f.backends)
        ]
        self.slots = [BackendSlots(b.state.id, f.slots, capacity, f.seats, target) for b in self.backends]
        self.states = [b.state for b in self.backends]
        self.by_id = {b.state.id: b for b in self.backends}
        if self.policy is None:  # vLLM alone holds every adapter (or the one) up front
            for b in self.backends:
                b.state.registered = dict.fromkeys(self.names[:1] if side == SINGLE else self.names, 0.0)
        self.rr = itertools.count()
        self.events: list[tuple[float, int, int, int, object]] = []
        self.seq = 0
        self.issued = 0
        self.requests: list[SimRequest] = []
        self.waiting: deque[SimRequest] = deque()  # in the gateway, oldest first
        self.waiting_count: Counter[str] = Counter()
        self.tokens: list[tuple[float, int]] = []  # (time, tokens) of each step end, for goodput
        self.samples: list[tuple[int, int, int]] = []  # (running, waiting in vLLM, waiting in gateway)
        self.end = wl.warm + wl.seconds

    # --- plumbing

    def _push(self, t: float, kind: int, i: int, payload: object = None) -> None:
        self.seq += 1
        heapq.heappush(self.events, (t, self.seq, kind, i, payload))

    def _kick(self, b: SimBackend, now: float) -> None:
        """Starts the engine's next step (or the runtime load queued first) if it is idle."""
        if b.ops and not b.in_op and not b.engine.in_step:
            # Between steps: the engine takes the load now and steps no more until it is done.
            shared = any(o.in_op for o in self.backends if o.gpu == b.gpu and o is not b)
            draws = self.load_shared_s if shared else self.load_s
            b.in_op = True
            self._push(now + draws[b.loads % len(draws)], _OP, b.index)
        if b.engine.in_step or b.in_op:
            return
        sharing = 1 + sum(1 for o in self.backends if o.gpu == b.gpu and o is not b and o.engine.in_step)
        c = b.engine.begin_step(sharing)
        if c is None:
            return
        self._push(now + c, _STEP, b.index)

    # --- the gateway (app/routing/router.py)

    def _issue(self, now: float, client: int) -> None:
        adapter = self.sequence[self.issued]
        self.issued += 1
        req = SimRequest(adapter, self.owner[adapter], client, now)
        self.requests.append(req)
        if self.policy is None:
            b = self.backends[next(self.rr) % len(self.backends)]
            self._send(req, b, now)
            return
        if not self._place(req, now, fresh=True):
            self.waiting.append(req)
            self.waiting_count[adapter] += 1

    def _request(self, req: SimRequest, now: float) -> Request:
        overfill = PATIENCE_S < now - req.arrival
        return Request(
            req.adapter, req.tenant, overfill=overfill, waiting=self.waiting_count, waited_s=now - req.arrival
        )

    def _touch(self, adapter: str) -> SimBackend | None:
        """MemoryResidency.touch: a holder where BackendSlots.has_room holds, active there first,
        then the fewest requests."""
        best: tuple[tuple[bool, int], SimBackend] | None = None
        for b, slots in zip(self.backends, self.slots, strict=True):
            s = b.state
            if adapter not in s.registered:
                continue
            mine = s.inflight.get(adapter, 0)
            key = (mine == 0, s.requests)
            if slots.has_room(mine=mine, requests=s.requests, taken=s.slots_taken) and (
                best is None or key < best[0]
            ):
                best = (key, b)
        return None if best is None else best[1]

    def _place(self, req: SimRequest, now: float, fresh: bool = False) -> bool:
        assert self.policy is not None
        if self.policy.prefers_live and not self.waiting_count:
            holder = self._touch(req.adapter)
            if holder is not None:
                self._send(req, holder, now)
                return True
        d = self.policy.decide(self._request(req, now), self.states)
        if d.action is Action.WAIT or (fresh and d.action is Action.LOAD and self.waiting):
            return False  # a new arrival's load waits behind older waiters (Router._has_waiters)
        assert d.backend is not None
        b = self.by_id[d.backend]
        if d.action is Action.USE:
            assert req.adapter in b.state.registered, f"{self.side}: USE of an unregistered adapter"
            self._send(req, b, now)
        else:
            self._load(req, b, d.evict, now)
        return True

    def _send(self, req: SimRequest, b: SimBackend, now: float) -> None:
        if math.isnan(req.sent):
            req.sent, req.backend = now, b.index
        s = b.state
        s.registered[req.adapter] = now
        s.inflight[req.adapter] = s.inflight.get(req.adapter, 0) + 1
        # The API server's own time before the engine sees it (and after its last token, below).
        self._push(
            now + self.cost.request_overhead / 2,
            _SUBMIT,
            b.index,
            EngineRequest(req.adapter, PROMPT_TOKENS, OUTPUT_TOKENS, req),
        )

    def _load(self, req: SimRequest, b: SimBackend, victim: str | None, now: float) -> None:
        """`reserve` (its checks as assertions), then the runtime load queued on the engine."""
        s, a = b.state, req.adapter
        assert a not in s.registered and a not in s.loading and a not in s.evicting, f"{self.side}: LOAD {a}"
        if victim is not None:
            assert victim in s.registered and victim not in s.inflight, f"{self.side}: victim {victim} busy"
            del s.registered[victim]
            s.tenants.pop(victim, None)
            s.evicting.add(victim)
        assert s.occupied < s.capacity, f"{self.side}: LOAD on a full backend without a victim"
        s.loading.add(a)
        s.tenants[a] = req.tenant
        b.loads += 1
        b.ops.append((req, victim))
        self._kick(b, now)

    def _op_done(self, b: SimBackend, now: float) -> None:
        req, victim = b.ops.popleft()
        b.in_op = False
        s = b.state
        if victim is not None:
            s.evicting.discard(victim)
            b.unloads += 1
        s.loading.discard(req.adapter)
        self._send(req, b, now)  # commit registers it and leases it for the request that loaded it

    def _retry(self, now: float) -> None:
        """The dispatcher's pass: oldest first; a WAIT holds for the adapter's other waiters."""
        if not self.waiting or self.policy is None:
            return
        pending, self.waiting = self.waiting, deque()
        blocked: set[tuple[str, bool]] = set()
        for req in pending:
            if now - req.arrival > WAIT_TIMEOUT_S:
                self._fail(req, now)
                continue
            key = (req.adapter, PATIENCE_S < now - req.arrival)
            if key in blocked or not self._place(req, now):
                blocked.add(key)
                self.waiting.append(req)
            else:
                self._uncount(req.adapter)

    def _uncount(self, adapter: str) -> None:
        self.waiting_count[adapter] -= 1
        if not self.waiting_count[adapter]:
            del self.waiting_count[adapter]

    def _fail(self, req: SimRequest, now: float) -> None:
        req.failed, req.done = True, now
        self._uncount(req.adapter)
        self._next(req, now)

    def _next(self, req: SimRequest, now: float) -> None:
        if self.wl.loop == "closed" and now < self.end:
            self._push(now, _ARRIVE, req.client)

    # --- the run

    def run(self) -> None:
        wl, f = self.wl, self.wl.fleet
        if wl.loop == "closed":
            clients = round(wl.level * f.backends * f.seats)
            rng = np.random.default_rng(wl.seed + 100)
            for c, t in enumerate(rng.uniform(0.0, 0.1, size=clients)):
                self._push(float(t), _ARRIVE, c)
        else:
            self._push(self.gaps[0], _ARRIVE, -1)
        self._push(0.0, _TICK, 0)
        # Open loop: arrivals stop at the window's end, then the run goes on for OPEN_DRAIN_S so that
        # the window's late requests end and count in the latencies (bench/gpu/load.py's drain_s).
        stop = self.end + (OPEN_DRAIN_S if wl.loop == "open" else 0.0)
        while self.events:
            now, _, kind, i, _payload = heapq.heappop(self.events)
            if now > stop:
                break
            if kind == _ARRIVE:
                if now > self.end:
                    continue
                self._issue(now, i)
                if wl.loop == "open":
                    self._push(now + self.gaps[self.issued], _ARRIVE, -1)
            elif kind == _STEP:
                b = self.backends[i]
                done = b.engine.end_step(now)
                self.tokens.append((now, len(done) + len(b.engine.running)))
                for er in done:
                    req = er.payload
                    assert isinstance(req, SimRequest)
                    req.first_token = er.first_token + self.cost.request_overhead / 2
                    s = b.state
                    left = s.inflight[req.adapter] - 1
                    if left:
                        s.inflight[req.adapter] = left
                    else:
                        del s.inflight[req.adapter]
                    self._push(now + self.cost.request_overhead / 2, _DONE, b.index, req)
                self._kick(b, now)
                # The other replicas of this GPU were slowed by this step while it ran: their next
                # steps see the change when they begin (processor sharing, decided per step).
                if done:
                    self._retry(now)
            elif kind == _SUBMIT:
                b = self.backends[i]
                assert isinstance(_payload, EngineRequest)
                b.engine.submit(_payload)
                self._kick(b, now)
            elif kind == _DONE:
                req = _payload
                assert isinstance(req, SimRequest)
                req.done = now
                self._next(req, now)
            elif kind == _OP:
                self._op_done(self.backends[i], now)
                self._retry(now)
            else:  # the dispatcher's tick: timeouts, and a sample of the queues
                self._retry(now)
                if wl.warm <= now <= self.end:
                    self.samples.append(
                        (
                            sum(len(b.engine.running) for b in self.backends),
                            sum(len(b.engine.waiting) for b in self.backends),
                            len(self.waiting),
                        )
                    )
                self._push(now + 0.25, _TICK, 0)

    def result(self, single_rate: float | None, wall: float) -> Result:
        wl = self.wl
        w0, w1 = wl.warm, self.end
        if wl.loop == "closed":
            inside = [r for r in self.requests if w0 <= r.done <= w1]
        else:
            inside = [r for r in self.requests if w0 <= r.arrival <= w1]
        ok = [r for r in inside if not r.failed and not math.isnan(r.done)]
        lat = [r.done - r.arrival for r in ok]
        ttft = [r.first_token - r.arrival for r in ok]
        if wl.loop == "closed":
            # Every token the fleet made in the window.
            goodput = sum(n for t, n in self.tokens if w0 <= t <= w1) / (w1 - w0)
        else:
            # As bench/gpu/load.py counts it: the tokens of the requests that arrived in the window and
            # were served by its end. A backlog left by the warm-up, served in the window, does not
            # count, nor does a request that arrived in it and ended after it.
            goodput = sum(OUTPUT_TOKENS for r in ok if r.done <= w1) / (w1 - w0)
        n_b = len(self.backends)
        samples = np.array(self.samples or [(0, 0, 0)], dtype=float)
        return Result(
            side=self.side,
            workload=wl.label,
            goodput_tok_s=round(goodput, 1),
            fraction=None if not single_rate else round(goodput / single_rate, 3),
            p50_s=_pct(lat, 50),
            p99_s=_pct(lat, 99),
            ttft_p50_s=_pct(ttft, 50),
            ttft_p99_s=_pct(ttft, 99),
            failed=sum(1 for r in inside if r.failed),
            requests=len(inside),
            loads=sum(b.loads for b in self.backends),
            unloads=sum(b.unloads for b in self.backends),
            mean_running=round(float(samples[:, 0].mean()) / n_b, 1),
            mean_waiting_vllm=round(float(samples[:, 1].mean()) / n_b, 1),
            mean_waiting_gateway=round(float(samples[:, 2].mean()), 1),
            wall_s=round(wall, 1),
        )


def _pct(xs: Sequence[float], q: float) -> float | None:
    return round(float(np.percentile(xs, q)), 3) if xs else None


def simulate(wl: Workload, side: str, cost: EngineCost, single_rate: float | None) -> Result:
    t = time.perf_counter()
    sim = Simulator(wl, side, cost, single_rate)
    sim.run()
    return sim.result(single_rate, time.perf_counter() - t)


# --- judged workloads and goals (issue 8)

JUDGED_RUNS = ("closed:1", "closed:2", "open:0.5", "open:0.8")
BASELINES = (DIRECT, PolicyName.AFFINITY.value)
DEFAULT_SIDES = (DIRECT, "affinity", "lru", "round-robin", "pack")
PRODUCT = PolicyName.PACK.value
GOAL_FRACTION_1X = 0.70  # closed loop at 1x seats on the H200 fleet


def judge(fleet: Fleet, wl_label: str, results: list[Result]) -> list[tuple[bool, str]]:
    """The product policy vs the baselines on one workload: no gateway-made 503s, goodput and p99 both
    better than the best baseline's; at 1x seats on the GPU fleet, >= GOAL_FRACTION_1X."""
    by = {r.side: r for r in results}
    me = by.get(PRODUCT)
    base = [by[b] for b in BASELINES if b in by]
    if me is None or not base:
        return []
    out = [(me.failed == 0, f"{PRODUCT} fails no request ({me.failed} 503s)")]
    best_goodput = max(b.goodput_tok_s for b in base)
    # 1% is the run-to-run noise of goodput in the simulator (and well below the GPU's).
    out.append(
        (
            me.goodput_tok_s >= 0.99 * best_goodput,
            (
                f"{PRODUCT} goodput {me.goodput_tok_s:.0f} >= best baseline {best_goodput:.0f} "
                f"({me.goodput_tok_s / best_goodput - 1:+.0%}; 1% tolerance)"
            ),
        )
    )
    best_p99 = min(b.p99_s for b in base if b.p99_s is not None)
    if me.p99_s is not None:
        out.append(
            (
                me.p99_s <= best_p99 * 1.01,
                f"{PRODUCT} p99 {me.p99_s:.2f} s <= best baseline {best_p99:.2f} s ({me.p99_s / best_p99 - 1:+.0%})",
            )
        )
    if fleet.name == "gpu" and wl_label == "closed:1" and me.fraction is not None:
        out.append(
            (
                me.fraction >= GOAL_FRACTION_1X,
                f"{PRODUCT} {me.fraction:.3f} of the single-adapter rate >= {GOAL_FRACTION_1X}",
            )
        )
    return out


def render(fleet: Fleet, wl: Workload, results: list[Result], gpu: dict[str, dict[str, object]]) -> str:
    head = (
        f"{fleet.name}: Zipf({wl.zipf_s:g}) over {fleet.adapters} adapters of {fleet.tenants} tenants, "
        f"{fleet.backends} backends x {fleet.slots} slots x {fleet.seats} seats ({fleet.per_gpu} per GPU), "
        f"capacity {fleet.capacity}; {wl.label} ({'x seats' if wl.loop == 'closed' else 'x single rate'}); "
        f"{wl.seconds:g} s measured after {wl.warm:g} s; seed {wl.seed}"
    )
    cols = (
        f"{'side':<12} {'tok/s':>6} {'frac':>5} {'p50 s':>6} {'p99 s':>6} {'ttft50':>6} {'ttft99':>6} "
        f"{'503s':>5} {'loads':>5} {'run/b':>5} {'vq/b':>5} {'gwq':>5}"
    )
    if gpu:
        cols += f" | {'GPU tok/s':>9} {'sim/GPU':>7} {'GPU p99':>7} {'GPU 503':>7}"
    lines = [head, cols]
    for r in results:
        line = (
            f"{r.side:<12} {r.goodput_tok_s:>6.0f} {r.fraction or 0:>5.3f} {r.p50_s or 0:>6.2f} "
            f"{r.p99_s or 0:>6.2f} {r.ttft_p50_s or 0:>6.2f} {r.ttft_p99_s or 0:>6.2f} {r.failed:>5d} "
            f"{r.loads:>5d} {r.mean_running:>5.1f} {r.mean_waiting_vllm:>5.1f} {r.mean_waiting_gateway:>5.1f}"
        )
        g = gpu.get(r.side)
        if g:
            gt = float(g["goodput_tok_s"])  # type: ignore[arg-type]
            fails = sum(dict(g.get("failed") or {}).values())  # type: ignore[call-overload]
            ratio = f"{r.goodput_tok_s / gt:>7.2f}" if gt else f"{'-':>7}"
            line += f" | {gt:>9.0f} {ratio} {g.get('p99_s') or 0:>7.2f} {fails:>7d}"
        lines.append(line)
    return "\n".join(lines)


def load_gpu(path: str | None) -> dict[str, dict[str, dict[str, object]]]:
    """bench/gpu/fleet.py's results: workload label -> side -> figures (the last run of each wins)."""
    out: dict[str, dict[str, dict[str, object]]] = {}
    if not path:
        return out
    with open(path) as f:
        for line in f:
            d = json.loads(line)
            if d.get("kind") != "run":
                continue
            side = str(d["side"])
            side = side.removeprefix("gw-")
            if side not in ("single", "direct") and "@" not in side:
                side += "@16"  # fleet.py registers the backends at capacity 16 unless told
            out.setdefault(f"{d['loop']}:{float(d['level']):g}", {})[side] = d
    return out


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=(__doc__ or "").split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--fleet", default="gpu,large", help=f"comma list of {', '.join(FLEETS)}")
    ap.add_argument("--runs", default=",".join(JUDGED_RUNS), help="comma list of closed:X / open:Y")
    ap.add_argument("--sides", default=",".join(DEFAULT_SIDES), help="direct, single, or policy names")
    ap.add_argument("--seconds", type=float, default=120.0)
    ap.add_argument("--warm", type=float, default=20.0)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--gpu-results", help="bench/gpu/fleet.py's results.jsonl, to print beside (gpu fleet)")
    ap.add_argument("--json", metavar="FILE", help="also write every result as JSON")
    ap.add_argument(
        "--load-s",
        help="a runtime load's duration range LO,HI in seconds, alone on its GPU (default: EngineCost.load)",
    )
    ap.add_argument("--capacity", type=int, help="every backend's registered capacity (default: the fleet's)")
    args = ap.parse_args(argv)
    cost = EngineCost()
    if args.load_s:
        lo, hi = (float(x) for x in args.load_s.split(","))
        cost = replace(cost, load=((0.0, lo), (1.0, hi)))
    gpu = load_gpu(args.gpu_results)
    ok, everything = True, []
    for fname in args.fleet.split(","):
        fleet = FLEETS[fname.strip()]
        if args.capacity:
            fleet = replace(fleet, capacity=args.capacity)
        base = Workload(fleet, "closed", 1.0, seconds=args.seconds, warm=args.warm, seed=args.seed)
        single = simulate(base, SINGLE, cost, None)
        print(  # noqa: T201
            f"{fleet.name}: single-adapter rate {single.goodput_tok_s:.0f} tok/s "
            f"(closed loop at 1x seats, one adapter on every replica)\n",
            flush=True,
        )
        for run in args.runs.split(","):
            loop, level = run.strip().split(":")
            wl = replace(base, loop=loop, level=float(level))
            results = [simulate(wl, s.strip(), cost, single.goodput_tok_s) for s in args.sides.split(",")]
            text = render(fleet, wl, results, gpu.get(wl.label, {}) if fleet.name == "gpu" else {})
            verdicts = judge(fleet, wl.label, results)
            for passed, what in verdicts:
                ok &= passed
                text += f"\n{'PASS' if passed else 'MISS'}  {what}"
            print(text + "\n", flush=True)  # noqa: T201
            everything.append(
                {
                    "fleet": asdict(fleet),
                    "workload": wl.label,
                    "single_tok_s": single.goodput_tok_s,
                    "results": [asdict(r) for r in results],
                }
            )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(everything, f, indent=2)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
