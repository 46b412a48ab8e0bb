"""Load for the GPU fleet runs: closed- or open-loop streaming completions of fixed length against an
OpenAI-style `/v1/completions` (a vLLM replica or the gateway), one record per request.

It decides what a request of the judged workloads is, so that vLLM alone and the gateway see the same:
a prompt of `prompt_tokens` random words (the bench model's word-level tokenizer makes each one token),
exactly `output_tokens` out (`min_tokens` = `max_tokens`, `ignore_eos`), streamed, so time to first
token is seen. A request counts as served only with status 200 and a stream ending in [DONE]; anything
else is a failure, kept with its status and the start of its body.
Only the standard library and aiohttp: it runs on the GPU machine without the project's venv."""

from __future__ import annotations

import asyncio
import itertools
import json
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import aiohttp


@dataclass(slots=True)
class Record:
    adapter: str  # the workload's name for it (its Zipf rank order: a00 is the hottest)
    t0: float  # sent (perf_counter)
    t1: float = math.nan  # answered, or failed
    ttft: float = math.nan  # seconds from t0 to the first token
    status: str = ""  # "200" when served; the HTTP status or a cause otherwise
    tokens: int = 0
    error: str = ""

    @property
    def ok(self) -> bool:
        return self.status == "200"


@dataclass(frozen=True, slots=True)
class Route:
    """Where a request for one of the workload's adapters goes and what it names there."""

    url: str
    model: str
    key: str | None = None


def zipf_picker(names: Sequence[str], s: float, seed: int) -> Callable[[], str]:
    """names[0] has rank 1: P(names[i]) ~ 1 / (i + 1) ** s."""
    rng = random.Random(seed)
    weights = [1.0 / (i + 1) ** s for i in range(len(names))]
    cum = list(itertools.accumulate(weights))
    return lambda: rng.choices(names, cum_weights=cum)[0]


class Load:
    def __init__(
        self,
        route: Callable[[str], Route],
        *,
        prompt_tokens: int = 256,
        output_tokens: int = 128,
        vocab: int = 32000,
        seed: int = 7,
    ) -> None:
        self.route = route
        self.prompt_tokens = prompt_tokens
        self.output_tokens = output_tokens
        self.vocab = vocab
        self.rng = random.Random(seed)
        self.records: list[Record] = []

    def _body(self, model: str) -> bytes:
        words = " ".join(f"w{self.rng.randrange(3, self.vocab)}" for _ in range(self.prompt_tokens))
        return json.dumps(
            {
                "model": model,
                "prompt": words,
                "max_tokens": self.output_tokens,
                "min_tokens": self.output_tokens,
                "ignore_eos": True,
                "temperature": 0,
                "stream": True,
                "stream_options": {"include_usage": True},
            }
        ).encode()

    async def one(self, session: aiohttp.ClientSession, adapter: str) -> Record:
        r = self.route(adapter)
        headers = {"content-type": "application/json"}
        if r.key:
            headers["authorization"] = f"Bearer {r.key}"
        rec = Record(adapter, time.perf_counter())
        self.records.append(rec)
        try:
            async with session.post(
                r.url + "/v1/completions", data=self._body(r.model), headers=headers
            ) as resp:
                if resp.status != 200:
                    rec.status, rec.error = str(resp.status), (await resp.text())[:300]
                    return rec
                done = False
                async for line in resp.content:
                    if not line.startswith(b"data: "):
                        continue
                    data = line[6:].strip()
                    if data == b"[DONE]":
                        done = True
                        break
                    event = json.loads(data)
                    if "error" in event:
                        rec.status, rec.error = "stream-error", str(event["error"])[:300]
                        return rec
                    choices = event.get("choices") or []
                    if choices and math.isnan(rec.ttft) and choices[0].get("text"):
                        rec.ttft = time.perf_counter() - rec.t0
                    if event.get("usage") and not choices:
                        rec.tokens = event["usage"]["completion_tokens"]
                rec.status = "200" if done else "no-done"
        except asyncio.CancelledError:
            rec.status = "cancelled"
            raise
        except Exception as exc:  # noqa: BLE001 - a failure to count, not to stop the run
            rec.status, rec.error = "exception", repr(exc)[:300]
        finally:
            rec.t1 = time.perf_counter()
        return rec

    @staticmethod
    def session() -> aiohttp.ClientSession:
        # Pooled connections are dropped before vLLM's 5 s keep-alive can close one under a request.
        conn = aiohttp.TCPConnector(limit=0, keepalive_timeout=2)
        return aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=900))

    async def closed(self, pick: Callable[[], str], clients: int, seconds: float) -> tuple[float, float]:
        """`clients` loops, each sending its next request when one is answered, for `seconds`; the
        requests still running then are cancelled (status "cancelled"). Returns (start, stop)."""
        async with self.session() as session:
            start = time.perf_counter()
            stop = start + seconds

            async def client() -> None:
                while time.perf_counter() < stop:
                    await self.one(session, pick())

            tasks = [asyncio.create_task(client()) for _ in range(clients)]
            await asyncio.sleep(seconds)
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        return start, stop

    async def open(
        self, pick: Callable[[], str], rate: float, seconds: float, drain_s: float, seed: int = 11
    ) -> tuple[float, float]:
        """Poisson arrivals at `rate` per second for `seconds`, then up to `drain_s` for the requests
        that arrived to end (the rest are cancelled). Returns (start, stop of arrivals)."""
        rng = random.Random(seed)
        async with self.session() as session:
            start = time.perf_counter()
            stop = start + seconds
            tasks: list[asyncio.Task[Record]] = []
            t = start
            while True:
                t += rng.expovariate(rate)
                if t >= stop:
                    break
                await asyncio.sleep(max(0.0, t - time.perf_counter()))
                tasks.append(asyncio.create_task(self.one(session, pick())))
            _, pending = await asyncio.wait(tasks, timeout=drain_s) if tasks else (set(), set())
            for p in pending:
                p.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        return start, stop


def percentile(xs: Sequence[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    k = (len(xs) - 1) * q / 100.0
    lo = math.floor(k)
    hi = min(lo + 1, len(xs) - 1)
    return round(xs[lo] + (xs[hi] - xs[lo]) * (k - lo), 4)


def summarize(records: Sequence[Record], w0: float, w1: float, *, closed: bool) -> dict[str, object]:
    """Figures over the window [w0, w1]. Closed loop: the requests that ended inside it. Open loop: the
    requests that arrived inside it (their latency may end after w1). Goodput counts served requests'
    tokens; failures are counted by status ("cancelled": still running when the run stopped)."""
    if closed:
        inside = [r for r in records if w0 <= r.t1 <= w1]
    else:
        inside = [r for r in records if w0 <= r.t0 <= w1]
    ok = [r for r in inside if r.ok]
    bad = [r for r in inside if not r.ok and r.status != "cancelled"]
    lat = [r.t1 - r.t0 for r in ok]
    ttft = [r.ttft for r in ok if not math.isnan(r.ttft)]
    failures: dict[str, int] = {}
    for r in bad:
        failures[r.status] = failures.get(r.status, 0) + 1
    window = w1 - w0
    served_tokens = sum(r.tokens for r in ok if closed or r.t1 <= w1)
    return {
        "window_s": round(window, 1),
        "requests": len(inside),
        "served": len(ok),
        "goodput_tok_s": round(served_tokens / window, 1),
        "p50_s": percentile(lat, 50),
        "p99_s": percentile(lat, 99),
        "ttft_p50_s": percentile(ttft, 50),
        "ttft_p99_s": percentile(ttft, 99),
        "failed": failures,
        "unfinished": sum(1 for r in inside if r.status == "cancelled"),
        "error_samples": sorted({r.error[:160] for r in bad})[:3],
        "short_outputs": sum(1 for r in ok if r.tokens != ok[0].tokens) if ok else 0,
    }


def dump(records: Sequence[Record], t_origin: float) -> list[dict[str, object]]:
    """Records with times relative to t_origin, for the simulator's replay and later analysis."""
    out = []
    for r in records:
        d = asdict(r)
        d["t0"] = round(r.t0 - t_origin, 4)
        d["t1"] = round(r.t1 - t_origin, 4)
        d["ttft"] = None if math.isnan(r.ttft) else round(r.ttft, 4)
        out.append(d)
    return out
