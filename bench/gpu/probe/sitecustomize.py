"""Timing probe for the placement runs (bench/gpu/README.md): on PYTHONPATH, it wraps a few functions of
vLLM and of the gateway as their modules are imported and writes what they took, one JSON line per
event (or per second, for the frequent ones), to $PROBE_DIR/probe-<pid>.jsonl. Nothing is changed but
the timing. It exists to answer where a runtime LoRA load spends its time under load:
- vLLM API server: the /v1/load_lora_adapter handler and its engine round trip (AsyncLLM.add_lora);
- vLLM engine core: EngineCore.add_lora, the steps and the input-queue passes between them (per second),
  adapter activations into GPU slots and loads from disk (LoRAModelManager, WorkerLoRAManager);
- gateway: Router._load (unload + load + commit), VllmClient.load_adapter / unload_adapter, the
  dispatcher's passes and the event loop's lag (per second)."""

from __future__ import annotations

import functools
import importlib.abc
import json
import os
import sys
import threading
import time

_DIR = os.environ.get("PROBE_DIR")
_lock = threading.Lock()
_file = None


def emit(kind: str, **fields: object) -> None:
    """Never raises: a probe that cannot write (full disk, unwritable folder) loses its line, not the
    process it watches."""
    global _file
    if not _DIR:
        return
    try:
        line = json.dumps(
            {"t": round(time.time(), 4), "pid": os.getpid(), "kind": kind, **fields}, default=str
        )
        with _lock:
            if _file is None:
                os.makedirs(_DIR, exist_ok=True)
                _file = open(os.path.join(_DIR, f"probe-{os.getpid()}.jsonl"), "a", buffering=1)  # noqa: SIM115
            _file.write(line + "\n")
    except Exception:  # noqa: BLE001, S110 - see the docstring
        pass


def _describe(describe, args, kwargs) -> dict:
    """The call's fields, or none when the describer does not fit the call (keywords, another signature)."""
    if describe is None:
        return {}
    try:
        return describe(*args, **kwargs)
    except Exception:  # noqa: BLE001 - the timing is still worth its line
        return {}


class _Agg:
    """Per-second sums of a frequent duration (count, total, max), flushed by whoever records next."""

    def __init__(self, kind: str) -> None:
        self.kind, self.n, self.sum, self.max, self.at = kind, 0, 0.0, 0.0, time.time()
        self.extra: dict[str, float] = {}

    def add(self, dt: float, **extra: float) -> None:
        self.n += 1
        self.sum += dt
        self.max = max(self.max, dt)
        for k, v in extra.items():
            self.extra[k] = self.extra.get(k, 0.0) + v
        now = time.time()
        if now - self.at >= 1.0:
            emit(
                self.kind,
                n=self.n,
                sum_ms=round(self.sum * 1e3, 2),
                max_ms=round(self.max * 1e3, 2),
                span_s=round(now - self.at, 3),
                **{k: round(v, 3) for k, v in self.extra.items()},
            )
            self.n, self.sum, self.max, self.at, self.extra = 0, 0.0, 0.0, now, {}


def _record(kind, t, ok, describe, args, kwargs) -> None:
    emit(kind, ms=round((time.perf_counter() - t) * 1e3, 2), ok=ok, **_describe(describe, args, kwargs))


def _timed_sync(fn, kind, describe=None):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        t, ok = time.perf_counter(), False
        try:
            out = fn(*args, **kwargs)
            ok = True
            return out
        finally:
            _record(kind, t, ok, describe, args, kwargs)

    return wrapper


def _timed_async(fn, kind, describe=None):
    @functools.wraps(fn)
    async def wrapper(*args, **kwargs):
        t, ok = time.perf_counter(), False
        try:
            out = await fn(*args, **kwargs)
            ok = True
            return out
        finally:
            _record(kind, t, ok, describe, args, kwargs)

    return wrapper


def _lora_name(self, req, *a, **k):
    return {"name": getattr(req, "lora_name", None), "id": getattr(req, "lora_int_id", None)}


# --- vLLM


def _serving(m):
    cls = m.OpenAIServingModels
    cls.load_lora_adapter = _timed_async(
        cls.load_lora_adapter, "api.load_lora_adapter", lambda self, req, *a, **k: {"name": req.lora_name}
    )


def _async_llm(m):
    m.AsyncLLM.add_lora = _timed_async(m.AsyncLLM.add_lora, "api.engine_add_lora", _lora_name)


def _core(m):
    m.EngineCore.add_lora = _timed_sync(m.EngineCore.add_lora, "core.add_lora", _lora_name)
    proc = m.EngineCoreProc
    steps, inq = _Agg("core.steps"), _Agg("core.input_queue")
    step0, inq0 = proc._process_engine_step, proc._process_input_queue

    def step(self):
        t = time.perf_counter()
        try:
            return step0(self)
        finally:
            dt = time.perf_counter() - t
            try:
                s = self.scheduler
                steps.add(dt, running=len(s.running), waiting=len(s.waiting))
            except Exception:  # noqa: BLE001 - another scheduler's shape: the time alone
                steps.add(dt)

    def queue(self):
        t = time.perf_counter()
        try:
            return inq0(self)
        finally:
            inq.add(time.perf_counter() - t)

    proc._process_engine_step, proc._process_input_queue = step, queue


def _model_manager(m):
    acts = _Agg("worker.activations")
    act0 = m.LoRAModelManager.activate_adapter

    def activate(self, lora_id):
        t = time.perf_counter()
        done = act0(self, lora_id)
        if done:
            acts.add(time.perf_counter() - t)
        return done

    m.LoRAModelManager.activate_adapter = activate


def _worker_manager(m):
    m.WorkerLoRAManager._load_adapter = _timed_sync(
        m.WorkerLoRAManager._load_adapter, "worker.load_from_disk", _lora_name
    )


# --- the gateway


def _router(m):
    def describe(self, pool, backend, adapter, victim, *a, **k):
        return {"name": adapter.served_name, "backend": backend.name, "victim": victim}

    m.Router._load = _timed_async(m.Router._load, "gw.load", describe)
    passes = _Agg("gw.pass")
    pass0 = m.Router._pass

    async def one_pass(self, pool, q):
        t = time.perf_counter()
        n = len(q.waiters)
        try:
            return await pass0(self, pool, q)
        finally:
            passes.add(time.perf_counter() - t, waiters=n)

    m.Router._pass = one_pass
    route0 = m.Router.route

    async def route(self, *a, **k):
        _watch_loop()
        return await route0(self, *a, **k)

    m.Router.route = route


def _vllm_client(m):
    def describe(self, url, name, *a, **k):
        return {"name": name, "backend": k.get("backend")}

    m.VllmClient.load_adapter = _timed_async(m.VllmClient.load_adapter, "gw.http_load", describe)
    m.VllmClient.unload_adapter = _timed_async(m.VllmClient.unload_adapter, "gw.http_unload", describe)


_watching = False


def _watch_loop() -> None:
    """The event loop's lag: a thread asks the loop to run a callback every 50 ms and times the wait."""
    global _watching
    if _watching:
        return
    _watching = True
    import asyncio

    loop = asyncio.get_running_loop()
    lag = _Agg("gw.loop_lag")

    def run() -> None:
        while True:
            t = time.perf_counter()
            done = threading.Event()
            loop.call_soon_threadsafe(done.set)
            if not done.wait(30):
                emit("gw.loop_stuck", s=30)
            lag.add(time.perf_counter() - t)
            time.sleep(0.05)

    threading.Thread(target=run, daemon=True, name="probe-loop-lag").start()


PATCHES = {
    "vllm.entrypoints.openai.models.serving": _serving,
    "vllm.v1.engine.async_llm": _async_llm,
    "vllm.v1.engine.core": _core,
    "vllm.lora.model_manager": _model_manager,
    "vllm.lora.worker_manager": _worker_manager,
    "app.routing.router": _router,
    "app.backends.vllm": _vllm_client,
}


class _After(importlib.abc.MetaPathFinder):
    """Finds the module with the other finders, then applies its patch once it has executed."""

    def find_spec(self, name, path, target=None):
        if name not in PATCHES:
            return None
        try:
            return self._find(name, path, target)
        except Exception as exc:  # noqa: BLE001 - never in the way of an import
            emit("probe.failed", module=name, error=repr(exc))
            return None

    def _find(self, name, path, target):
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None and spec.loader is not None:
                break
        else:
            return None
        exec0 = spec.loader.exec_module

        def exec_module(module):
            exec0(module)
            try:
                PATCHES[name](module)
                emit("probe.patched", module=name)
            except Exception as exc:  # noqa: BLE001 - a probe never breaks the process it watches
                emit("probe.failed", module=name, error=repr(exc))

        spec.loader.exec_module = exec_module
        return spec


if _DIR:
    sys.meta_path.insert(0, _After())
