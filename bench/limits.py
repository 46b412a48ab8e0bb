"""Tenant limits across replicas: are they held exactly however many gateways serve the tenant?

Four gateway processes (separate `lora-gateway serve`s on one Redis and one registry), a fast fake
upstream (bench/fake_upstream.py: every answer at once, usage = its words and max_tokens), and C
concurrent clients spread over the four, each sending requests in a loop (half of them streamed) inside
one minute of the limits' windows, so that a limit of N per minute must admit exactly N:

1. requests: tenant "capped-requests" limited to N requests per minute; accepted must be within 1% of N.
2. tokens: tenant "capped-tokens" limited to T tokens per minute; the tokens actually served (the usage
   the clients received) must not exceed T by more than one request's reservation.

Alongside, tenant "free" (no limits) sends through the same gateways: none of its requests may be
refused. Prints the figures; tests/integration/test_limits.py runs it with smaller numbers.

    .venv/bin/python -m bench.limits [--clients 500] [--requests-per-minute 2000] [--tokens-per-minute 100000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import sys
import tempfile
import time
from collections import Counter
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from bench import provision
from bench.overhead import BASE_MODEL, FAKE_SHAPES, FAKE_UPSTREAM, free_port, log, started
from bench.procs import Child

PROMPT = [{"role": "user", "content": "Count the requests of this tenant, exactly, across replicas."}]


@dataclass
class Tally:
    status: Counter[int] = field(default_factory=Counter)
    tokens: int = 0  # prompt + completion tokens the clients were told they used


@dataclass
class Result:
    phase: str
    limit: int
    capped: Tally
    free: Tally
    seconds: float

    def as_dict(self) -> dict[str, Any]:
        return {
            "phase": self.phase,
            "limit": self.limit,
            "seconds": round(self.seconds, 2),
            "capped_accepted": self.capped.status[200],
            "capped_refused": self.capped.status[429],
            "capped_other": sum(n for s, n in self.capped.status.items() if s not in (200, 429)),
            "capped_tokens_served": self.capped.tokens,
            "free_accepted": self.free.status[200],
            "free_refused": sum(n for s, n in self.free.status.items() if s != 200),
        }


async def _one(
    session: aiohttp.ClientSession, url: str, key: str, stream: bool, max_tokens: int, tally: Tally
) -> None:
    body: dict[str, Any] = {"model": provision.ADAPTER, "messages": PROMPT, "max_tokens": max_tokens}
    if stream:
        body |= {"stream": True, "stream_options": {"include_usage": True}}
    headers = {"Authorization": f"Bearer {key}"}
    async with session.post(f"{url}/v1/chat/completions", json=body, headers=headers) as resp:
        data = await resp.read()
        tally.status[resp.status] += 1
        if resp.status != 200:
            return
        usage = None
        if stream:
            for line in data.split(b"\n"):
                if line.startswith(b"data: {") and b'"usage":{' in line:
                    usage = json.loads(line[6:]).get("usage")
        else:
            usage = json.loads(data).get("usage")
        if usage:
            tally.tokens += int(usage["prompt_tokens"]) + int(usage["completion_tokens"])


async def _clients(
    urls: list[str], capped_key: str, free_key: str, *, clients: int, seconds: float, max_tokens: int
) -> tuple[Tally, Tally, float]:
    capped, free = Tally(), Tally()
    deadline = time.monotonic() + seconds
    connector = aiohttp.TCPConnector(limit=0, force_close=False)
    timeout = aiohttp.ClientTimeout(total=60)
    started_at = time.monotonic()
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def client(i: int) -> None:
            # Four in five clients are the capped tenant's; every client keeps to one replica.
            name = "free" if i % 5 == 4 else "capped"
            tally, key = (free, free_key) if name == "free" else (capped, capped_key)
            url = urls[i % len(urls)]
            n = 0
            while time.monotonic() < deadline:
                try:
                    await _one(session, url, key, stream=(i + n) % 2 == 0, max_tokens=max_tokens, tally=tally)
                except (aiohttp.ClientError, TimeoutError) as exc:
                    tally.status[-1] += 1
                    log(f"client {i}: {type(exc).__name__}")
                n += 1
                if name == "capped" and tally.status[429] and n % 4 == 0:
                    await asyncio.sleep(0.05)  # refused clients keep asking, a little less often

        await asyncio.gather(*(client(i) for i in range(clients)))
    return capped, free, time.monotonic() - started_at


def run(args: argparse.Namespace) -> list[Result]:
    work = Path(tempfile.mkdtemp(prefix="lgw-limits-"))
    data_dir = work / "gateway"
    data_dir.mkdir()
    admin_key = provision.new_admin_key()
    prefix = f"lgw-limits-{secrets.token_hex(4)}"
    results: list[Result] = []
    with ExitStack() as stack:
        port = free_port()
        upstream_url = f"http://127.0.0.1:{port}"
        argv = [sys.executable, str(FAKE_UPSTREAM), "--port", str(port), "--model", BASE_MODEL]
        fake = Child("fake upstream", argv, log_path=work / "upstream.log")
        stack.enter_context(started(fake, f"{upstream_url}/health"))
        urls = []
        for i in range(args.replicas):
            gport = free_port()
            child = provision.gateway(
                data_dir=data_dir,
                admin_key=admin_key,
                port=gport,
                cpu=args.gateway_cpus,
                redis_url=args.redis,
                extra_env={"GATEWAY_REDIS_PREFIX": prefix, "GATEWAY_CACHE_TTL_S": str(args.cache_ttl)},
                log_name=f"gateway-{i}.log",
            )
            stack.enter_context(started(child, f"http://127.0.0.1:{gport}/healthz"))
            urls.append(f"http://127.0.0.1:{gport}")
        log(f"{args.replicas} gateways on one Redis ({args.redis}, prefix {prefix}): {', '.join(urls)}")
        admin = provision.Admin(urls[0], admin_key)
        adapter_dir = provision.write_fake_adapter(
            work / "adapter", base_model=BASE_MODEL, num_layers=2, shapes=FAKE_SHAPES
        )
        base_model = {
            "name": BASE_MODEL, "path": "/models/tiny", "hidden_size": 64, "num_layers": 2,
            "module_shapes": FAKE_SHAPES,
        }  # fmt: skip
        free = admin.provision(
            base_model=base_model,
            backend_url=upstream_url,
            gpu_slots=8,
            max_lora_rank=16,
            adapter_dir=adapter_dir,
        )
        # One tenant per phase: each starts with empty counters.
        phases = [
            ("requests", {"requests_per_minute": args.requests_per_minute}, args.requests_per_minute),
            ("tokens", {"tokens_per_minute": args.tokens_per_minute}, args.tokens_per_minute),
        ]
        keys = {}
        for phase, limits, _ in phases:
            keys[phase] = admin.add_tenant(f"capped-{phase}", adapter_dir)
            admin.set_limits(limits, tenant=f"capped-{phase}")
        admin.close()
        time.sleep(args.cache_ttl + 0.5)  # every replica's registry cache has the limits
        for phase, limits, limit in phases:
            wait_for_a_fresh_window(args.seconds)
            log(f"phase {phase}: {limits}, {args.clients} clients for {args.seconds:.0f} s")
            capped, free_tally, took = asyncio.run(
                _clients(
                    urls,
                    keys[phase],
                    free,
                    clients=args.clients,
                    seconds=args.seconds,
                    max_tokens=args.max_tokens,
                )
            )
            results.append(Result(phase, limit, capped, free_tally, took))
    return results


def wait_for_a_fresh_window(seconds: float) -> None:
    """A phase runs inside one minute of the limits' windows (server-time minutes; this clock and Redis's
    agree to well under a second): within a minute the count is exact, while across a boundary the
    previous minute's requests are taken as spread evenly over it (app/limits/state.py)."""
    left = 60 - time.time() % 60
    if left < seconds + 5:
        time.sleep(left + 0.5)


def reservation(max_tokens: int) -> int:
    """The most one request of the bench reserves: its prompt's bytes, the template allowance, max_tokens."""
    from app.limits.gate import MESSAGE_TOKENS, TEMPLATE_TOKENS, prompt_bytes

    size, _ = prompt_bytes({"messages": PROMPT})
    return size + TEMPLATE_TOKENS + MESSAGE_TOKENS * len(PROMPT) + max_tokens


def render(results: list[Result], args: argparse.Namespace) -> str:
    lines = [f"{args.replicas} gateway replicas, {args.clients} clients, {args.seconds:.0f} s per phase"]
    most = reservation(args.max_tokens)
    for r in results:
        d = r.as_dict()
        lines.append(
            f"{r.phase:>8}: limit {r.limit:,}/min  accepted {d['capped_accepted']:,}  refused {d['capped_refused']:,}  "
            f"other {d['capped_other']}  tokens served {d['capped_tokens_served']:,}  |  free tenant: "
            f"{d['free_accepted']:,} accepted, {d['free_refused']} refused"
        )
        if r.phase == "requests":
            err = (d["capped_accepted"] - r.limit) / r.limit
            lines.append(f"          accepted vs limit: {err:+.2%} (goal: within 1%)")
        else:
            over = d["capped_tokens_served"] - r.limit
            lines.append(f"          tokens served - limit: {over:+,} (goal: <= one reservation, {most:,})")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.limits", description=__doc__.splitlines()[0] if __doc__ else None
    )
    p.add_argument("--replicas", type=int, default=4)
    p.add_argument("--clients", type=int, default=500)
    p.add_argument("--seconds", type=float, default=20.0, help="per phase (less than a window)")
    p.add_argument("--requests-per-minute", type=int, default=2000)
    p.add_argument("--tokens-per-minute", type=int, default=100_000)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    p.add_argument("--gateway-cpus", default="0,1", help="CPUs the gateway processes run on (taskset list)")
    p.add_argument("--cache-ttl", type=float, default=5.0, help="the gateways' GATEWAY_CACHE_TTL_S")
    p.add_argument("--json", type=Path, help="also write the figures here")
    args = p.parse_args(argv)
    if args.seconds > 50:
        p.error("--seconds must stay under 50: a phase must fit in one window")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    results = run(args)
    print(render(results, args))  # noqa: T201
    if args.json:
        args.json.write_text(json.dumps([r.as_dict() for r in results], indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
