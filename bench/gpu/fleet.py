"""The placement workloads on real vLLM: two LoRA replicas on one H200, vLLM alone or behind the gateway.

It decides how the simulator's figures are checked against the real engine: the same judged workloads
(Zipf(1.0) over 64 adapters, 2 replicas x 8 GPU slots x 64 seats, 256 prompt / 128 output tokens),
measured the same way for every side, plus the calibration runs the simulator's cost model is fitted to.
Runs on the GPU machine after `bench/gpu/setup.sh` (see bench/gpu/README.md); one JSON line per run in
$OUT/results.jsonl (per-request records in $OUT/records-<run>.json.gz when --records is given).

    python3 bench/gpu/fleet.py calibrate [--seconds 20]
    python3 bench/gpu/fleet.py run SPEC [SPEC ...] [--seconds 60] [--warm 15]
      SPEC = SIDE:LOOP:LEVEL, SIDE = direct | single | gw-<policy>[@capacity], LOOP = closed (LEVEL: x seats) | open
      (LEVEL: share of the single-adapter rate); e.g. direct:closed:1 gw-lru:open:0.5 single:closed:1
Sides: `direct` is vLLM alone, every replica holding all 64 adapters (--max-cpu-loras 64), requests
spread round-robin; `single` is the reference, one adapter on both replicas, round-robin;
`gw-<policy>` is the gateway on its embedded defaults with GATEWAY_PLACEMENT_POLICY=<policy>."""

from __future__ import annotations

import argparse
import asyncio
import functools
import gzip
import itertools
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from load import Load, Route, dump, summarize, zipf_picker

E = os.environ.get
ROOT = Path(__file__).resolve().parents[2]  # the project checkout
MODEL = Path(E("FLEET_MODEL", "/root/m"))
LOGS = Path(E("FLEET_LOGS", "/root/logs"))
DATA = Path(E("FLEET_DATA", "/root/gw"))
OUT = Path(E("OUT", "/tmp/fleet-out"))
SITE = E("FLEET_SITE", "/tmp/gwsite:/tmp/site")
# With PROBE_DIR set, the gateway runs with bench/gpu/probe on its path (timings of its loads, passes and
# event loop; setup.sh does the same for vLLM): probe/summary.py reads what it writes.
PROBE = Path(__file__).resolve().parent / "probe"
REPLICAS = {"A": "http://127.0.0.1:8001", "B": "http://127.0.0.1:8002"}
GATEWAY = "http://127.0.0.1:8080"
ADMIN = "fleet-admin-key-0123456789abcdef"
BASE = "mistral-7b"
ADAPTERS = 64
TENANTS = 4
NAMES = [f"a{i:02d}" for i in range(ADAPTERS)]  # Zipf rank order: a00 is the hottest
SEATS = 64  # --max-num-seqs of each replica (registered as max_num_seqs)
SLOTS = 8  # --max-loras
CAPACITY = 16  # registered capacity of each backend in the gateway
ZIPF_S = 1.0
T0 = time.perf_counter()


def emit(kind: str, obj: dict[str, object]) -> None:
    line = json.dumps({"kind": kind, "at_s": round(time.perf_counter() - T0, 1), **obj})
    print(line, flush=True)  # noqa: T201 - the run's output
    OUT.mkdir(parents=True, exist_ok=True)
    with open(OUT / "results.jsonl", "a") as f:
        f.write(line + "\n")


def tenant_of(i: int) -> str:
    return f"t{i % TENANTS}"


# --- vLLM replicas


def served(url: str) -> list[str]:
    return [m["id"] for m in httpx.get(url + "/v1/models", timeout=10).json()["data"]]


def load_adapter(url: str, name: str, path: Path) -> float:
    t = time.perf_counter()
    r = httpx.post(
        url + "/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(path)}, timeout=300
    )
    if r.status_code != 200 and "already" not in r.text:
        raise SystemExit(f"load {name} on {url}: {r.status_code} {r.text[:200]}")
    return time.perf_counter() - t


def unload_all(url: str, keep: Callable[[str], bool] = lambda name: False) -> int:
    n = 0
    for m in served(url):
        if m != BASE and not keep(m):
            httpx.post(url + "/v1/unload_lora_adapter", json={"lora_name": m}, timeout=60)
            n += 1
    return n


def log_offsets() -> dict[str, int]:
    return {
        r: (LOGS / f"vllm-{r}.log").stat().st_size if (LOGS / f"vllm-{r}.log").exists() else 0
        for r in REPLICAS
    }


def log_events(offsets: dict[str, int]) -> dict[str, dict[str, int]]:
    """Loads and unloads each replica's log shows since the offsets (vLLM logs both at INFO)."""
    out = {}
    for r, off in offsets.items():
        if not (LOGS / f"vllm-{r}.log").exists():
            continue
        with open(LOGS / f"vllm-{r}.log", "rb") as f:
            f.seek(off)
            text = f.read().decode(errors="replace")
        out[r] = {
            "loads": text.count("Loaded new LoRA adapter"),
            "unloads": text.count("Removed LoRA adapter"),
            "errors": len(re.findall(r"\bERROR\b|Traceback", text)),
        }
    return out


_METRIC = re.compile(r"^(vllm:num_requests_(?:running|waiting))\{[^}]*\} ([0-9.e+]+)$", re.MULTILINE)


class EngineSampler:
    """Samples each replica's running and waiting requests (vLLM's /metrics) once a second."""

    def __init__(self) -> None:
        self.samples: dict[str, list[tuple[float, float]]] = {r: [] for r in REPLICAS}
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        async with httpx.AsyncClient(timeout=2) as c:
            while True:
                for r, url in REPLICAS.items():
                    try:
                        text = (await c.get(url + "/metrics")).text
                        vals = {m.group(1): float(m.group(2)) for m in _METRIC.finditer(text)}
                        self.samples[r].append(
                            (
                                vals.get("vllm:num_requests_running", 0),
                                vals.get("vllm:num_requests_waiting", 0),
                            )
                        )
                    except httpx.HTTPError:
                        pass
                await asyncio.sleep(1.0)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    def stop(self) -> dict[str, dict[str, float]]:
        if self._task:
            self._task.cancel()
        out = {}
        for r, s in self.samples.items():
            if s:
                out[r] = {
                    "running_mean": round(sum(x[0] for x in s) / len(s), 1),
                    "waiting_mean": round(sum(x[1] for x in s) / len(s), 1),
                }
        return out


# --- the gateway


def gateway_env(policy: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    env.update(
        GATEWAY_DATA_DIR=str(DATA),
        GATEWAY_ADMIN_API_KEY=ADMIN,
        GATEWAY_PLACEMENT_POLICY=policy,
        # Both replicas share one GPU: one adapter load at a time between them (bench/PLACEMENT.md).
        GATEWAY_PLACEMENT_POOL_LOADS="1",
        PYTHONUNBUFFERED="1",
        PYTHONPATH=f"{ROOT}:{PROBE}:{SITE}" if E("PROBE_DIR") else f"{ROOT}:{SITE}",
    )
    env.update(json.loads(E("FLEET_GATEWAY_ENV", "{}")))
    return env


def gateway_stop() -> None:
    pid_file = DATA / "gateway.pid"
    if not pid_file.exists():
        return
    pid = int(pid_file.read_text())
    pid_file.unlink()
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    for _ in range(100):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    os.killpg(pid, signal.SIGKILL)


def gateway_start(policy: str) -> int:
    gateway_stop()
    DATA.mkdir(parents=True, exist_ok=True)
    env = gateway_env(policy)
    py = sys.executable
    subprocess.run([py, "-m", "app.cli", "migrate"], cwd=DATA, env=env, check=True, capture_output=True)
    log = open(LOGS / f"gateway-{policy}.log", "ab")  # noqa: SIM115 - the child keeps it
    p = subprocess.Popen(
        [py, "-m", "app.cli", "serve", "--host", "127.0.0.1", "--port", "8080"],
        cwd=DATA,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )
    (DATA / "gateway.pid").write_text(str(p.pid))
    for _ in range(300):
        try:
            if httpx.get(GATEWAY + "/healthz", timeout=1).status_code == 200:
                return p.pid
        except httpx.HTTPError:
            pass
        if p.poll() is not None:
            break
        time.sleep(0.2)
    raise SystemExit(
        f"gateway ({policy}) did not start: {(LOGS / f'gateway-{policy}.log').read_text()[-2000:]}"
    )


def provision() -> dict[str, object]:
    """Base model, both backends, the tenants and their adapters: once per machine (kept in DATA)."""
    state_file = DATA / "fleet-state.json"
    if state_file.exists():
        return json.loads(state_file.read_text())
    admin = httpx.Client(
        base_url=GATEWAY + "/admin/v1", headers={"Authorization": f"Bearer {ADMIN}"}, timeout=300
    )

    def ok(r: httpx.Response) -> dict[str, object]:
        if r.status_code >= 300:
            raise SystemExit(f"{r.request.method} {r.request.url}: {r.status_code} {r.text[:300]}")
        return r.json()

    ok(admin.post("/base-models", json={"name": BASE, "path": str(MODEL / "base")}))
    for r, url in REPLICAS.items():
        ok(
            admin.post(
                "/backends",
                json={
                    "name": f"vllm-{r.lower()}",
                    "url": url,
                    "base_model": BASE,
                    "gpu_slots": SLOTS,
                    "max_lora_rank": 16,
                    "capacity": CAPACITY,
                    "max_num_seqs": SEATS,
                },
            )
        )
    keys = {}
    for t in range(TENANTS):
        ok(admin.post("/tenants", json={"name": f"t{t}"}))
        keys[f"t{t}"] = ok(admin.post(f"/tenants/t{t}/api-keys", json={"name": "bench"}))["key"]
    t = time.perf_counter()
    for i, name in enumerate(NAMES):
        d = MODEL / f"lora{i}"
        files = [
            ("file", (n, (d / n).read_bytes(), "application/octet-stream"))
            for n in ("adapter_config.json", "adapter_model.safetensors")
        ]
        ok(admin.post(f"/tenants/{tenant_of(i)}/adapters", data={"name": name}, files=files))
    state = {"keys": keys}
    state_file.write_text(json.dumps(state))
    emit(
        "provision", {"adapters": ADAPTERS, "tenants": TENANTS, "upload_s": round(time.perf_counter() - t, 1)}
    )
    return state


def probe_summary(probe_dir: Path, t0: float, t1: float) -> dict[str, object]:
    """What bench/gpu/probe/ recorded in [t0, t1], per kind (probe/summary.py's figures)."""
    sys.path.insert(0, str(PROBE))
    from summary import read_events, summarize

    return summarize(read_events(probe_dir), t0, t1)


def register_capacity(capacity: int) -> None:
    """The backends' registered capacity for this run (`gw-<policy>@<capacity>`; CAPACITY without)."""
    for r in REPLICAS:
        resp = httpx.patch(
            f"{GATEWAY}/admin/v1/backends/vllm-{r.lower()}",
            json={"capacity": capacity},
            headers={"Authorization": f"Bearer {ADMIN}"},
            timeout=30,
        )
        if resp.status_code != 200:
            raise SystemExit(f"capacity of vllm-{r.lower()}: {resp.status_code} {resp.text[:200]}")


# --- runs


def direct_route() -> Callable[[str], Route]:
    urls = itertools.cycle(REPLICAS.values())
    return lambda adapter: Route(next(urls), f"direct-{adapter}")


def ensure_direct_adapters(names: Sequence[str]) -> None:
    """vLLM alone: every replica holds every adapter, loaded once up front under its own name."""
    for url in REPLICAS.values():
        have = set(served(url))
        for name in names:
            if f"direct-{name}" not in have:
                load_adapter(url, f"direct-{name}", MODEL / f"lora{NAMES.index(name)}")


def single_rate() -> float:
    p = DATA / "single.json"
    if p.exists():
        return float(json.loads(p.read_text())["goodput_tok_s"])
    raise SystemExit("run single:closed:1 first: the open-loop rates are shares of its goodput")


async def measure(
    load: Load, pick: Callable[[], str], loop: str, level: float, seconds: float, warm: float
) -> dict[str, object]:
    sampler = EngineSampler()

    async def sample_after_warm_up() -> None:
        await asyncio.sleep(warm)
        sampler.start()

    starter = asyncio.create_task(sample_after_warm_up())
    if loop == "closed":
        start, stop = await load.closed(pick, round(level * SEATS * len(REPLICAS)), warm + seconds)
    else:
        rate = level * single_rate() / load.output_tokens
        start, stop = await load.open(pick, rate, warm + seconds, drain_s=60)
    await starter
    engine = sampler.stop()
    summary = summarize(load.records, start + warm, stop, closed=loop == "closed")
    return {**summary, "engine": engine, "origin": start}


def run(spec: str, seconds: float, warm: float, records: bool) -> None:
    side, loop, level_s = spec.split(":")
    level = float(level_s)
    if loop not in ("closed", "open"):
        raise SystemExit(f"{spec}: LOOP must be closed or open")
    gateway_stop()
    if side in ("direct", "single"):
        names = NAMES if side == "direct" else NAMES[:1]
        for url in REPLICAS.values():
            unload_all(url, keep=lambda m: m.startswith("direct-"))
        ensure_direct_adapters(names)
        route = direct_route()
        pick = zipf_picker(NAMES, ZIPF_S, seed=3) if side == "direct" else (lambda: NAMES[0])
    elif side.startswith("gw-"):
        for url in REPLICAS.values():
            unload_all(url)  # the gateway starts cold: vLLM holds none of its adapters
        policy, _, capacity = side[3:].partition("@")
        gateway_start(policy)
        keys = provision()["keys"]
        register_capacity(int(capacity or CAPACITY))
        route = lambda adapter: Route(GATEWAY, adapter, keys[tenant_of(NAMES.index(adapter))])
        pick = zipf_picker(NAMES, ZIPF_S, seed=3)
    else:
        raise SystemExit(f"{spec}: SIDE must be direct, single or gw-<policy>")
    offsets = log_offsets()
    load = Load(route)
    wall0 = time.time()
    summary = asyncio.run(measure(load, pick, loop, level, seconds, warm))
    wall = [
        round(wall0 + warm, 2),
        round(time.time(), 2),
    ]  # the measured window (and the drain), for the probe
    origin = summary.pop("origin")
    result = {
        "spec": spec,
        "side": side,
        "loop": loop,
        "level": level,
        "seconds": seconds,
        "warm": warm,
        **summary,
        "vllm": log_events(offsets),
        "wall": wall,
    }
    if side.startswith("gw-"):
        gateway_stop()
    if E("PROBE_DIR"):
        result["probe"] = probe_summary(Path(E("PROBE_DIR", "")), wall[0] - warm, wall[1])
    if side == "single":
        (DATA / "single.json").write_text(json.dumps(result))
    if side != "single":
        try:
            result["fraction"] = round(float(summary["goodput_tok_s"]) / single_rate(), 3)
        except SystemExit:
            result["fraction"] = None
    emit("run", result)
    if records:
        with gzip.open(OUT / f"records-{spec.replace(':', '_')}.json.gz", "wt") as f:
            json.dump(dump(load.records, origin), f)


def calibrate(seconds: float, only: Sequence[str] = ()) -> None:
    """The simulator's cost model, measured on replica A alone (B idle) with every adapter resident:
    batch throughput by batch size (1 adapter) and by distinct adapters (64 running), vLLM's queueing
    when more adapters are in flight than it has slots, the two replicas sharing the GPU, and loads."""
    gateway_stop()
    a, b = REPLICAS["A"], REPLICAS["B"]
    for url in (a, b):
        unload_all(url, keep=lambda m: m.startswith("direct-"))
    ensure_direct_adapters(NAMES[:32])
    loads = [round(load_adapter(a, f"cal-{i}", MODEL / f"lora{40 + i}"), 3) for i in range(4)]
    for i in range(4):
        httpx.post(a + "/v1/unload_lora_adapter", json={"lora_name": f"cal-{i}"}, timeout=60)
    emit("calibrate", {"what": "load on idle A", "load_s": loads})

    async def one(
        label: str,
        urls: Sequence[str],
        adapters: Sequence[str],
        conc: int,
        load_during: bool = False,
        together: bool = False,
    ) -> None:
        cycle = itertools.cycle(urls)
        names = itertools.cycle(adapters)
        load = Load(lambda ad: Route(next(cycle), f"direct-{ad}"))
        sampler = EngineSampler()
        load_times: list[float] = []

        async def loads_meanwhile() -> None:
            await asyncio.sleep(seconds / 2)
            if together:
                t = time.perf_counter()
                done = await asyncio.gather(
                    *(
                        asyncio.to_thread(load_adapter, a, f"cal-{i}", MODEL / f"lora{40 + i}")
                        for i in range(4)
                    )
                )
                load_times.extend(round(x, 3) for x in done)
                load_times.append(round(time.perf_counter() - t, 3))
                return
            for i in range(4):
                load_times.append(
                    round(await asyncio.to_thread(load_adapter, a, f"cal-{i}", MODEL / f"lora{40 + i}"), 3)
                )
                await asyncio.sleep(1.0)

        async def go() -> tuple[float, float]:
            sampler.start()
            extra = asyncio.create_task(loads_meanwhile()) if load_during else None
            w = await load.closed(lambda: next(names), conc, seconds + 5)
            if extra:
                await extra
            return w

        start, stop = await go()
        summary = summarize(load.records, start + 5, stop, closed=True)
        emit(
            "calibrate",
            {
                "what": label,
                "replicas": len(urls),
                "adapters": len(adapters),
                "conc": conc,
                **summary,
                "engine": sampler.stop(),
                **({"load_s": load_times} if load_during else {}),
            },
        )
        if load_during:
            for i in range(4):
                httpx.post(a + "/v1/unload_lora_adapter", json={"lora_name": f"cal-{i}"}, timeout=60)  # noqa: ASYNC210 - between runs

    one_ad = NAMES[:1]
    steps: list[tuple[str, Callable[[], object]]] = [
        *(
            (f"batch{c}", functools.partial(one, "batch size, 1 adapter", [a], one_ad, c))
            for c in (1, 8, 32, 64)
        ),
        *(
            (f"distinct{k}", functools.partial(one, "distinct adapters, 64 running", [a], NAMES[:k], 64))
            for k in (4, 8)
        ),
        ("overflow16", functools.partial(one, "more adapters in flight than slots", [a], NAMES[:16], 64)),
        ("share", functools.partial(one, "both replicas share the GPU, 1 adapter", [a, b], one_ad, 128)),
        ("loads8", functools.partial(one, "loads while A decodes 8 adapters", [a], NAMES[:8], 64, True)),
        (
            "loads8together",
            functools.partial(
                one, "4 loads at once while A decodes 8 adapters", [a], NAMES[:8], 64, True, True
            ),
        ),
        # More adapters in flight than GPU slots (the state of every gateway run): vLLM swaps slots every
        # step, and a runtime load also takes one (PLACEMENT.md).
        (
            "loads16",
            functools.partial(one, "loads while A decodes 16 adapters on 8 slots", [a], NAMES[:16], 64, True),
        ),
    ]
    for key, step in steps:
        if not only or key in only:
            asyncio.run(step())  # type: ignore[arg-type]


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("calibrate")
    c.add_argument("--seconds", type=float, default=20)
    c.add_argument("--only", nargs="*", default=(), help="calibration steps to run (default: all)")
    r = sub.add_parser("run")
    r.add_argument("specs", nargs="+")
    r.add_argument("--seconds", type=float, default=60)
    r.add_argument("--warm", type=float, default=15)
    r.add_argument("--records", action="store_true")
    r.add_argument("--limit-s", type=float, default=1e9, help="skip the specs that would start after this")
    args = ap.parse_args(argv)
    OUT.mkdir(parents=True, exist_ok=True)
    DATA.mkdir(parents=True, exist_ok=True)
    if args.cmd == "calibrate":
        calibrate(args.seconds, args.only)
    else:
        for spec in args.specs:
            if time.perf_counter() - T0 > args.limit_s:
                emit("skipped", {"spec": spec, "why": "time limit"})
                continue
            run(spec, args.seconds, args.warm, args.records)


if __name__ == "__main__":
    main()
