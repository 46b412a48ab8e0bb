"""Soak: a fixed rate through the gateway (residency in Redis) to the vLLM CPU server for ten minutes,
with the backend restarted half-way, as a rollout would (SIGTERM to its API server).

It decides what "the gateway holds up over time" means and prints it per minute: requests, errors by
cause, latency p50/p95/p99, the gateway's RSS; then the gateway's RSS at the start (after warm-up) and
at the end, and the residency keys in Redis before the load and after it, which must be back to their
idle count (no lease, no waiter, no load lock left). Goals, checked at the end:

- errors only while the backend restarts (none of them a 500), none outside that time;
- gateway RSS growth end vs start <= --rss-bound-mib (default 32 MiB: allocator noise and the
  bounded caches filling; a leak per request at this rate would pass it within minutes);
- Redis keys of the run back to their idle count, no lease key left.

    .venv/bin/python -m bench.soak [--minutes 10] [--rate 4] [--redis redis://127.0.0.1:6379/0]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import secrets
import socket
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
from redis import Redis

from bench import provision

REPO = Path(__file__).resolve().parents[1]
BASE_MODEL = "tiny-llama"
ADAPTERS = 3  # on a backend with two places: cold loads and evictions keep happening
MSG = [{"role": "user", "content": "Tell me about the weather."}]


def log(message: str) -> None:
    print(f"-- {message}", file=sys.stderr, flush=True)  # noqa: T201 (progress on stderr, results on stdout)


def out(line: str) -> None:
    print(line, flush=True)  # noqa: T201 (the results)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


@dataclass
class Minute:
    minute: int
    sent: int = 0
    ok: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    latencies_ms: list[float] = field(default_factory=list)
    rss_mib: float = 0.0

    def percentile(self, q: float) -> float:
        return float(np.percentile(self.latencies_ms, q)) if self.latencies_ms else float("nan")


async def one(
    session: aiohttp.ClientSession, url: str, key: str, adapter: str, stream: bool
) -> tuple[float, str | None]:
    """(latency ms, None) or (latency ms, the error's cause)."""
    body: dict[str, Any] = {"model": adapter, "messages": MSG, "max_tokens": 12, "temperature": 0}
    if stream:
        body["stream"] = True
    t0 = time.monotonic()
    try:
        async with session.post(
            f"{url}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"}
        ) as r:
            data = await r.read()
            if r.status != 200:
                return (time.monotonic() - t0) * 1000, f"http {r.status}"
            if stream and (b'"error"' in data or not data.rstrip().endswith(b"data: [DONE]")):
                return (time.monotonic() - t0) * 1000, "broken stream"
    except (aiohttp.ClientError, TimeoutError) as exc:
        return (time.monotonic() - t0) * 1000, type(exc).__name__
    return (time.monotonic() - t0) * 1000, None


def residency_keys(redis: Redis, prefix: str) -> Counter[str]:
    """Keys of the run by kind (reg, ten, lease, inf, load, ...)."""
    kinds: Counter[str] = Counter()
    for key in redis.scan_iter(match=f"{prefix}:*"):
        m = re.match(rf"{re.escape(prefix)}:\{{[^}}]*\}}:([a-z]+)", key.decode())
        kinds[m.group(1) if m else key.decode()] += 1
    return kinds


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=10)
    p.add_argument("--rate", type=float, default=4, help="requests per second, open loop")
    p.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    p.add_argument("--rss-bound-mib", type=float, default=32)
    p.add_argument("--vllm-venv", type=Path, default=REPO / ".venv-vllm")
    p.add_argument("--cache", type=Path, default=REPO / "data" / "bench", help="tiny model build cache")
    p.add_argument("--json", type=Path, help="write the figures here")
    args = p.parse_args()

    from app.backends.launcher import VllmCpuConfig, VllmCpuServer
    from app.devkit.tinymodel import build_tiny_model

    tiny = build_tiny_model(args.cache / "soak", n_adapters=ADAPTERS, rank=8, base_model_name=BASE_MODEL)
    work = Path(tempfile.mkdtemp(prefix="lora-gw-soak-"))
    token = secrets.token_urlsafe(24)

    def vllm(tag: str, port: int = 0) -> VllmCpuServer:
        return VllmCpuServer(
            VllmCpuConfig(
                model=tiny.base, served_model_name=BASE_MODEL, venv=args.vllm_venv, port=port, max_loras=2,
                max_cpu_loras=2, max_lora_rank=8, max_model_len=1024, kv_cache_bytes=64 << 20,
                log_path=work / f"vllm-{tag}.log", startup_timeout_s=300, api_key=token,
            )
        )  # fmt: skip

    backend = vllm("first")
    log(f"vLLM CPU server starting (log {backend.log_path})")
    backend.start()
    backend.wait_ready()
    admin_key = provision.new_admin_key()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    data_dir = work / "gateway"
    data_dir.mkdir()
    child = provision.gateway(
        data_dir=data_dir, admin_key=admin_key, port=port, cpu="0-1", redis_url=args.redis
    )
    prefix = (child.env or {})["GATEWAY_REDIS_PREFIX"]
    redis = Redis.from_url(args.redis)
    minutes: list[Minute] = []
    try:
        child.start()
        child.wait_http(f"{url}/healthz")
        admin = provision.Admin(url, admin_key)
        admin._call("POST", "/base-models", json={"name": BASE_MODEL, "path": str(tiny.base)})
        admin._call("POST", "/backends", json={
            "name": "soak-cpu", "url": backend.base_url, "base_model": BASE_MODEL, "gpu_slots": 2,
            "max_lora_rank": 8, "capacity": 2, "api_key": token,
        })  # fmt: skip
        admin._call("POST", "/tenants", json={"name": provision.TENANT})
        key = admin._call("POST", f"/tenants/{provision.TENANT}/api-keys", json={})["key"]
        names = []
        for i, folder in enumerate(tiny.adapters):
            files = [("file", (f.name, f.read_bytes())) for f in sorted(folder.glob("adapter_*"))]
            admin._call("POST", f"/tenants/{provision.TENANT}/adapters", data={"name": f"a{i}"}, files=files)
            names.append(f"a{i}")
        admin.close()

        async def run() -> tuple[float, float]:
            rng = random.Random(1)
            timeout = aiohttp.ClientTimeout(total=120)
            async with aiohttp.ClientSession(timeout=timeout) as session:
                for name in names:  # warm-up: every adapter once
                    await one(session, url, key, name, False)
                idle_keys.update(residency_keys(redis, prefix))
                rss0 = rss_mib(child.pid)
                start, period = time.monotonic(), 1 / args.rate
                total = int(args.minutes * 60 * args.rate)
                restart_at = total // 2
                tasks: set[asyncio.Task[None]] = set()

                async def send(i: int, m: Minute) -> None:
                    adapter = names[0] if rng.random() < 0.5 else rng.choice(names)
                    sent_at = time.monotonic()
                    ms, err = await one(session, url, key, adapter, rng.random() < 0.5)
                    if err is None:
                        m.ok += 1
                        m.latencies_ms.append(ms)
                    else:
                        m.errors[err] += 1
                        failures.append((sent_at, sent_at + ms / 1000, err))

                for i in range(total):
                    minute = int(i / args.rate // 60)
                    while len(minutes) <= minute:
                        if minutes:
                            minutes[-1].rss_mib = rss_mib(child.pid)
                            report(minutes[-1])
                        minutes.append(Minute(len(minutes)))
                    await asyncio.sleep(max(0.0, start + i * period - time.monotonic()))
                    minutes[minute].sent += 1
                    task = asyncio.create_task(send(i, minutes[minute]))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
                    if i == restart_at:
                        tasks.add(asyncio.create_task(restart()))
                await asyncio.gather(*tasks)
                minutes[-1].rss_mib = rss_mib(child.pid)
                report(minutes[-1])
                return rss0, rss_mib(child.pid)

        async def restart() -> None:
            nonlocal backend
            log("restarting the backend (SIGTERM to its API server)")
            t0 = time.monotonic()
            await asyncio.to_thread(backend.terminate)
            backend = vllm("restarted", port=backend.port)
            backend.start()
            await backend.wait_ready_async()
            window.extend((t0, time.monotonic()))
            log(f"backend back after {window[1] - t0:.1f} s")

        idle_keys: Counter[str] = Counter()
        window: list[float] = []  # the restart: SIGTERM sent, back and ready
        failures: list[tuple[float, float, str]] = []  # (sent, answered, cause)
        rss0, rss1 = asyncio.run(run())
        time.sleep(1)
        end_keys = residency_keys(redis, prefix)
    finally:
        child.stop()
        backend.stop()
        for k in redis.scan_iter(match=f"{prefix}:*"):
            redis.delete(k)

    sent = sum(m.sent for m in minutes)
    errors = sum(sum(m.errors.values()) for m in minutes)
    # A call fails for the restart if it was under way while the backend was away (or within the
    # second after it came back, while the gateway finds it again).
    t0, t1 = window or (0.0, 0.0)
    outside = sum(1 for sent_at, done_at, _ in failures if not (done_at >= t0 and sent_at <= t1 + 1.0))
    five_hundreds = sum(m.errors["http 500"] for m in minutes)
    leases = end_keys["lease"] + end_keys["inf"] + end_keys["load"] + end_keys["wait"]
    out(f"\nsoak: {args.minutes:g} min at {args.rate:g} req/s through the gateway (Redis) to vLLM CPU")
    out(f"requests {sent}, errors {errors} (outside the restart: {outside}, 500s: {five_hundreds})")
    out(f"gateway RSS start {rss0:.1f} MiB, end {rss1:.1f} MiB ({rss1 - rss0:+.1f} MiB)")
    out(f"Redis keys idle {dict(idle_keys)}, end {dict(end_keys)}")
    goals = [
        (
            outside == 0 and five_hundreds == 0,
            f"errors only while the backend restarted ({t1 - t0:.1f} s): {outside} outside",
        ),
        (rss1 - rss0 <= args.rss_bound_mib, f"RSS growth <= {args.rss_bound_mib:g} MiB: {rss1 - rss0:+.1f}"),
        (leases == 0 and end_keys == idle_keys, "Redis keys back to their idle count, no lease left"),
    ]
    for ok, text in goals:
        out(f"  {'PASS' if ok else 'FAIL'}  {text}")
    if args.json:
        figures = {
            "minutes": [
                {"minute": m.minute, "sent": m.sent, "ok": m.ok, "errors": dict(m.errors), "rss_mib": m.rss_mib}
                | {f"p{q}": m.percentile(q) for q in (50, 95, 99)}
                for m in minutes
            ],
            "rss_start_mib": rss0, "rss_end_mib": rss1, "idle_keys": idle_keys, "end_keys": end_keys,
        }  # fmt: skip
        args.json.write_text(json.dumps(figures, indent=2))
    return 0 if all(ok for ok, _ in goals) else 1


def report(m: Minute) -> None:
    log(
        f"minute {m.minute}: sent {m.sent}, ok {m.ok}, errors {dict(m.errors) or 0}, "
        f"p50 {m.percentile(50):.0f} ms, p95 {m.percentile(95):.0f} ms, p99 {m.percentile(99):.0f} ms, "
        f"gateway RSS {m.rss_mib:.1f} MiB"
    )


if __name__ == "__main__":
    raise SystemExit(main())
