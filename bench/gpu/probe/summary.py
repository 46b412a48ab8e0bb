"""What the timing probe (sitecustomize.py beside this file) saw during each run of a results file.

    python3 bench/gpu/probe/summary.py PROBE_DIR RESULTS.jsonl [--json]

Per run (its warm-up, measured window and drain, from the run's `wall` and `warm`): the gateway's loads
(Router._load, and its HTTP calls to vLLM), vLLM's side of them (the API handler, the engine round
trip, the engine's own add_lora, loads from disk), GPU-slot activations, engine steps per process, the
gateway dispatcher's passes and its event loop's lag."""

from __future__ import annotations

import argparse
import glob
import json
import os
from collections import defaultdict
from pathlib import Path
from typing import Any

TIMED = (
    "gw.load",
    "gw.http_load",
    "gw.http_unload",
    "api.load_lora_adapter",
    "api.engine_add_lora",
    "core.add_lora",
    "worker.load_from_disk",
)
PER_SECOND = ("core.steps", "core.input_queue", "worker.activations", "gw.pass", "gw.loop_lag")


def pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return round(xs[min(len(xs) - 1, int(q * len(xs)))], 1)


def summarize(events: list[dict[str, Any]], t0: float, t1: float) -> dict[str, Any]:
    inside = [e for e in events if t0 <= e["t"] <= t1]
    span = max(t1 - t0, 1e-9)
    out: dict[str, Any] = {"span_s": round(span, 1)}
    for kind in TIMED:
        ms = [e["ms"] for e in inside if e["kind"] == kind]
        if ms:
            out[kind] = {
                "n": len(ms),
                "p50_ms": pct(ms, 0.5),
                "p90_ms": pct(ms, 0.9),
                "max_ms": round(max(ms), 1),
                "failed": sum(1 for e in inside if e["kind"] == kind and not e.get("ok", True)),
            }
    for kind in PER_SECOND:
        by_pid: dict[int, list[dict[str, Any]]] = defaultdict(list)
        for e in inside:
            if e["kind"] == kind:
                by_pid[e["pid"]].append(e)
        for pid, es in sorted(by_pid.items()):
            n = sum(e["n"] for e in es)
            total = sum(e["sum_ms"] for e in es)
            row = {
                "per_s": round(n / span, 1),
                "mean_ms": round(total / n, 2) if n else None,
                "max_ms": max(e["max_ms"] for e in es),
                "busy": round(total / 1e3 / span, 3),
            }
            for k in ("running", "waiting", "waiters"):
                if any(k in e for e in es):
                    row[f"{k}_mean"] = round(sum(e.get(k, 0) for e in es) / n, 1) if n else None
            out[f"{kind}[{pid}]"] = row
    return out


def read_events(probe_dir: Path) -> list[dict[str, Any]]:
    return [
        json.loads(line)
        for f in glob.glob(os.path.join(probe_dir, "probe-*.jsonl"))
        for line in Path(f).read_text().splitlines()
        if line.strip()
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("probe_dir")
    ap.add_argument("results")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    events = read_events(Path(args.probe_dir))
    for line in Path(args.results).read_text().splitlines():
        r = json.loads(line)
        if r.get("kind") != "run" or "wall" not in r:
            continue
        s = summarize(events, r["wall"][0] - r.get("warm", 0), r["wall"][1])
        if args.json:
            print(json.dumps({"spec": r["spec"], **s}))  # noqa: T201
            continue
        print(f"== {r['spec']}: {r.get('goodput_tok_s')} tok/s, 503s {r.get('failed')}")  # noqa: T201
        for k, v in s.items():
            print(f"  {k}: {v}")  # noqa: T201


if __name__ == "__main__":
    main()
