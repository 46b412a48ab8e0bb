"""Load generators: closed-loop maximum rate (wrk, or Python when wrk is absent), open-loop fixed rate,
and sequential streaming first-byte latency.

It decides how each figure is measured so that the direct and the gateway runs are measured the same
way: same body, same headers, same client on the same CPU; only the URL differs. Latencies are
timed from the moment a request is handed to the client library. A request that does not answer 200
(or a stream that does not end with [DONE]) is counted as a failure, by cause, and left out of the
latencies; more than a few failures make the measurement fail (ensure_mostly_ok).
"""

from __future__ import annotations

import asyncio
import json
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import aiohttp
import numpy as np

from bench.procs import pinned, run_to_end

_WRK_MARK = "WRK_JSON "
_ERROR_EVENT = b'data: {"error"'
# Our client's pooled connections are dropped before an upstream's keep-alive timeout (vLLM's: 5 s)
# can close them under a request: a failure there would be the load generator's, not the gateway's.
_CLIENT_KEEPALIVE_S = 2.0


class LoadError(RuntimeError):
    """A measurement saw too many failed requests; its figures would be meaningless."""


def ensure_mostly_ok(label: str, errors: Mapping[str, int], total: int) -> None:
    """A few failures are reported with the figures; more than 1% (at least 10) void them."""
    failed = sum(errors.values())
    if failed > max(10, total // 100):
        causes = "; ".join(f"{n} x {cause}" for cause, n in Counter(errors).most_common(5))
        raise LoadError(f"{label}: {failed} of {total} requests failed: {causes}")


@dataclass(frozen=True)
class Target:
    """One side of a comparison: where requests go and what they carry."""

    label: str
    url: str
    method: str = "POST"
    headers: Mapping[str, str] = field(default_factory=dict)
    body: bytes = b""


@dataclass(frozen=True)
class Throughput:
    requests: int
    seconds: float
    tool: str
    client_p50_ms: float  # latency under saturation, from the generator: for context only
    client_p99_ms: float
    errors: Mapping[str, int] = field(default_factory=dict)  # cause -> count; `requests` includes them

    @property
    def rps(self) -> float:
        return self.requests / self.seconds


@dataclass(frozen=True)
class Latencies:
    """Seconds per successful request, failures by cause, and how late the open-loop scheduler sent
    (it must stay near zero)."""

    samples: Sequence[float]
    max_send_lag_ms: float = 0.0
    errors: Mapping[str, int] = field(default_factory=dict)

    @property
    def failed(self) -> int:
        return sum(self.errors.values())

    def pct_ms(self, q: float) -> float:
        if not self.samples:
            return float("nan")
        return float(np.percentile(np.asarray(self.samples), q)) * 1000

    @property
    def p50_ms(self) -> float:
        return self.pct_ms(50)

    @property
    def p99_ms(self) -> float:
        return self.pct_ms(99)


def merge(parts: Sequence[Latencies]) -> Latencies:
    errors: Counter[str] = Counter()
    for part in parts:
        errors.update(part.errors)
    return Latencies(
        samples=[s for p in parts for s in p.samples],
        max_send_lag_ms=max((p.max_send_lag_ms for p in parts), default=0.0),
        errors=dict(errors),
    )


def _latencies(outcomes: Sequence[float | str], max_send_lag_ms: float = 0.0) -> Latencies:
    """Split outcomes (seconds, or the cause of a failure) into samples and failure counts."""
    return Latencies(
        samples=[o for o in outcomes if isinstance(o, float)],
        max_send_lag_ms=max_send_lag_ms,
        errors=dict(Counter(o for o in outcomes if isinstance(o, str))),
    )


# --- closed loop: wrk ---------------------------------------------------------------------------------


def have_wrk() -> bool:
    return shutil.which("wrk") is not None


def _lua_long_string(text: str) -> str:
    level = 0
    while f"]{'=' * level}]" in text:
        level += 1
    eq = "=" * level
    return f"[{eq}[{text}]{eq}]"


def _wrk_script(target: Target) -> str:
    lines = [f"wrk.method = {_lua_long_string(target.method)}"]
    if target.body:
        lines.append(f"wrk.body = {_lua_long_string(target.body.decode())}")
    lines += [
        f"wrk.headers[ {_lua_long_string(k)} ] = {_lua_long_string(v)}" for k, v in target.headers.items()
    ]
    # done() runs once at the end, so it costs nothing per request; a response() hook would slow
    # wrk down. summary.errors.status counts answers outside 2xx/3xx.
    lines.append(
        "done = function(summary, latency, requests)\n"
        "  local e = summary.errors\n"
        f'  io.write(string.format("{_WRK_MARK}'
        '{\\"requests\\":%d,\\"duration_us\\":%d,\\"connect\\":%d,\\"read\\":%d,\\"write\\":%d,'
        '\\"status\\":%d,\\"timeout\\":%d,\\"p50_us\\":%d,\\"p99_us\\":%d}\\n",\n'
        "    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,\n"
        "    latency:percentile(50), latency:percentile(99)))\n"
        "end"
    )
    return "\n".join(lines) + "\n"


def wrk(target: Target, *, cpu: str, connections: int, seconds: float) -> Throughput:
    """Closed loop: `connections` keep-alive connections, each sending its next request on answer."""
    with tempfile.NamedTemporaryFile("w", suffix=".lua", prefix="bench-wrk-") as script:
        script.write(_wrk_script(target))
        script.flush()
        argv = pinned(
            cpu,
            [
                "wrk",
                "-t1",
                f"-c{connections}",
                f"-d{max(1, round(seconds))}s",
                "--timeout",
                "10s",
                "-s",
                script.name,
                target.url,
            ],
        )
        out = run_to_end(argv, timeout_s=seconds + 30)
    line = next((ln for ln in out.splitlines() if ln.startswith(_WRK_MARK)), None)
    if line is None:
        raise LoadError(f"wrk printed no summary:\n{out}")
    stats = json.loads(line[len(_WRK_MARK) :])
    kinds = {
        "status": "answer not 2xx/3xx (wrk)",
        "connect": "connect error (wrk)",
        "read": "read error (wrk)",
        "write": "write error (wrk)",
        "timeout": "timeout (wrk)",
    }
    return Throughput(
        requests=stats["requests"],
        seconds=stats["duration_us"] / 1e6,
        tool="wrk",
        client_p50_ms=stats["p50_us"] / 1000,
        client_p99_ms=stats["p99_us"] / 1000,
        errors={cause: stats[key] for key, cause in kinds.items() if stats[key]},
    )


# --- closed loop: Python fallback ---------------------------------------------------------------------


async def closed_loop(target: Target, *, connections: int, seconds: float) -> Throughput:
    """The same closed loop as wrk in aiohttp: slower, so it can cap the figure it measures."""
    outcomes: list[float | str] = []
    connector = aiohttp.TCPConnector(limit=connections, keepalive_timeout=_CLIENT_KEEPALIVE_S)
    async with aiohttp.ClientSession(connector=connector) as session:
        deadline = time.perf_counter() + seconds

        async def worker() -> None:
            while time.perf_counter() < deadline:
                outcomes.append(await _one(session, target))

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(connections)))
        elapsed = time.perf_counter() - started
    lat = _latencies(outcomes)
    return Throughput(len(outcomes), elapsed, "python", lat.p50_ms, lat.p99_ms, lat.errors)


async def _one(session: aiohttp.ClientSession, target: Target) -> float | str:
    """Seconds until the whole answer is read, or why it failed."""
    started = time.perf_counter()
    try:
        async with session.request(
            target.method, target.url, headers=target.headers, data=target.body
        ) as response:
            body = await response.read()
    except (aiohttp.ClientError, OSError, TimeoutError) as exc:
        return _exception_cause(exc)
    if response.status != 200:
        return _status_cause(response.status, body)
    return time.perf_counter() - started


def _exception_cause(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:160]


def _status_cause(status: int, body: bytes) -> str:
    """The status and the error's message (OpenAI envelope), short, so that equal failures group."""
    try:
        message = json.loads(body)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = body[:120].decode(errors="replace")
    return f"{status}: {message}"[:160]


# --- open loop at a fixed rate --------------------------------------------------------------------------


async def fixed_rate(target: Target, *, rate: float, seconds: float) -> Latencies:
    """Open loop: send at `rate` per second whatever the answers do, and time each request.

    Send times never wait for answers, so a slow proxy shows up as latency rather than as a lower
    rate (no coordinated omission). max_send_lag_ms says how late the scheduler itself ran.
    """
    count = max(1, round(rate * seconds))
    connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=_CLIENT_KEEPALIVE_S)
    async with aiohttp.ClientSession(connector=connector) as session:
        start = time.perf_counter() + 0.01
        tasks: list[asyncio.Task[float | str]] = []
        worst_lag = 0.0
        for i in range(count):
            due = start + i / rate
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            worst_lag = max(worst_lag, time.perf_counter() - due)
            tasks.append(asyncio.create_task(_one(session, target)))
        outcomes = await asyncio.gather(*tasks)
    return _latencies(outcomes, max_send_lag_ms=worst_lag * 1000)


# --- streaming first byte --------------------------------------------------------------------------------


async def first_bytes(targets: Sequence[Target], *, requests: int) -> list[Latencies]:
    """One client, one request at a time, alternating targets so that drift hits both alike.

    Measures the time until the first body byte of the SSE stream (what a chat UI waits for); the
    rest of the stream is read and checked to end with `data: [DONE]`.
    """
    outcomes: list[list[float | str]] = [[] for _ in targets]
    connector = aiohttp.TCPConnector(limit=len(targets), keepalive_timeout=_CLIENT_KEEPALIVE_S)
    async with aiohttp.ClientSession(connector=connector) as session:
        for _ in range(requests):
            for i, target in enumerate(targets):
                outcomes[i].append(await _first_byte(session, target))
    return [_latencies(o) for o in outcomes]


async def _first_byte(session: aiohttp.ClientSession, target: Target) -> float | str:
    started = time.perf_counter()
    try:
        async with session.request(
            target.method, target.url, headers=target.headers, data=target.body
        ) as response:
            first = await response.content.readany()
            elapsed = time.perf_counter() - started
            stream = first + await response.content.read()
    except (aiohttp.ClientError, OSError, TimeoutError) as exc:
        return _exception_cause(exc)
    if response.status != 200:
        return _status_cause(response.status, stream)
    if not stream.rstrip().endswith(b"data: [DONE]"):
        return f"stream did not end with data: [DONE]: {stream[-100:]!r}"
    error_at = stream.find(_ERROR_EVENT)
    if error_at >= 0:
        return f"error event in the stream: {stream[error_at:][:120]!r}"
    return elapsed
