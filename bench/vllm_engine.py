"""A step-level model of one vLLM 0.26 engine serving LoRA requests: how long each batch step takes and
which requests it runs, for bench/placement.py's simulator.

It decides what the simulator believes about vLLM, in one place, with every constant fitted to
measurements on an H200 (bench/gpu/, figures in bench/PLACEMENT.md, "Calibration"):
- Scheduling is vLLM's V1 scheduler (vllm/v1/core/sched/scheduler.py): every step keeps the running
  requests, then admits waiting ones first come first served while fewer than `seats` run
  (--max-num-seqs) and the step's token budget lasts, skipping a request whose adapter would be one
  more distinct adapter than `slots` (--max-loras) in the step. A skipped request keeps its place.
  So requests of adapters beyond the slots wait inside vLLM, and a slot frees when the last running
  request of its adapter ends.
- A step costs `base + per_seq x running + per_prefill x prompt tokens admitted`, times `lora(k)` for
  the k distinct adapters in it, plus `activate` for each adapter that enters a GPU slot (copied from
  host memory; the GPU slots keep the most recently used adapters).
- Replicas sharing one GPU time-slice it: while n replicas of a GPU are mid-step, each step takes n
  times its cost (processor sharing), so two replicas together decode as fast as one alone.
- A runtime load (`/v1/load_lora_adapter`) runs inside the engine loop, between steps: the engine
  decodes nothing meanwhile. It takes `load` seconds, or `load_shared` when another replica of the same
  GPU is loading at the same time."""

from __future__ import annotations

import itertools
from collections import OrderedDict
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class EngineCost:
    """Seconds; fitted in bench/PLACEMENT.md ("Calibration") to bench/gpu/results/2026-12-02.jsonl."""

    # Decode step at n running (1 adapter): 6.14, 7.05, 8.09, 9.6 ms at n = 1, 8, 32, 64 (from p50
    # latency less TTFT over 127 tokens); the prompt tokens admitted with it (~2n per step in a closed
    # loop of 128-token outputs) are inside the slope, split by assumption.
    base: float = 6.09e-3
    per_seq: float = 0.005e-3
    per_prefill: float = 0.025e-3
    # lora(k): the step's cost with k distinct adapters relative to one; k = 8 measured 1.06x of k = 1
    # in latency (64 running), k = 4 1.00x. (DESIGN.md's older table had 1.24x from windowed tok/s.)
    lora_points: tuple[tuple[int, float], ...] = ((0, 0.79), (1, 1.0), (4, 1.0), (8, 1.06))
    # An adapter entering a GPU slot from host memory: fitted to 16 adapters over 8 slots at 64 running
    # (3,166 tok/s, 36.5 running, 20.6 waiting in vLLM measured; 3,422, 36.7, 25.1 simulated).
    activate: float = 0.060
    # A runtime load (/v1/load_lora_adapter) runs inside the engine loop between steps and decodes
    # nothing meanwhile (the timing probe, bench/gpu/probe/: steps per second fell from ~40 to 2.6 while
    # loads came back to back). Its duration, as quantiles (share of loads, seconds): engine-side
    # EngineCore.add_lora of the gateway runs with one load at a time in the pool (2026-12-02-b: pack,
    # affinity, lru; p50 135-198 ms, p90 421-594 ms, max 1.37 s; 83-96 ms on an idle replica).
    load: tuple[tuple[float, float], ...] = ((0.0, 0.04), (0.5, 0.17), (0.9, 0.50), (1.0, 1.37))
    # While the other replica of the same GPU is loading too, both take 2.0-2.9 s (every overlapping
    # load of the earlier runs, p50 2.66 s; cause inside vLLM/CUDA not known: each load pins ~256 host
    # tensors).
    load_shared: tuple[tuple[float, float], ...] = ((0.0, 2.0), (0.5, 2.66), (1.0, 2.92))
    # What a request spends in the API server before the engine sees it and after its last token:
    # 86 ms TTFT at one request in flight less one prefill step.
    request_overhead: float = 0.080
    # Two replicas time-slicing one GPU: each step costs both replicas' compute plus a fixed 10 ms
    # (the timing probe's engine steps, 2026-12-02-c: 28.1 ms at 63 running in the single run, where
    # one replica alone steps in 9.6 ms; 26.6-27.0 ms at 23 running in vLLM alone, 7.4 ms alone). The
    # slot activations inside the step are not time-sliced (the probe's activations took 20-33 ms
    # each whether or not the other replica was stepping). Fitted with `activate` to the eight runs of
    # 2026-12-02-c (60 s after 40 s): every side within 8% (bench/PLACEMENT.md).
    share_overhead: float = 1.0
    share_fixed: float = 0.010
    token_budget: int = 8192  # --max-num-batched-tokens (vLLM's default on an H200)

    def lora(self, k: int) -> float:
        pts = self.lora_points
        if k <= pts[0][0]:
            return pts[0][1]
        for (k0, f0), (k1, f1) in itertools.pairwise(pts):
            if k <= k1:
                return f0 + (f1 - f0) * (k - k0) / (k1 - k0)
        # Beyond the last point (only with more slots than measured): the last slope goes on.
        (k0, f0), (k1, f1) = pts[-2], pts[-1]
        return f1 + (f1 - f0) * (k - k1) / (k1 - k0)

    @staticmethod
    def draw(quantiles: tuple[tuple[float, float], ...], u: float) -> float:
        """The value at share u of a piecewise-linear quantile function ((share, value), ...)."""
        for (u0, v0), (u1, v1) in itertools.pairwise(quantiles):
            if u <= u1:
                return v0 + (v1 - v0) * (u - u0) / (u1 - u0)
        return quantiles[-1][1]

    def step(self, running: int, prefill_tokens: int, k: int, activations: int, sharing: int = 1) -> float:
        """One step's seconds; `sharing` replicas of the GPU stepping at once (this one included)."""
        compute = (self.base + self.per_seq * running + self.per_prefill * prefill_tokens) * self.lora(k)
        if sharing > 1:
            compute = sharing * compute * self.share_overhead + (sharing - 1) * self.share_fixed
        return compute + self.activate * activations


@dataclass(slots=True, eq=False)
class EngineRequest:
    adapter: str
    prompt_tokens: int
    output_tokens: int
    payload: object = None
    done_tokens: int = 0
    first_token: float = float("nan")


@dataclass(slots=True, eq=False)
class Engine:
    """One replica's scheduler state. The simulator drives it: `begin_step` at a step's start picks the
    batch and returns its cost; `end_step` at its end advances every request by one token."""

    slots: int
    seats: int
    cost: EngineCost
    waiting: list[EngineRequest] = field(default_factory=list)  # FCFS
    running: list[EngineRequest] = field(default_factory=list)
    gpu: OrderedDict[str, None] = field(default_factory=OrderedDict)  # adapters in GPU slots, LRU first
    in_step: bool = False

    def submit(self, req: EngineRequest) -> None:
        self.waiting.append(req)

    def begin_step(self, sharing: int = 1) -> float | None:
        """Schedules the next step; its cost in seconds, or None when there is nothing to run."""
        running = self.running
        # A dict, not a set: its order (the batch's) decides GPU-slot evictions, so runs repeat exactly.
        loras = dict.fromkeys(r.adapter for r in running)
        budget = self.cost.token_budget - len(running)
        prefill = 0
        if self.waiting and len(running) < self.seats:
            kept: list[EngineRequest] = []
            waiting = self.waiting
            for i, r in enumerate(waiting):
                if len(running) >= self.seats or budget < r.prompt_tokens:
                    kept.extend(waiting[i:])
                    break
                if r.adapter not in loras and len(loras) >= self.slots:
                    kept.append(r)
                    continue
                loras[r.adapter] = None
                running.append(r)
                budget -= r.prompt_tokens
                prefill += r.prompt_tokens
            self.waiting = kept
        if not running:
            self.in_step = False
            return None
        act = 0
        for a in loras:
            if a in self.gpu:
                self.gpu.move_to_end(a)
            else:
                act += 1
                self.gpu[a] = None
        while len(self.gpu) > self.slots:
            for a in self.gpu:
                if a not in loras:
                    del self.gpu[a]
                    break
        self.in_step = True
        return self.cost.step(len(running), prefill, len(loras), act, sharing)

    def end_step(self, now: float) -> list[EngineRequest]:
        """Every running request gets one token (the first ends its prefill); returns those done."""
        done: list[EngineRequest] = []
        keep: list[EngineRequest] = []
        for r in self.running:
            r.done_tokens += 1
            if r.done_tokens == 1:
                r.first_token = now
            (done if r.done_tokens >= r.output_tokens else keep).append(r)
        self.running = keep
        self.in_step = False
        return done
