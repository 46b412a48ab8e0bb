"""The rolling-restart drill, on the fleet of tests/integration/fleet.py (two vLLM CPU backends, two
gateway processes on Redis): continuous mixed load (two warm adapters and four cold ones, streaming and
not, through both gateways) while backend A restarts (SIGTERM), then B (SIGKILL), then both go down at
once and come back.

Every call is counted and checked: only calls in flight while a backend was being killed may fail, each
with a clean envelope (or a clean error event ending its stream); nothing hangs; no answer comes from a
wrong adapter (each is compared with that adapter's greedy answer straight from vLLM); no answer names a
backend, URL, served name or path. While every backend is down, the calls the gateways make to Redis and
to the backends per second stay bounded, and the fleet's state converges within one reconcile period
once the backends are back."""

from __future__ import annotations

import asyncio
import json
import random
import re
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

import httpx
import pytest

from tests.integration.conftest import ADMIN_KEY
from tests.integration.fleet import MSG, Stack, fleet_server, loaded

pytestmark = pytest.mark.vllm

WARM = ["acme/a0", "globex/a1"]
CLIENTS = 3  # fewer than the fleet's four places: a cold adapter always finds an idle one to evict
BACKOFF_S = 0.25  # what a client does after an error (the OpenAI SDK waits longer)
SLACK_S = 1.0  # after a killed backend's process has gone, calls may still be failing on it


@dataclass
class Call:
    adapter: str
    stream: bool
    gateway: int
    start: float
    end: float = 0.0
    status: int = 0  # 0: no answer at all (timeout or transport error)
    content: str = ""
    done: bool = False  # a stream that ended with [DONE]
    error: dict[str, Any] | None = None  # the envelope's error, or the stream's error event
    raw: str = ""
    headers: dict[str, str] = field(default_factory=dict)


async def _call(c: httpx.AsyncClient, fleet: Stack, adapter: str, stream: bool, gateway: int) -> Call:
    call = Call(adapter, stream, gateway, time.monotonic())
    body = {"model": adapter.split("/")[1], "messages": MSG, "max_tokens": 12, "temperature": 0}
    if stream:
        body["stream"] = True
    headers = {"Authorization": f"Bearer {fleet.key_for(adapter)}"}
    url = fleet.gateways[gateway] + "/v1/chat/completions"
    try:
        async with c.stream("POST", url, json=body, headers=headers) as r:
            call.status, call.headers = r.status_code, dict(r.headers)
            raw = []
            async for line in r.aiter_lines():
                raw.append(line)
                if not stream or not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    call.done = True
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    call.error = event["error"]
                for choice in event.get("choices", []):
                    call.content += choice.get("delta", {}).get("content") or ""
            call.raw = "\n".join(raw)
        if call.status != 200:
            call.error = json.loads(call.raw).get("error")
        elif not stream:
            call.content = json.loads(call.raw)["choices"][0]["message"]["content"]
    except (httpx.TransportError, json.JSONDecodeError) as exc:
        call.status, call.raw = 0, repr(exc)
    call.end = time.monotonic()
    return call


class Load:
    """CLIENTS closed loops over the gateways, 70% on the warm adapters, half of them streaming."""

    def __init__(self, fleet: Stack) -> None:
        self.fleet, self.calls, self.stop = fleet, list[Call](), asyncio.Event()
        self.rng = random.Random(5)

    async def run(self) -> None:
        async with httpx.AsyncClient(timeout=httpx.Timeout(120, connect=5)) as c:
            await asyncio.gather(*(self._loop(c, i) for i in range(CLIENTS)))

    async def _loop(self, c: httpx.AsyncClient, i: int) -> None:
        n = 0
        cold = [a for a in self.fleet.adapters if a not in WARM]
        while not self.stop.is_set():
            adapter = self.rng.choice(WARM if self.rng.random() < 0.7 else cold)
            call = await _call(c, self.fleet, adapter, self.rng.random() < 0.5, (i + n) % 2)
            self.calls.append(call)
            n += 1
            if call.status != 200 or call.error:
                await asyncio.sleep(BACKOFF_S)

    def between(self, t0: float, t1: float) -> list[Call]:
        return [c for c in self.calls if t0 <= c.start and c.end <= t1]


def _window(c: Call, windows: list[tuple[float, float]]) -> int | None:
    """The restart a failed call is owed to: 0 (A), 1 (B), 2 (both down, until they are back), or None."""
    if c.end > windows[2][0]:
        return 2
    for i, (t0, t1) in enumerate(windows[:2]):
        if c.start < t1 + SLACK_S and c.end > t0:
            return i
    return None


def _redis_calls(fleet: Stack) -> Counter[str]:
    """Calls per command so far: EVALSHA counts the gateways' round trips (one script each), the other
    commands what those scripts ran."""
    stats = fleet.redis.info("commandstats")
    return Counter({k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in stats.items()})


class Refuser:
    """Stands in on a dead backend's port, accepting each connection and closing it at once, to count the
    connections the gateways open while no backend can serve. (A refused connection cannot be counted
    from outside the kernel; this is the same failure one step later.)"""

    def __init__(self, port: int) -> None:
        self.port, self.connections = port, 0
        self.server: asyncio.Server | None = None

    async def __aenter__(self) -> Self:
        def accept(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.connections += 1
            writer.transport.abort()

        self.server = await asyncio.start_server(accept, "127.0.0.1", self.port)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()


def _backend_ids(fleet: Stack) -> dict[str, str]:
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    rows = httpx.get(f"{fleet.gateways[0]}/admin/v1/backends", headers=admin, timeout=10).json()["data"]
    return {r["url"]: r["id"] for r in rows}


def _registered(fleet: Stack, backend_id: str) -> set[str]:
    (key,) = fleet.redis.keys(f"{fleet.prefix}:*reg:{backend_id}") or [None]
    return {m.decode() for m in fleet.redis.zrange(key, 0, -1)} if key else set()


def _lease_keys(fleet: Stack) -> list[bytes]:
    return [k for k in fleet.redis.keys(f"{fleet.prefix}:*") if re.search(rb":(lease|inf):", k)]


def test_rolling_restart_drill(fleet: Stack, tmp_path: Path) -> None:
    windows: list[tuple[float, float]] = []  # (signal sent, process gone) per backend killed
    restarts: list[tuple[float, float]] = []  # (signal sent, back and ready) of A, then of B
    figures: dict[str, Any] = {}

    async def restart(i: int, stop: Callable[[], None], tag: str) -> None:
        old = fleet.backends[i]
        t0 = time.monotonic()
        await asyncio.to_thread(stop)
        windows.append((t0, time.monotonic()))
        await start(i, old.port, tag)
        restarts.append((t0, time.monotonic()))

    async def start(i: int, port: int, tag: str) -> None:
        new = fleet_server(fleet.tiny, tmp_path / f"vllm-{i}-{tag}.log", port=port)
        new.start()
        await new.wait_ready_async()
        fleet.backends[i] = new

    async def drill(load: Load) -> None:
        runner = asyncio.create_task(load.run())
        await asyncio.sleep(4)
        await restart(0, fleet.backends[0].terminate, "sigterm")  # A: as a rollout stops a pod
        await asyncio.sleep(4)
        await restart(1, fleet.backends[1].kill, "sigkill")  # B: as a crash or an OOM kill
        await asyncio.sleep(4)

        # Both down: first refusing connections, then accepting and dropping them.
        ports = [s.port for s in fleet.backends]
        t0 = time.monotonic()
        await asyncio.gather(*(asyncio.to_thread(s.kill) for s in fleet.backends))
        windows.append((t0, time.monotonic()))
        await asyncio.sleep(2)  # the gateways find out
        r0, t_refused = _redis_calls(fleet), time.monotonic()
        await asyncio.sleep(6)
        r1, t_dropping = _redis_calls(fleet), time.monotonic()
        async with Refuser(ports[0]) as ra, Refuser(ports[1]) as rb:
            await asyncio.sleep(6)
            r2, t_back = _redis_calls(fleet), time.monotonic()
            connections = ra.connections + rb.connections
        await asyncio.gather(*(start(i, p, "back") for i, p in enumerate(ports)))
        t_ready = time.monotonic()
        await asyncio.sleep(6)
        load.stop.set()
        await runner

        down = load.between(t_refused, t_back)
        figures.update(
            down_calls=len(down),
            down_call_max_s=max((c.end - c.start for c in down), default=0.0),
            redis_per_s_refused=(r1 - r0)["evalsha"] / (t_dropping - t_refused),
            redis_per_s_dropping=(r2 - r1)["evalsha"] / (t_back - t_dropping),
            redis_mix=(r1 - r0).most_common(6),
            backend_connections_per_s=connections / (t_back - t_dropping),
            down_calls_per_s=len(down) / (t_back - t_refused),
            after=load.between(t_ready + 2, float("inf")),
        )

    load = Load(fleet)
    asyncio.run(drill(load))
    calls = load.calls
    ok = [c for c in calls if c.status == 200 and not c.error]
    failed = [c for c in calls if c not in ok]
    summary = (
        f"sent {len(calls)}, ok {len(ok)}, clean errors {len(failed)}; while all down: "
        f"{figures['down_calls_per_s']:.1f} calls/s, longest {figures['down_call_max_s']:.2f} s, Redis "
        f"{figures['redis_per_s_refused']:.0f}/s refused and {figures['redis_per_s_dropping']:.0f}/s "
        f"dropping, backend connections {figures['backend_connections_per_s']:.1f}/s; Redis commands while "
        f"refused {figures['redis_mix']}"
    )
    print(summary, Counter(_window(c, windows) for c in failed))  # noqa: T201 - the drill's figures (-s)

    # Nothing hangs, and every answer is either right or a clean error.
    assert all(c.status for c in calls), [c.raw for c in calls if not c.status]
    for c in ok:
        assert c.content == fleet.reference[c.adapter], (c.adapter, c.content)  # never a wrong adapter
        assert not c.stream or c.done
    for c in failed:
        assert (
            c.error is not None
            and c.error.get("type")
            and re.search(r"\(request id: \S+\)$", c.error["message"])
        ), c.raw
        if c.status == 200:  # a stream broken by the kill: what came before is the adapter's own
            assert c.stream and c.done and fleet.reference[c.adapter].startswith(c.content), c.raw
        else:
            assert c.status in (502, 503), c.raw
            if c.status == 503:
                assert "retry-after" in c.headers, c.headers
        # Only calls in flight while a backend was going down (or all were down) fail.
        assert _window(c, windows) is not None, (c.start, windows)
    for c in calls:  # no internals in any answer
        assert not re.search(r"lgw-[0-9a-f]{32}|127\.0\.0\.1|localhost|cpu-[01]|/tmp|\.safetensors", c.raw), (
            c.raw
        )
    # Each single restart costs at most the calls in flight on the backend at that moment.
    t_first = windows[0][0]
    hit = Counter(_window(c, windows) for c in failed)
    assert hit[0] <= CLIENTS and hit[1] <= CLIENTS, [summary, hit] + [
        (round(c.start - t_first, 2), round(c.end - t_first, 2), c.status, (c.error or {}).get("message"))
        for c in failed
        if _window(c, windows) in (0, 1)
    ]
    for t0, t1 in restarts[:2]:  # while one backend restarted, the other served (warm and cold)
        served = {c.adapter for c in ok if t0 <= c.start and c.end <= t1}
        assert len(served) >= 2 and set(WARM) & served, (summary, served)

    # All down: every call answered at once, and the gateways' calls bounded, not a spin.
    assert figures["down_calls"] > 10 and figures["down_call_max_s"] < 3, summary
    # A spin makes thousands of calls a second (2,452 Redis calls/s here before it was fixed). Bounded:
    # a few per client call (a call that fails makes a handful of Redis and two backend calls), plus
    # each gateway's background (dispatchers publish and look at 20 Hz while anything waits, the
    # reconciler checks each backend every second, and once more per failure).
    client_calls = CLIENTS / BACKOFF_S  # the most calls/s the clients make while every call fails
    assert figures["redis_per_s_refused"] < 20 * client_calls + 100, summary
    assert figures["redis_per_s_dropping"] < 20 * client_calls + 100, summary
    assert figures["backend_connections_per_s"] < 4 * client_calls + 20, summary
    # Back: the traffic after the restart is all served.
    after = figures["after"]
    assert after and all(c.status == 200 and not c.error for c in after), [c.raw for c in after if c.error]

    # Converged within one reconcile period (1 s in the fleet), with nothing left in flight.
    ids = _backend_ids(fleet)
    deadline = time.monotonic() + 1.0 + 2.0  # one period, plus the two-core machine's scheduling
    while True:
        converged = all(_registered(fleet, ids[s.base_url]) == loaded(s) for s in fleet.backends)
        if converged and not _lease_keys(fleet):
            break
        assert time.monotonic() < deadline, [
            (_registered(fleet, ids[s.base_url]), loaded(s)) for s in fleet.backends
        ] + [_lease_keys(fleet)]
        time.sleep(0.1)
