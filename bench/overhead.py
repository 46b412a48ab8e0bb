"""What the gateway adds to a request: the same load straight to an upstream and through the gateway.

It decides how the proxy overhead is measured and judged. One gateway worker runs pinned to one CPU;
the upstream and every load generator share the other CPU, so the gateway's figures describe one
core. Each figure is measured direct and through the gateway in the same run (alternating rounds,
since this VM's speed drifts) and reported as a difference or ratio against the direct baseline:

- max req/s: closed loop, C keep-alive connections (wrk; a Python loop when wrk is missing);
- latency p50/p99 at a fixed open-loop rate (default 300 req/s);
- streaming first-byte latency, one client, sequential requests.

Upstreams: (a) bench/fake_upstream.py, a vLLM-shaped server that costs next to nothing, for the
gateway's own cost, judged against the goals below; (b) with --vllm, the vLLM CPU server with a tiny
model and adapter, at a low rate, for the overhead as users will see it.

    .venv/bin/python -m bench.overhead [--vllm] [--json results.json]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import os
import re
import shutil
import socket
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Coroutine, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx

from bench import loadgen, profile, provision
from bench.loadgen import Latencies, Target, Throughput
from bench.procs import (
    Child,
    ProcessError,
    check_cpus,
    cpu_busy_seconds,
    exit_on_sigterm,
    group_cpu_seconds,
    own_cpu_seconds,
    pinned,
    threads_outside,
)

REPO = Path(__file__).resolve().parent.parent
FAKE_UPSTREAM = Path(__file__).resolve().parent / "fake_upstream.py"
LIMITED_TENANT = "bench-limited"  # with --tenant-limits: the tenant whose requests are counted
BASE_MODEL = "tiny-llama"
# Shapes the fake adapter is checked against: module -> [in_features, out_features].
FAKE_SHAPES = {"q_proj": [64, 64], "v_proj": [64, 32]}
PROMPT = [{"role": "user", "content": "Say hello to the gateway benchmark in a few words."}]

T = TypeVar("T")


@dataclass(frozen=True)
class Goal:
    text: str
    measured: float
    limit: float
    higher_is_better: bool
    unit: str

    @property
    def passed(self) -> bool:
        return self.measured >= self.limit if self.higher_is_better else self.measured <= self.limit


@dataclass(frozen=True)
class Plan:
    """How hard and how long to push one scenario."""

    connections: int
    throughput_s: float
    rate: float
    latency_s: float
    stream_requests: int
    rounds: int
    max_tokens: int


@dataclass
class Comparison:
    """Every figure of one scenario, direct and through the gateway."""

    scenario: str
    route: str
    plan: Plan
    direct_model: str
    throughput: dict[str, list[Throughput]] = field(default_factory=dict)
    gateway_cpu_busy: list[float] = field(default_factory=list)  # share of one core, per gateway round
    # Gateway CPU seconds per request in its max-load rounds, per side ("gateway", and "limits" with
    # --tenant-limits): unlike req/s, this barely moves when other processes take part of the gateway's
    # core, so it is the steadier cost figure.
    cpu_per_request: dict[str, list[float]] = field(default_factory=dict)
    latency: dict[str, Latencies] = field(default_factory=dict)
    first_byte: dict[str, Latencies] = field(default_factory=dict)
    # Share of each CPU that processes outside this run (and the hypervisor) took while it measured.
    foreign_cpu: dict[str, float] = field(default_factory=dict)
    profile: str = ""  # py-spy summary of the gateway at max load, with --profile
    # Every request sent per side (warm-ups included) and the failed ones by cause.
    sent: Counter[str] = field(default_factory=Counter)
    failures: dict[str, Counter[str]] = field(default_factory=dict)
    # What the gateway's own log says went wrong: non-2xx answers on /v1 and messages outside the
    # access log (warnings, tracebacks' last lines), each with its count.
    gateway_log: Counter[str] = field(default_factory=Counter)

    def count(self, label: str, errors: Mapping[str, int], total: int) -> None:
        """Keep a measurement's failures; too many void the run (loadgen.ensure_mostly_ok)."""
        self.sent[label] += total
        self.failures.setdefault(label, Counter()).update(errors)
        loadgen.ensure_mostly_ok(f"{self.scenario}, {label}", errors, total)

    def best_rps(self, side: str) -> float:
        return max(t.rps for t in self.throughput[side])


# --- running things ----------------------------------------------------------------------------------


def run_async(coro: Coroutine[Any, Any, T]) -> T:
    """Run one measurement on a fresh loop, uvloop when installed (both sides get the same client)."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def log(message: str) -> None:
    print(f"-- {message}", file=sys.stderr, flush=True)  # noqa: T201 (progress on stderr, results on stdout)


@contextlib.contextmanager
def started(child: Child, ready_url: str, timeout_s: float = 60) -> Iterator[Child]:
    with child:
        child.wait_http(ready_url, timeout_s=timeout_s)
        yield child


def targets(
    *,
    route: str,
    gateway: str,
    upstream: str,
    tenant_key: str,
    adapter: str,
    direct_model: str,
    max_tokens: int,
    stream: bool,
) -> tuple[Target, Target]:
    """The same request direct and through the gateway; only URL and `model` differ."""
    # Both sides carry the same headers, so that request sizes match; the upstream ignores the key.
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {tenant_key}"}
    if route == "models":
        return (
            Target("direct", f"{upstream}/v1/models", "GET", headers),
            Target("gateway", f"{gateway}/v1/models", "GET", headers),
        )

    def body(model: str) -> bytes:
        payload: dict[str, Any] = {"model": model, "messages": PROMPT, "max_tokens": max_tokens}
        if stream:
            payload["stream"] = True
        # temperature 0: on vLLM both sides then generate the same tokens, so the work is equal.
        payload["temperature"] = 0
        return json.dumps(payload, separators=(",", ":")).encode()

    path = "/v1/chat/completions"
    return (
        Target("direct", f"{upstream}{path}", "POST", headers, body(direct_model)),
        Target("gateway", f"{gateway}{path}", "POST", headers, body(adapter)),
    )


_INFO_JSON = re.compile(r'^\{.*"level":"(info|debug)"')  # the gateway's JSON log: a record, not a problem
_ACCESS = re.compile(r'"(?P<method>[A-Z]+) (?P<path>/v1/\S+) HTTP/[\d.]+" (?P<status>\d{3})')


def read_gateway_log(path: Path) -> Counter[str]:
    """Non-2xx /v1 answers and the lines that are neither access log nor traceback frames."""
    found: Counter[str] = Counter()
    if not path.exists():
        return found
    for line in path.read_text(errors="replace").splitlines():
        access = _ACCESS.search(line)
        if access is not None:
            if not access["status"].startswith("2"):
                found[f"{access['method']} {access['path']} -> {access['status']}"] += 1
        elif line and not line.startswith(
            ("INFO:", " ", "Traceback", "The above exception", "During handling")
        ) and not _INFO_JSON.search(line):
            found[line[:160]] += 1
    # The start-up banner (address, admin key, hints) is not a problem.
    for banner in [k for k in found if k.startswith(("LoRA Gateway on", "admin API key", "next: "))]:
        del found[banner]
    return found


def warm_up_gateway(gateway_url: str, tenant_key: str, adapter: str, route: str) -> None:
    """One request through the gateway: it loads the adapter upstream and fills the gateway's caches."""
    headers = {"Authorization": f"Bearer {tenant_key}"}
    with httpx.Client(timeout=120) as client:
        if route == "models":
            response = client.get(f"{gateway_url}/v1/models", headers=headers)
        else:
            body = {"model": adapter, "messages": PROMPT, "max_tokens": 4}
            response = client.post(f"{gateway_url}/v1/chat/completions", headers=headers, json=body)
    if response.status_code != 200:
        hint = ""
        if route == "chat" and response.status_code in (404, 405):
            hint = "\n(no /v1/chat/completions on this gateway yet? --route models exercises the harness)"
        raise SystemExit(
            f"warm-up through the gateway failed: {response.status_code} {response.text[:500]}{hint}"
        )


def loaded_adapter_name(upstream_url: str, fallback: str) -> str:
    """The name under which the gateway loaded the adapter upstream (vLLM's own list), else the base."""
    models = httpx.get(f"{upstream_url}/v1/models", timeout=30).json()["data"]
    adapters = [m["id"] for m in models if m.get("parent")]
    return adapters[0] if adapters else fallback


def measure(
    comparison: Comparison,
    pair: tuple[Target, Target],
    stream_pair: tuple[Target, Target] | None,
    *,
    reference: tuple[Target, Child] | None = None,
    limited: Target | None = None,
    gateway: Child,
    upstream_pgid: int,
    cpus: tuple[int, int],
    profile_dir: Path | None,
) -> None:
    """All three measurements, alternating direct and gateway round by round."""
    gateway_cpu, client_cpu_id = cpus
    client_cpu = str(client_cpu_id)
    busy_before, started_at = cpu_busy_seconds(), time.monotonic()

    # The reference proxy shares the gateway's CPU (idle but for its own rounds): it is ours too.
    def on_gateway_cpu() -> float:
        return gateway.cpu_seconds() + (reference[1].cpu_seconds() if reference is not None else 0.0)

    ours_before = (on_gateway_cpu(), group_cpu_seconds(upstream_pgid) + own_cpu_seconds())
    _measure(
        comparison,
        pair,
        stream_pair,
        reference=reference[0] if reference is not None else None,
        limited=limited,
        gateway=gateway,
        client_cpu=client_cpu,
        profile_dir=profile_dir,
    )
    wall = time.monotonic() - started_at
    busy_after = cpu_busy_seconds()
    ours_after = (on_gateway_cpu(), group_cpu_seconds(upstream_pgid) + own_cpu_seconds())
    for key, cpu, before, after in (
        ("gateway_cpu", gateway_cpu, ours_before[0], ours_after[0]),
        ("client_cpu", client_cpu_id, ours_before[1], ours_after[1]),
    ):
        foreign = (busy_after[cpu] - busy_before[cpu]) - (after - before)
        comparison.foreign_cpu[key] = max(0.0, foreign / wall)


def _measure(
    comparison: Comparison,
    pair: tuple[Target, Target],
    stream_pair: tuple[Target, Target] | None,
    *,
    reference: Target | None,
    limited: Target | None,
    gateway: Child,
    client_cpu: str,
    profile_dir: Path | None,
) -> None:
    plan = comparison.plan
    use_wrk = loadgen.have_wrk()
    round_s = plan.throughput_s / plan.rounds

    def closed(target: Target, seconds: float) -> Throughput:
        if use_wrk:
            result = loadgen.wrk(target, cpu=client_cpu, connections=plan.connections, seconds=seconds)
        else:
            result = run_async(loadgen.closed_loop(target, connections=plan.connections, seconds=seconds))
        comparison.count(target.label, result.errors, result.requests)
        return result

    def fixed(target: Target, seconds: float) -> Latencies:
        result = run_async(loadgen.fixed_rate(target, rate=plan.rate, seconds=seconds))
        comparison.count(target.label, result.errors, len(result.samples) + result.failed)
        return result

    log(
        f"max req/s: {plan.rounds} x {round_s:.0f} s per side, {plan.connections} connections "
        f"({'wrk' if use_wrk else 'Python client'})"
    )
    # Through the gateway without and (--tenant-limits) with limits, the same gateway in the same rounds.
    through = (*pair, limited) if limited is not None else pair
    sides = (*through, reference) if reference is not None else through
    for target in sides:
        closed(target, 1)  # warm-up: connections, caches, the adapter load
    for target in sides * plan.rounds:
        cpu_before = gateway.cpu_seconds()
        throughput = closed(target, round_s)
        if target.label in ("gateway", "limits"):
            used = gateway.cpu_seconds() - cpu_before
            if target.label == "gateway":
                comparison.gateway_cpu_busy.append(used / throughput.seconds)
            per_request = comparison.cpu_per_request.setdefault(target.label, [])
            per_request.append(used / max(1, throughput.requests))
        comparison.throughput.setdefault(target.label, []).append(throughput)
        log(f"  {target.label}: {throughput.rps:,.0f} req/s")
    if profile_dir is not None:
        # Extra rounds, outside the reported figures: py-spy takes CPU time on the client side.
        slug = comparison.scenario.split()[0].lower()
        for fmt, suffix in (("raw", "txt"), ("flamegraph", "svg")):
            out = profile_dir / f"{slug}-gateway.{suffix}"
            log(f"profiling the gateway at max load for {round_s:.0f} s -> {out}")
            argv = profile.record_argv(pid=gateway.pid, cpu=client_cpu, seconds=round_s, out=out, fmt=fmt)
            with Child("py-spy", argv, log_path=profile_dir / "py-spy.log") as spy:
                closed(pair[1], round_s)
                spy.wait(timeout_s=60)
        comparison.profile = profile.render(profile_dir / f"{slug}-gateway.txt")

    latency_s = plan.latency_s / plan.rounds
    log(f"latency at {plan.rate:g} req/s: {plan.rounds} x {latency_s:.0f} s per side")
    parts: dict[str, list[Latencies]] = {t.label: [] for t in through}
    for target in through:
        fixed(target, 1)  # warm-up
    for target in through * plan.rounds:
        latencies = fixed(target, latency_s)
        parts[target.label].append(latencies)
        log(f"  {target.label}: p50 {latencies.p50_ms:.2f} ms, p99 {latencies.p99_ms:.2f} ms")
    comparison.latency = {label: loadgen.merge(p) for label, p in parts.items()}

    if stream_pair is not None:
        log(f"stream first byte: {plan.stream_requests} sequential requests per side, alternating")
        for requests, keep in ((max(1, plan.stream_requests // 10), False), (plan.stream_requests, True)):
            results = run_async(loadgen.first_bytes(stream_pair, requests=requests))
            for target, result in zip(stream_pair, results, strict=True):
                comparison.count(target.label, result.errors, requests)
                if keep:  # the first pass only warms up
                    comparison.first_byte[target.label] = result


# --- scenarios ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Upstream:
    """What the gateway is put in front of, and how it is registered there."""

    scenario: str
    url: str
    pgid: int  # its process group, for the CPU accounting
    base_model: dict[str, Any]  # the admin API's base-model body
    gpu_slots: int
    max_lora_rank: int
    adapter_dir: Path


def fake_scenario(args: argparse.Namespace, work: Path) -> Comparison:
    client_cpu = str(args.client_cpu)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    argv = [sys.executable, str(FAKE_UPSTREAM), "--port", str(port), "--model", BASE_MODEL]
    upstream = Child("fake upstream", pinned(client_cpu, argv), log_path=work / "fake-upstream.log")
    log(f"fake upstream on CPU {client_cpu}: {url}")
    with started(upstream, f"{url}/health"):
        adapter_dir = provision.write_fake_adapter(
            work / "fake-adapter", base_model=BASE_MODEL, num_layers=2, shapes=FAKE_SHAPES
        )
        base_model = {
            "name": BASE_MODEL,
            "path": "/models/tiny",
            "hidden_size": 64,
            "num_layers": 2,
            "module_shapes": FAKE_SHAPES,
        }
        plan = Plan(
            connections=args.connections,
            throughput_s=args.throughput_seconds,
            rate=args.rate,
            latency_s=args.latency_seconds,
            stream_requests=args.stream_requests,
            rounds=args.rounds,
            max_tokens=16,
        )
        target = Upstream("fake upstream", url, upstream.pid, base_model, 8, 16, adapter_dir)
        return through_gateway(args, work, target, plan)


def vllm_scenario(args: argparse.Namespace, work: Path) -> Comparison:
    # Imported here: the fake scenario needs neither torch nor the vLLM venv.
    from app.backends.launcher import VllmCpuConfig, VllmCpuServer
    from app.devkit.tinymodel import build_tiny_model

    client_cpu = str(args.client_cpu)
    log(f"tiny model and adapter in {args.vllm_cache} (reused when already built)")
    tiny = build_tiny_model(args.vllm_cache / "tiny", n_adapters=1, rank=8, base_model_name=BASE_MODEL)

    class PinnedVllm(VllmCpuServer):
        # vLLM shares the client CPU with the load generator, as the fake upstream does.
        def command(self) -> list[str]:
            return pinned(client_cpu, super().command())

    config = VllmCpuConfig(
        model=tiny.base,
        served_model_name=BASE_MODEL,
        venv=args.vllm_venv,
        max_loras=2,
        max_lora_rank=8,
        kv_cache_bytes=64 << 20,
        log_path=work / "vllm.log",
        startup_timeout_s=300,
        # vLLM binds its OpenMP threads itself; keep them on the CPU the process is pinned to.
        extra_env={"VLLM_CPU_OMP_THREADS_BIND": client_cpu},
    )
    log(f"vLLM CPU server on CPU {client_cpu} (ready in ~30-60 s; log {config.log_path})")
    with PinnedVllm(config) as vllm:
        if vllm.pid is None:
            raise RuntimeError("vLLM server stopped before the measurements")
        strays = threads_outside(vllm.pid, {args.client_cpu})
        if strays:
            log(f"warning: vLLM threads not pinned to CPU {client_cpu}: {', '.join(strays[:5])}")
        plan = Plan(
            connections=args.vllm_connections,
            throughput_s=args.vllm_throughput_seconds,
            rate=args.vllm_rate,
            latency_s=args.vllm_latency_seconds,
            stream_requests=args.vllm_stream_requests,
            rounds=args.rounds,
            max_tokens=8,
        )
        # The gateway reads the base model's shapes from its config.json.
        base_model = {"name": BASE_MODEL, "path": str(tiny.base)}
        target = Upstream("vLLM CPU", vllm.base_url, vllm.pid, base_model, 2, 8, tiny.adapters[0])
        return through_gateway(args, work, target, plan)


def through_gateway(args: argparse.Namespace, work: Path, upstream: Upstream, plan: Plan) -> Comparison:
    """A fresh gateway in front of `upstream`, provisioned, warmed up, then measured against it."""
    data_dir = work / f"gateway-{upstream.scenario.split()[0].lower()}"
    data_dir.mkdir()
    admin_key = provision.new_admin_key()
    port = free_port()
    gateway_url = f"http://127.0.0.1:{port}"
    log(f"gateway on CPU {args.gateway_cpu}: {gateway_url} (data dir {data_dir})")
    child = provision.gateway(
        data_dir=data_dir,
        admin_key=admin_key,
        port=port,
        cpu=str(args.gateway_cpu),
        source=args.source,
        redis_url=args.redis,
        extra_env=dict(kv.split("=", 1) for kv in args.gateway_env),
    )
    with started(child, f"{gateway_url}/healthz") as gateway:
        admin = provision.Admin(gateway_url, admin_key)
        try:
            tenant_key = admin.provision(
                base_model=upstream.base_model,
                backend_url=upstream.url,
                gpu_slots=upstream.gpu_slots,
                max_lora_rank=upstream.max_lora_rank,
                adapter_dir=upstream.adapter_dir,
            )
            limited_key = None
            if args.tenant_limits:
                # A second tenant, the same adapter, with the limits: on and off in the same rounds.
                limited_key = admin.add_tenant(LIMITED_TENANT, upstream.adapter_dir)
                admin.set_limits(json.loads(args.tenant_limits), tenant=LIMITED_TENANT)
        finally:
            admin.close()
        for key in (tenant_key, limited_key):
            if key is not None:
                warm_up_gateway(gateway_url, key, provision.ADAPTER, args.route)
        direct_model = loaded_adapter_name(upstream.url, BASE_MODEL)
        comparison = Comparison(upstream.scenario, args.route, plan, direct_model)
        common: dict[str, Any] = {
            "route": args.route,
            "gateway": gateway_url,
            "upstream": upstream.url,
            "tenant_key": tenant_key,
            "adapter": provision.ADAPTER,
            "direct_model": direct_model,
            "max_tokens": plan.max_tokens,
        }
        pair = targets(**common, stream=False)
        stream_pair = targets(**common, stream=True) if args.route == "chat" else None
        limited = None
        if limited_key is not None and args.route == "chat":
            headers = {**pair[1].headers, "Authorization": f"Bearer {limited_key}"}
            limited = dataclasses.replace(pair[1], label="limits", headers=headers)
        with contextlib.ExitStack() as stack:
            reference: tuple[Target, Child] | None = None
            if upstream.scenario == "fake upstream" and args.route == "chat":
                reference = stack.enter_context(reference_proxy(args, work, upstream.url, pair[0]))
            measure(
                comparison,
                pair,
                stream_pair,
                reference=reference,
                limited=limited,
                gateway=gateway,
                upstream_pgid=upstream.pgid,
                cpus=(args.gateway_cpu, args.client_cpu),
                profile_dir=args.profile,
            )
        comparison.gateway_log = read_gateway_log(data_dir / "gateway.log")
        return comparison


@contextlib.contextmanager
def reference_proxy(
    args: argparse.Namespace, work: Path, upstream_url: str, direct: Target
) -> Iterator[tuple[Target, Child]]:
    """bench/reference_proxy.py on the gateway's CPU, in front of the same upstream: the yardstick the
    max req/s goal was set against, measured in this run (idle while the other sides are measured)."""
    port = free_port()
    argv = [
        sys.executable, "-m", "uvicorn", "bench.reference_proxy:app", "--port", str(port),
        "--loop", "uvloop", "--http", "httptools", "--no-access-log", "--log-level", "warning",
    ]  # fmt: skip
    child = Child(
        "reference proxy",
        pinned(str(args.gateway_cpu), argv),
        log_path=work / "reference-proxy.log",
        env={**os.environ, "UPSTREAM": upstream_url},
        cwd=REPO,
    )
    url = f"http://127.0.0.1:{port}"
    log(f"reference proxy (40-line aiohttp) on CPU {args.gateway_cpu}: {url}")
    with started(child, f"{url}/health"):
        yield dataclasses.replace(direct, label="reference", url=url + "/v1/chat/completions"), child


# --- report ------------------------------------------------------------------------------------------


def goals(c: Comparison) -> list[Goal]:
    found = [Goal("max req/s through one gateway core", c.best_rps("gateway"), 4000, True, "req/s")]
    if "reference" in c.throughput:
        found.append(
            Goal(
                "max req/s vs the 40-line reference proxy on that core",
                c.best_rps("gateway") / c.best_rps("reference"),
                0.5,
                True,
                "x",
            )
        )
    found += [
        Goal(
            f"added latency p50 at {c.plan.rate:g} req/s",
            c.latency["gateway"].p50_ms - c.latency["direct"].p50_ms,
            1.0,
            False,
            "ms",
        ),
        Goal(
            f"added latency p99 at {c.plan.rate:g} req/s",
            c.latency["gateway"].p99_ms - c.latency["direct"].p99_ms,
            2.0,
            False,
            "ms",
        ),
    ]
    if c.first_byte:
        added = c.first_byte["gateway"].p50_ms - c.first_byte["direct"].p50_ms
        found.append(Goal("added streaming first byte p50", added, 1.0, False, "ms"))
    if "limits" in c.latency:
        # Tenant limits' own cost: the same gateway, a limited tenant against an unlimited one.
        if "reference" in c.throughput:
            found.append(
                Goal(
                    "max req/s with tenant limits vs the reference proxy",
                    c.best_rps("limits") / c.best_rps("reference"),
                    0.5,
                    True,
                    "x",
                )
            )
        found.append(
            Goal(
                f"limits' added latency p99 at {c.plan.rate:g} req/s (limited vs unlimited tenant)",
                c.latency["limits"].p99_ms - c.latency["gateway"].p99_ms,
                0.3,
                False,
                "ms",
            )
        )
    failed = sum(sum(c.failures.get(side, Counter()).values()) for side in ("gateway", "limits"))
    found.append(Goal("no failed requests through the gateway", failed, 0, False, "failed"))
    return found


def render(c: Comparison, args: argparse.Namespace, judge: bool) -> str:
    plan = c.plan
    route = "GET /v1/models" if c.route == "models" else "POST /v1/chat/completions"
    tool = c.throughput["gateway"][0].tool
    lines = [
        f"== {c.scenario}: {route}, max_tokens {plan.max_tokens} ==",
        f"gateway: 1 worker on CPU {args.gateway_cpu}; upstream and load generators on CPU {args.client_cpu}",
        f"model: direct {c.direct_model!r}, through the gateway {provision.ADAPTER!r}",
        f"{'':40}{'direct':>12}{'gateway':>12}   gateway vs direct",
    ]

    def row(name: str, direct: float, gateway: float, fmt: str, versus: str) -> None:
        lines.append(f"{name:40}{format(direct, fmt):>12}{format(gateway, fmt):>12}   {versus}")

    d, g = c.best_rps("direct"), c.best_rps("gateway")
    busy = max(c.gateway_cpu_busy, default=0.0)
    row(
        f"max req/s ({tool}, {plan.connections} conn, best of {plan.rounds})",
        d,
        g,
        ",.0f",
        f"{g / d:.2f}x   (gateway CPU {busy:.0%} of one core)",
    )
    if "reference" in c.throughput:
        r = c.best_rps("reference")
        lines.append(
            f"{'40-line reference proxy, same core':40}{'':12}{r:>12,.0f}   gateway = {g / r:.2f}x of it"
        )
    if c.cpu_per_request.get("gateway"):
        per_request = min(c.cpu_per_request["gateway"])
        lines.append(
            f"{'gateway CPU per request, max load':40}{'':12}{per_request * 1e6:>9.0f} us"
            f"   = {1 / per_request:,.0f} req/s per core at 100% CPU"
        )
    for q in (50, 99):
        dl, gl = c.latency["direct"].pct_ms(q), c.latency["gateway"].pct_ms(q)
        row(f"latency p{q} at {plan.rate:g} req/s (ms)", dl, gl, ".2f", f"{gl - dl:+.2f} ms")
    if "limits" in c.latency:
        lines.append(f"with tenant limits (tenant {LIMITED_TENANT!r}, same gateway and rounds):")
        lt = c.best_rps("limits")
        versus = f"{lt / g:.2f}x of the unlimited tenant"
        if "reference" in c.throughput:
            versus += f", {lt / c.best_rps('reference'):.2f}x of the reference"
        lines.append(f"{'  max req/s':40}{'':12}{lt:>12,.0f}   {versus}")
        if c.cpu_per_request.get("limits") and c.cpu_per_request.get("gateway"):
            on, off = min(c.cpu_per_request["limits"]), min(c.cpu_per_request["gateway"])
            lines.append(f"{'  CPU per request, max load':40}{'':12}{on * 1e6:>9.0f} us   {(on - off) * 1e6:+.0f} us")
        for q in (50, 99):
            gl, ll = c.latency["gateway"].pct_ms(q), c.latency["limits"].pct_ms(q)
            lines.append(f"{f'  latency p{q} at {plan.rate:g} req/s (ms)':40}{'':12}{ll:>12.2f}   {ll - gl:+.2f} ms")
    for q in (50, 99):
        if c.first_byte:
            dl, gl = c.first_byte["direct"].pct_ms(q), c.first_byte["gateway"].pct_ms(q)
            row(f"stream first byte p{q}, 1 client (ms)", dl, gl, ".2f", f"{gl - dl:+.2f} ms")
    failed = {side: sum(c.failures.get(side, Counter()).values()) for side in ("direct", "gateway")}
    row(
        "failed requests (all phases)",
        failed["direct"],
        failed["gateway"],
        ",d",
        f"of {c.sent['direct']:,} / {c.sent['gateway']:,} sent",
    )
    for side in ("direct", "gateway"):
        for cause, n in c.failures.get(side, Counter()).most_common(5):
            lines.append(f"  {side} failure x{n}: {cause}")
    for entry, n in c.gateway_log.most_common(8):
        lines.append(f"  gateway log x{n}: {entry}")
    for key, cpu in (("gateway_cpu", args.gateway_cpu), ("client_cpu", args.client_cpu)):
        if c.foreign_cpu.get(key, 0.0) > 0.05:
            lines.append(
                f"note: other processes took {c.foreign_cpu[key]:.0%} of CPU {cpu} during the run: "
                "figures are noisy; run on a quiet machine"
            )
    lag = max(c.latency["direct"].max_send_lag_ms, c.latency["gateway"].max_send_lag_ms)
    if lag > 5:
        lines.append(f"note: the open-loop sender ran up to {lag:.1f} ms late; latency figures are suspect")
    if busy and busy < 0.85:
        lines.append(
            f"note: the gateway used only {busy:.0%} of its core at max load: the limit may be "
            "the client or upstream CPU, not the gateway"
        )
    if judge:
        lines.append("goals (against the direct baseline of this run):")
        for goal in goals(c):
            verdict = "PASS" if goal.passed else "MISS"
            if goal.unit == "failed":
                lines.append(f"  {verdict}  {goal.text}: {goal.measured:,.0f} of {c.sent['gateway']:,}")
                continue
            sign = ">=" if goal.higher_is_better else "<="
            value = {"ms": f"{goal.measured:+.2f}", "x": f"{goal.measured:.2f}"}.get(
                goal.unit, f"{goal.measured:,.0f}"
            )
            lines.append(f"  {verdict}  {goal.text} {sign} {goal.limit:,g} {goal.unit}: {value} {goal.unit}")
    if c.profile:
        lines.append(c.profile)
    return "\n".join(lines)


def as_json(c: Comparison) -> dict[str, Any]:
    def lat(x: Latencies) -> dict[str, float]:
        return {
            "n": len(x.samples),
            "p50_ms": x.p50_ms,
            "p90_ms": x.pct_ms(90),
            "p99_ms": x.p99_ms,
            "max_send_lag_ms": x.max_send_lag_ms,
        }

    return {
        "scenario": c.scenario,
        "route": c.route,
        "plan": asdict(c.plan),
        "direct_model": c.direct_model,
        "throughput": {k: [{**asdict(t), "rps": t.rps} for t in v] for k, v in c.throughput.items()},
        "gateway_cpu_busy": c.gateway_cpu_busy,
        "gateway_cpu_per_request_s": c.cpu_per_request.get("gateway", []),
        "limits_cpu_per_request_s": c.cpu_per_request.get("limits", []),
        "foreign_cpu": c.foreign_cpu,
        "profile": c.profile,
        "sent": dict(c.sent),
        "failures": {side: dict(causes) for side, causes in c.failures.items()},
        "gateway_log": dict(c.gateway_log),
        "latency": {k: lat(v) for k, v in c.latency.items()},
        "first_byte": {k: lat(v) for k, v in c.first_byte.items()},
        "goals": [{**asdict(g), "passed": g.passed} for g in goals(c)]
        if c.scenario == "fake upstream"
        else [],
    }


# --- command line --------------------------------------------------------------------------------------


def warn_if_busy(cpus: tuple[int, ...], seconds: float = 1.0) -> None:
    """The figures assume two otherwise idle CPUs: say so up front when they are not."""
    before = cpu_busy_seconds()
    time.sleep(seconds)
    after = cpu_busy_seconds()
    for cpu in cpus:
        busy = (after[cpu] - before[cpu]) / seconds
        if busy > 0.1:
            log(f"warning: CPU {cpu} is already {busy:.0%} busy before the run: figures will be noisy")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.overhead",
        description=__doc__.splitlines()[0] if __doc__ else None,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--gateway-cpu", type=int, default=0, help="the one CPU the gateway worker runs on")
    p.add_argument("--client-cpu", type=int, default=1, help="CPU of the upstream and the load generators")
    p.add_argument(
        "--route",
        choices=("chat", "models"),
        default="chat",
        help="chat: POST /v1/chat/completions; models: GET /v1/models (auth + registry only)",
    )
    p.add_argument("--rounds", type=int, default=2, help="alternating direct/gateway rounds per figure")
    p.add_argument("--connections", type=int, default=64, help="closed-loop connections (max req/s)")
    p.add_argument("--throughput-seconds", type=float, default=10, help="closed-loop seconds per side")
    p.add_argument("--rate", type=float, default=300, help="open-loop rate for the latency figures")
    p.add_argument("--latency-seconds", type=float, default=10, help="open-loop seconds per side")
    p.add_argument("--stream-requests", type=int, default=300, help="sequential streams per side")
    p.add_argument("--no-fake", action="store_true", help="skip the fake-upstream scenario")
    p.add_argument("--vllm", action="store_true", help="also measure against the vLLM CPU server")
    p.add_argument(
        "--vllm-venv", type=Path, default=REPO / ".venv-vllm", help="scripts/setup-vllm-cpu.sh's venv"
    )
    p.add_argument("--vllm-cache", type=Path, default=REPO / "data" / "bench", help="tiny model build cache")
    p.add_argument("--vllm-rate", type=float, default=5, help="open-loop rate against vLLM")
    p.add_argument("--vllm-latency-seconds", type=float, default=20, help="open-loop seconds per side")
    p.add_argument("--vllm-connections", type=int, default=8, help="closed-loop connections against vLLM")
    p.add_argument("--vllm-throughput-seconds", type=float, default=10, help="closed-loop seconds per side")
    p.add_argument("--vllm-stream-requests", type=int, default=30, help="sequential streams per side")
    p.add_argument(
        "--source",
        type=Path,
        metavar="DIR",
        help="run the gateway from the checkout in DIR (e.g. a git worktree of another commit)",
    )
    p.add_argument(
        "--redis",
        metavar="URL",
        help="keep residency in this Redis (e.g. redis://127.0.0.1:6379/0), as replicas do; default in-process",
    )
    p.add_argument(
        "--nice",
        type=int,
        default=0,
        help="scheduling niceness of this run and every process it starts; e.g. -10 (root) keeps other "
        "processes on a shared machine from adding noise, at their expense",
    )
    p.add_argument(
        "--gateway-env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a setting of the gateway's, e.g. GATEWAY_LOG_REQUESTS=all (repeatable)",
    )
    p.add_argument(
        "--tenant-limits",
        metavar="JSON",
        help='also measure a second tenant with these limits through the same gateway, in the same rounds, '
        'e.g. \'{"requests_per_minute": 100000000, "tokens_per_minute": 1000000000}\' (high enough never '
        'to refuse: the cost of counting)',
    )
    p.add_argument("--json", type=Path, help="also write every figure to this file")
    p.add_argument(
        "--profile",
        type=Path,
        metavar="DIR",
        help="also profile the gateway at max load with py-spy (extra rounds); summary printed, files in DIR",
    )
    p.add_argument("--keep", action="store_true", help="keep the work directory (logs, databases)")
    args = p.parse_args(argv)
    if args.no_fake and not args.vllm:
        p.error("--no-fake leaves nothing to measure without --vllm")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    check_cpus(args.gateway_cpu, args.client_cpu)
    if args.source is not None and not (args.source / "app" / "main.py").is_file():
        raise SystemExit(f"--source {args.source}: no app/main.py there")
    if not provision.gateway_bin().exists():
        raise SystemExit(f"{provision.gateway_bin()} not found: run `make venv` and use .venv/bin/python")
    if not loadgen.have_wrk():
        log(
            "wrk not found (apt-get install -y wrk): max req/s falls back to a Python client, which "
            "may saturate before the gateway does"
        )
    if args.profile is not None:
        profile.py_spy()  # fail now, not after the first scenario, when it is missing
        args.profile.mkdir(parents=True, exist_ok=True)
    exit_on_sigterm()
    if args.nice:
        # Children inherit it: the gateway, the upstream, wrk, vLLM and py-spy all run at this priority.
        try:
            os.setpriority(os.PRIO_PROCESS, 0, args.nice)
        except PermissionError:
            raise SystemExit("--nice below 0 needs root (CAP_SYS_NICE)") from None
    warn_if_busy((args.gateway_cpu, args.client_cpu))
    # This process is the Python load generator: it belongs on the client CPU with the upstream.
    os.sched_setaffinity(0, {args.client_cpu})
    work = Path(tempfile.mkdtemp(prefix="lora-gw-bench-"))
    keep = args.keep
    results: list[Comparison] = []
    try:
        if not args.no_fake:
            results.append(fake_scenario(args, work))
            print(render(results[-1], args, judge=True), flush=True)  # noqa: T201
        if args.vllm:
            results.append(vllm_scenario(args, work))
            print(("\n" if len(results) > 1 else "") + render(results[-1], args, judge=False), flush=True)  # noqa: T201
        # Failed requests are worth a look at the gateway's and upstream's full logs.
        keep = keep or any(sum(f.values()) for c in results for f in c.failures.values())
    except (ProcessError, loadgen.LoadError, RuntimeError) as exc:
        keep = True
        raise SystemExit(f"benchmark failed: {exc}\n(logs kept in {work})") from exc
    finally:
        if keep:
            log(f"work directory kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    if args.json:
        args.json.write_text(json.dumps([as_json(c) for c in results], indent=2) + "\n")
    failed = [g for c in results if c.scenario == "fake upstream" for g in goals(c) if not g.passed]
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
