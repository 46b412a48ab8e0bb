"""`lora-gateway worker`: claims promotion and demotion jobs and runs their steps.

Promotion: merge -> gguf (when asked for; a side artifact) -> quantize (awq only) -> launch -> verify
(served gate) -> switch. Each step before the switch has a gate; a failed gate, a crash, a cancel or a
timeout stops the job with nothing switched and the deployment (if one was started) stopped. Steps are
idempotent: merge, gguf and quantize outputs are content-addressed artifacts (reused by a retry), a
launched deployment is recorded before it is waited for (a resumed job adopts it if it still runs). The
switch is one transaction that also bumps the routing epoch; the job then waits until every live gateway
replica serves the new epoch.

Demotion: traffic back to the LoRA path first (epoch bumped, replicas observed), then the deployment's
running requests finish (bounded), then it stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import logging
import os
import re
import secrets
import shlex
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar, cast

import httpx
from sqlalchemy import delete, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

import app as app_package
from app.db.models import (
    Adapter,
    Backend,
    BackendKind,
    BackendState,
    BaseModel,
    Deployment,
    DeploymentState,
    Job,
    JobState,
)
from app.promotion import jobs
from app.promotion.artifacts import Artifact, ArtifactStore, key_of
from app.promotion.launchers.base import DeploymentSpec, Launched, Launcher, LaunchError
from app.promotion.ml import gguf
from app.promotion.ml.merge import REFERENCE_FILE
from app.promotion.ml.protocol import USAGE_ERROR, GateFailed
from app.promotion.routes import bump_epoch, wait_observed
from app.promotion.runner import StepCancelled, StepRun, StepRunner, run_step
from app.promotion.schemas import Gates
from app.promotion.served import GateFailedWith, served_gate
from app.settings import Settings

log = logging.getLogger(__name__)
T = TypeVar("T")
REPO_ROOT = Path(app_package.__file__).resolve().parent.parent


class JobFailed(Exception):
    """The job stops here; the message is what the admin reads in the job's `error`."""


class LeaseLost(Exception):
    """Another worker took the job over (this one stalled past its lease): stop without touching it."""


@dataclass(frozen=True)
class WorkerConfig:
    artifact_root: Path
    adapter_root: Path  # where this worker reads the adapter store
    deployment_artifact_root: str  # the artifact store's path as deployments see it
    ml_python: str = sys.executable
    quantizer_python: str = ".venv-awq/bin/python"
    gguf_python: str = ".venv-gguf/bin/python"
    lease_s: float = 30.0
    poll_s: float = 1.0
    max_attempts: int = 3
    ready_timeout_s: float = 900.0
    step_timeout_s: float = 6 * 3600.0
    demote_drain_s: float = 60.0
    observe_timeout_s: float = 10.0
    ml_env: Mapping[str, str] = field(default_factory=dict)


# The API's defaults (schemas.Gates), for jobs whose params lack a gate (queued by an older version).
DEFAULT_GATES: dict[str, float] = {k: v for k, v in Gates().model_dump().items() if v is not None}


@dataclass
class _Run:
    """One claimed job while it runs: what the heartbeat writes back, and the stop signal it raises."""

    job: Job
    owner: str
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    lost: bool = False
    step: str | None = None
    progress: float = 0.0
    steps: list[dict[str, Any]] = field(default_factory=list)
    log_tail: str = ""
    dirty: bool = True
    live: StepRun | None = None  # the ML step running now: its log tail is the job's while it runs

    def on_event(self, event: dict[str, Any]) -> None:
        if event.get("event") == "progress":
            self.progress = float(event.get("fraction", 0.0))
            self.dirty = True

    def changes(self) -> dict[str, Any]:
        log_tail = self.live.log_tail if self.live is not None else self.log_tail
        return {"step": self.step, "progress": self.progress, "steps": list(self.steps), "log_tail": log_tail}


class Worker:
    def __init__(
        self,
        sessionmaker: async_sessionmaker[AsyncSession],
        config: WorkerConfig,
        launchers: Mapping[str, Launcher],
        *,
        owner: str | None = None,
        step_runner: StepRunner | None = None,
    ) -> None:
        self.sessionmaker = sessionmaker
        self.step_runner: StepRunner = step_runner or run_step
        self.config = config
        self.launchers = dict(launchers)
        self.owner = owner or f"worker-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.artifacts = ArtifactStore(config.artifact_root)

    # --- the loop ----------------------------------------------------------------------------------

    async def run_forever(self, stop: asyncio.Event) -> None:
        log.info("worker %s polling for jobs every %.1f s", self.owner, self.config.poll_s)
        while not stop.is_set():
            try:
                ran = await self.run_once()
            except Exception:  # a DB hiccup must not end the worker; the next round retries
                log.exception("worker round failed")
                ran = False
            if not ran:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), self.config.poll_s)

    async def run_once(self) -> bool:
        """Claims one job and runs it to its end; False when there was nothing to claim."""
        async with self.sessionmaker() as session:
            job = await jobs.claim(session, owner=self.owner, lease_s=self.config.lease_s)
        if job is None:
            return False
        # A step still "running" in the row was cut short by the worker that died holding the job.
        steps = [{**s, "state": "interrupted"} if s.get("state") == "running" else s for s in job.steps or []]
        run = _Run(job=job, owner=self.owner, steps=steps)
        self.artifacts.sweep_staging(str(job.id))
        log.info("job %s (%s) claimed, attempt %d", job.id, job.kind, job.attempts)
        heartbeat = asyncio.create_task(self._heartbeat(run))
        try:
            state, changes = await self._execute(run)
        finally:
            heartbeat.cancel()
            with contextlib.suppress(BaseException):
                await heartbeat
        if run.lost:
            log.warning("job %s was taken over by another worker; leaving it", job.id)
            return True
        async with self.sessionmaker() as session:
            await jobs.finish(
                session, job_id=job.id, owner=self.owner, state=state, changes={**run.changes(), **changes}
            )
        log.info("job %s %s", job.id, state.value)
        return True

    async def _heartbeat(self, run: _Run) -> None:
        while True:
            await asyncio.sleep(self.config.lease_s / 3)
            try:
                async with self.sessionmaker() as session:
                    held, cancel = await jobs.renew(
                        session, job_id=run.job.id, owner=run.owner, lease_s=self.config.lease_s,
                        changes=run.changes(),
                    )  # fmt: skip
            except Exception:
                log.warning("could not renew the lease of job %s", run.job.id, exc_info=True)
                continue  # the lease outlives a few missed renewals
            if not held:
                run.lost = True
                run.stop.set()
                return
            if cancel:
                run.stop.set()

    async def _execute(self, run: _Run) -> tuple[JobState, dict[str, Any]]:
        job = run.job
        try:
            if job.cancel_requested:
                raise StepCancelled()
            if job.attempts > self.config.max_attempts:
                raise JobFailed(
                    f"given up after {job.attempts - 1} attempts: each worker running it stopped mid-job "
                    f"(last step {job.step or 'none'})"
                )
            if job.kind == jobs.PROMOTE:
                result = await self._promote(run)
            elif job.kind == jobs.DEMOTE:
                result = await self._demote(run)
            else:
                raise JobFailed(f"unknown job kind {job.kind!r}")
            return JobState.SUCCEEDED, {"result": result, "error": None}
        except StepCancelled:
            if run.lost:
                return JobState.RUNNING, {}
            return JobState.CANCELLED, {"error": "cancelled by an admin"}
        except (JobFailed, GateFailed, LaunchError) as exc:
            return JobState.FAILED, {"error": f"{run.step or 'job'}: {exc}"}
        except Exception as exc:
            log.exception("job %s failed", job.id)
            return JobState.FAILED, {"error": f"{run.step or 'job'}: internal error ({type(exc).__name__}: {exc})"}

    async def _step(self, run: _Run, name: str, body: Callable[[], Awaitable[T]]) -> T:
        if run.stop.is_set():
            raise StepCancelled()
        entry: dict[str, Any] = {"name": name, "state": "running", "started_at": jobs.now().isoformat()}
        run.steps.append(entry)
        run.step, run.progress, run.dirty = name, 0.0, True
        started = time.monotonic()  # with the save: started_at + seconds is never before the step's end
        await self._save(run)
        try:
            out = await body()
        except BaseException as exc:
            entry.update(state="failed", seconds=round(time.monotonic() - started, 3))
            if isinstance(exc, GateFailedWith):
                entry["figures"] = exc.figures
            raise
        entry.update(state="done", seconds=round(time.monotonic() - started, 3))
        if isinstance(out, dict):
            entry["figures"] = {k: v for k, v in out.items() if k != "artifact"}
        run.progress = 1.0
        await self._save(run)
        return out

    async def _save(self, run: _Run) -> None:
        async with self.sessionmaker() as session:
            held, cancel = await jobs.renew(
                session, job_id=run.job.id, owner=run.owner, lease_s=self.config.lease_s, changes=run.changes()
            )
        if not held:
            run.lost = True
            run.stop.set()
            raise StepCancelled()
        if cancel:
            run.stop.set()
            raise StepCancelled()

    # --- promotion ---------------------------------------------------------------------------------

    async def _promote(self, run: _Run) -> dict[str, Any]:
        params = run.job.params
        gates = {**DEFAULT_GATES, **(params.get("gates") or {})}
        quantization = params.get("quantization", "awq")
        async with self.sessionmaker() as session:
            adapter = await session.get(Adapter, run.job.adapter_id) if run.job.adapter_id else None
            if adapter is None:
                raise JobFailed("the adapter no longer exists")
            base = await session.get(BaseModel, adapter.base_model_id)
            assert base is not None  # RESTRICT foreign key
        merged = await self._step(run, "merge", lambda: self._merge(run, adapter, base, gates))
        artifacts = [merged["artifact"]]
        model = merged["artifact"]
        if params.get("gguf"):
            # A file for llama.cpp users beside the promotion, never served by it; its gate fails the job.
            exported = await self._step(run, "gguf", lambda: self._gguf(run, model, gates))
            artifacts.append(exported["artifact"])
        if quantization == "awq":
            quantized = await self._step(run, "quantize", lambda: self._quantize(run, model, gates))
            artifacts.append(quantized["artifact"])
            model = quantized["artifact"]
        served = model
        dep_id = await self._step(run, "launch", lambda: self._launch(run, adapter, served, quantization))
        try:
            min_exact = float(gates.get("served_min_exact", 0.75 if quantization == "none" else 0.0))
            await self._step(
                run,
                "verify",
                lambda: self._verify(dep_id, merged["artifact"], float(gates["served_min_top1"]), min_exact),
            )
            switched = await self._step(run, "switch", lambda: self._switch(dep_id))
        except BaseException:
            if not run.lost:
                await asyncio.shield(self._abandon(dep_id, "the promotion stopped before the switch"))
            raise
        return {
            "deployment_id": str(dep_id),
            "artifacts": [a.describe(self.artifacts.root) for a in artifacts],
            "switch": switched,
        }

    def _ml_env(self) -> dict[str, str]:
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", **self.config.ml_env}
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
        return env

    async def _ml(self, run: _Run, kind: str, key: str, argv: list[str]) -> tuple[Artifact, dict[str, Any]]:
        """Runs one ML step into a staging folder, then seals it under its key."""
        if self.step_runner is run_step and os.sep in argv[0] and not await asyncio.to_thread(os.path.exists, argv[0]):
            raise JobFailed(f"this worker has no {kind} environment: {argv[0]} does not exist ({_SETUP[kind]})")
        staged = self.artifacts.staging(str(run.job.id))
        run.live = StepRun()
        try:
            step = await self.step_runner(
                [*argv, "--out", str(staged)],
                env=self._ml_env(),
                on_event=run.on_event,
                stop=run.stop,
                timeout_s=self.config.step_timeout_s,
                into=run.live,
                job_id=str(run.job.id),
                attempt=run.job.attempts,
            )
            run.log_tail, run.dirty = step.log_tail, True
            figures = dict(step.result or {})
            for k in ("event", "time", "step"):
                figures.pop(k, None)
            if step.gate_failed:
                raise GateFailedWith(f"gate failed: {_reason(step.log_tail)}", figures)
            if step.returncode == USAGE_ERROR:
                raise JobFailed(f"the step refused its input: {_last_line(step.log_tail)}")
            if step.returncode != 0:
                raise JobFailed(f"the step crashed (exit status {step.returncode}): {_last_line(step.log_tail)}")
            return self.artifacts.commit(kind, key, staged), figures
        finally:
            if run.live is not None:
                run.log_tail = run.live.log_tail
            run.live = None
            self.artifacts.discard(staged)  # gone after a commit (renamed), removed after anything else

    async def _merge(self, run: _Run, adapter: Adapter, base: BaseModel, gates: dict[str, float]) -> dict[str, Any]:
        dtype = str(run.job.params.get("dtype") or "auto")
        key = key_of(step="merge", v=1, base=base.path, adapter=adapter.sha256, dtype=dtype, tol=gates["logits_tolerance"])
        found = self.artifacts.get("merged", key)
        if found is not None:
            return {"artifact": found, "reused": True}
        adapter_dir = self.config.adapter_root / adapter.storage_path
        if not (adapter_dir / "adapter_config.json").is_file():
            raise JobFailed("the adapter's files are missing from the adapter store")
        artifact, figures = await self._ml(
            run, "merged", key,
            [self.config.ml_python, "-m", "app.promotion.ml.merge", "--base", base.path,
             "--adapter", str(adapter_dir), "--dtype", dtype, "--tolerance", str(gates["logits_tolerance"])],
        )  # fmt: skip
        return {"artifact": artifact, **figures}

    async def _quantize(self, run: _Run, merged: Artifact, gates: dict[str, float]) -> dict[str, Any]:
        texts = run.job.params.get("calibration_texts")
        key = key_of(
            step="awq", v=1, model=merged.sha256, texts=texts, max_kl=gates["max_kl"], min_top1=gates["min_top1"]
        )
        found = self.artifacts.get("awq", key)
        if found is not None:
            return {"artifact": found, "reused": True}
        argv = [
            self.config.quantizer_python, "-m", "app.promotion.ml.quantize", "--model", str(merged.path),
            "--max-kl", str(gates["max_kl"]), "--min-top1", str(gates["min_top1"]),
        ]  # fmt: skip
        calib: Path | None = None
        if texts:
            calib = self.artifacts.root / ".staging" / f"{run.job.id}-calibration.txt"
            calib.parent.mkdir(parents=True, exist_ok=True)
            calib.write_text("\n".join(t.replace("\n", " ") for t in texts) + "\n")
            argv += ["--calibration", str(calib)]
        try:
            artifact, figures = await self._ml(run, "awq", key, argv)
        finally:
            if calib is not None:
                calib.unlink(missing_ok=True)
        return {"artifact": artifact, **figures}

    async def _gguf(self, run: _Run, merged: Artifact, gates: dict[str, float]) -> dict[str, Any]:
        options = dict(run.job.params.get("gguf") or {})
        quant_type, pre = str(options.get("quant_type") or "Q4_K_M"), options.get("pre_tokenizer")
        max_diff = gates["gguf_max_logprob_diff"]
        key = key_of(
            step="gguf", v=1, model=merged.sha256, type=quant_type, pre=pre, max_diff=max_diff,
            tool=gguf.TOOL_VERSION, heldout=_heldout_sha256(),
        )  # fmt: skip
        found = self.artifacts.get("gguf", key)
        if found is not None:
            return {"artifact": found, "reused": True}
        argv = [
            self.config.gguf_python, "-m", "app.promotion.ml.gguf", "--model", str(merged.path),
            "--type", quant_type, "--max-logprob-diff", str(max_diff),
        ]  # fmt: skip
        if pre:
            argv += ["--pre-tokenizer", str(pre)]
        artifact, figures = await self._ml(run, "gguf", key, argv)
        return {"artifact": artifact, **figures}

    def _deployment_path(self, artifact: Artifact) -> str:
        return f"{self.config.deployment_artifact_root.rstrip('/')}/{artifact.path.relative_to(self.artifacts.root)}"

    async def _launch(self, run: _Run, adapter: Adapter, model: Artifact, quantization: str) -> uuid.UUID:
        params = run.job.params
        launcher_name = str(params.get("launcher") or "local")
        launcher = self.launchers.get(launcher_name)
        if launcher is None:
            raise JobFailed(f"no launcher {launcher_name!r} is configured on this worker")
        async with self.sessionmaker() as session:
            dep = await session.scalar(select(Deployment).where(Deployment.job_id == run.job.id))
            if dep is None:
                dep = Deployment(
                    adapter_id=adapter.id, job_id=run.job.id, launcher=launcher_name,
                    model_path=self._deployment_path(model), state=DeploymentState.PENDING,
                    quantization=quantization, tensor_parallel_size=int(params.get("tensor_parallel_size") or 1),
                    updated_at=jobs.now(),
                )  # fmt: skip
                session.add(dep)
                await session.flush()
                dep.served_model_name = f"lgw-dep-{dep.id.hex}"
                dep.handle = {"api_key": secrets.token_urlsafe(32)}
                await session.commit()
            dep_id, handle = dep.id, dict(dep.handle or {})
            spec = DeploymentSpec(
                deployment_id=dep.id.hex,
                model_dir=dep.model_path,
                served_model_name=str(dep.served_model_name),
                quantized=quantization == "awq",
                tensor_parallel_size=dep.tensor_parallel_size,
                max_model_len=params.get("max_model_len"),
                dtype=params.get("serve_dtype"),
                api_key=handle.get("api_key"),
                resources=dict(params.get("resources") or {}),
            )
        launched = _launched(handle)
        try:
            if launched is None or not await launcher.alive(launched):
                launched = await launcher.launch(spec)
                await self._update_deployment(
                    dep_id, state=DeploymentState.STARTING,
                    handle={**handle, "url": launched.url, "ref": launched.ref},
                )  # fmt: skip
            await self._until_stopped(run, launcher.wait_ready(launched, self.config.ready_timeout_s))
        except BaseException as exc:
            if not run.lost:
                reason = str(exc) if isinstance(exc, LaunchError) else type(exc).__name__
                await asyncio.shield(self._abandon(dep_id, reason))
            raise
        return dep_id

    async def _until_stopped(self, run: _Run, work: Awaitable[T]) -> T:
        task = asyncio.ensure_future(work)
        stopper = asyncio.ensure_future(run.stop.wait())
        try:
            done, _ = await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
            if task in done:
                return task.result()
            raise StepCancelled()
        finally:
            stopper.cancel()
            if not task.done():
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task

    async def _update_deployment(self, dep_id: uuid.UUID, **values: Any) -> None:
        async with self.sessionmaker() as session:
            dep = await session.get(Deployment, dep_id)
            if dep is not None:
                for k, v in values.items():
                    setattr(dep, k, v)
                dep.updated_at = jobs.now()
                await session.commit()

    async def _abandon(self, dep_id: uuid.UUID, reason: str) -> None:
        """Stops a deployment that never took traffic and marks it failed."""
        async with self.sessionmaker() as session:
            dep = await session.get(Deployment, dep_id)
            if dep is None or dep.active:
                return
            launched = _launched(dep.handle or {})
            launcher = self.launchers.get(dep.launcher)
        if launched is not None and launcher is not None:
            try:
                await launcher.stop(launched)
            except Exception:
                log.exception("could not stop deployment %s", dep_id)
        await self._update_deployment(dep_id, state=DeploymentState.FAILED, error=reason[:4000])

    async def _verify(self, dep_id: uuid.UUID, merged: Artifact, min_top1: float, min_exact: float) -> dict[str, Any]:
        async with self.sessionmaker() as session:
            dep = await session.get(Deployment, dep_id)
            assert dep is not None and dep.handle is not None
            url, model, key = dep.handle["url"], str(dep.served_model_name), dep.handle.get("api_key")
        return await served_gate(
            url, model=model, reference_file=merged.path / REFERENCE_FILE, api_key=key,
            min_top1=min_top1, min_exact=min_exact,
        )  # fmt: skip

    async def _switch(self, dep_id: uuid.UUID) -> dict[str, Any]:
        async with self.sessionmaker() as session:
            dep = await session.get(Deployment, dep_id)
            assert dep is not None and dep.handle is not None and dep.adapter_id is not None
            adapter = await session.get(Adapter, dep.adapter_id)
            if adapter is None:
                raise JobFailed("the adapter was deleted during the promotion")
            backend = await session.get(Backend, dep.backend_id) if dep.backend_id else None
            if backend is None:
                backend = Backend(
                    name=f"dedicated-{dep.id.hex[:12]}", url=dep.handle["url"], base_model_id=adapter.base_model_id,
                    gpu_slots=1, max_lora_rank=1, capacity=1, kind=BackendKind.DEDICATED,
                    state=BackendState.ACTIVE, api_key=dep.handle.get("api_key"),
                )  # fmt: skip
                session.add(backend)
                await session.flush()
            dep.backend_id, dep.state, dep.active, dep.updated_at = backend.id, DeploymentState.READY, True, jobs.now()
            epoch = await bump_epoch(session)
            await session.commit()
        started = time.monotonic()
        behind = await wait_observed(self.sessionmaker, epoch, timeout_s=self.config.observe_timeout_s)
        return {"epoch": epoch, "observed_s": round(time.monotonic() - started, 3), "replicas_behind": behind}

    # --- demotion ----------------------------------------------------------------------------------

    async def _demote(self, run: _Run) -> dict[str, Any]:
        dep_id = uuid.UUID(str(run.job.params["deployment_id"]))

        async def unroute() -> dict[str, Any]:
            async with self.sessionmaker() as session:
                dep = await session.get(Deployment, dep_id)
                if dep is None:
                    raise JobFailed("the deployment no longer exists")
                if not dep.active:
                    return {"already_unrouted": True}
                dep.active, dep.state, dep.updated_at = False, DeploymentState.STOPPING, jobs.now()
                epoch = await bump_epoch(session)
                await session.commit()
            started = time.monotonic()
            behind = await wait_observed(self.sessionmaker, epoch, timeout_s=self.config.observe_timeout_s)
            return {"epoch": epoch, "observed_s": round(time.monotonic() - started, 3), "replicas_behind": behind}

        async def drain() -> dict[str, Any]:
            async with self.sessionmaker() as session:
                dep = await session.get(Deployment, dep_id)
                handle = dict(dep.handle or {}) if dep else {}
            started = time.monotonic()
            running = await _running_requests(handle)
            while running and time.monotonic() - started < self.config.demote_drain_s:
                await asyncio.sleep(0.25)
                running = await _running_requests(handle)
            return {"seconds": round(time.monotonic() - started, 3), "still_running": running}

        async def stop() -> dict[str, Any]:
            async with self.sessionmaker() as session:
                dep = await session.get(Deployment, dep_id)
                assert dep is not None
                launched, launcher = _launched(dep.handle or {}), self.launchers.get(dep.launcher)
            if launched is not None:
                if launcher is None:
                    raise JobFailed(f"no launcher {dep.launcher!r} is configured on this worker")
                await launcher.stop(launched)
            async with self.sessionmaker() as session:
                dep = await session.get(Deployment, dep_id)
                assert dep is not None
                if dep.backend_id is not None:
                    await session.execute(delete(Backend).where(Backend.id == dep.backend_id))
                dep.backend_id, dep.state, dep.updated_at = None, DeploymentState.STOPPED, jobs.now()
                await session.commit()
            return {"stopped": True}

        unrouted = await self._step(run, "unroute", unroute)
        drained = await self._step(run, "drain", drain)
        await self._step(run, "stop", stop)
        return {"deployment_id": str(dep_id), "unroute": unrouted, "drain": drained}


@functools.cache
def _heldout_sha256() -> str:
    return hashlib.sha256((gguf.DATA_DIR / "heldout.txt").read_bytes()).hexdigest()


def _launched(handle: Mapping[str, Any]) -> Launched | None:
    if "url" not in handle or "ref" not in handle:
        return None
    return Launched(url=str(handle["url"]), ref=dict(handle["ref"]))


_SETUP = {
    "merged": "GATEWAY_ML_PYTHON",
    "awq": "make quantizer, or GATEWAY_QUANTIZER_PYTHON",
    "gguf": "make gguf, or GATEWAY_GGUF_PYTHON",
}


def _reason(log_tail: str) -> str:
    """A gate's refusal as the step logged it, without its own "<step>: gate failed:" prefix."""
    return re.sub(r"^(\w+: )?(\w+ )?gate failed: ", "", _last_line(log_tail))


def _last_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1][-1000:] if lines else "(no output)"


async def _running_requests(handle: Mapping[str, Any]) -> float:
    """Requests vLLM is running or has queued, from its /metrics; 0 when it cannot be read (gone)."""
    url = handle.get("url")
    if not url:
        return 0.0
    headers = {"Authorization": f"Bearer {handle['api_key']}"} if handle.get("api_key") else {}
    try:
        async with httpx.AsyncClient(timeout=5.0) as client:
            text = (await client.get(f"{url}/metrics", headers=headers)).text
    except httpx.HTTPError:
        return 0.0
    total = 0.0
    for line in text.splitlines():
        if line.startswith(("vllm:num_requests_running", "vllm:num_requests_waiting")):
            with contextlib.suppress(ValueError, IndexError):
                total += float(line.rsplit(" ", 1)[1])
    return total


def launchers_from_settings(settings: Settings) -> dict[str, Launcher]:
    from app.promotion.launchers.local import LocalConfig, LocalLauncher

    launchers: dict[str, Launcher] = {
        "local": LocalLauncher(
            LocalConfig(
                python=settings.LOCAL_VLLM_PYTHON,
                log_dir=settings.DATA_DIR / "deployments",
                extra_args=tuple(shlex.split(settings.LOCAL_VLLM_ARGS)),
            )
        )
    }
    if settings.K8S_NAMESPACE:
        from app.promotion.launchers.kubernetes import KubernetesLauncher

        launchers["kubernetes"] = KubernetesLauncher(kubernetes_config(settings))
    return launchers


def kubernetes_config(settings: Settings) -> Any:
    """The KubernetesConfig of GATEWAY_K8S_* (kubernetes is imported only where it is configured)."""
    from app.promotion.launchers.kubernetes import KubernetesConfig

    return KubernetesConfig(
        namespace=settings.K8S_NAMESPACE,
        model_pvc=settings.K8S_MODEL_PVC,
        model_mount_path=settings.K8S_MODEL_MOUNT_PATH,
        image=settings.K8S_IMAGE,
        worker_image=settings.K8S_WORKER_IMAGE or None,
        labels=dict(settings.K8S_LABELS),
        node_selector=dict(settings.K8S_NODE_SELECTOR),
        tolerations=tuple(settings.K8S_TOLERATIONS),
        service_account=settings.K8S_SERVICE_ACCOUNT or None,
        image_pull_secrets=tuple(settings.K8S_IMAGE_PULL_SECRETS),
        gpu_resource_name=settings.K8S_GPU_RESOURCE,
        run_as_user=None if settings.K8S_RUN_AS_USER < 0 else settings.K8S_RUN_AS_USER,
        run_as_group=None if settings.K8S_RUN_AS_USER < 0 else settings.K8S_RUN_AS_USER,
        kubeconfig=settings.K8S_KUBECONFIG or None,
        context=settings.K8S_CONTEXT or None,
    )


def step_runner_from_settings(settings: Settings) -> StepRunner:
    """Where the ML steps run: subprocesses here (whatever device torch sees), or with GATEWAY_K8S_STEPS
    Kubernetes Jobs on GPU nodes (app/promotion/steps_k8s.py)."""
    if not (settings.K8S_NAMESPACE and settings.K8S_STEPS):
        return run_step
    from app.promotion.steps_k8s import KubernetesStepRunner, StepJobConfig

    assert settings.DEPLOYMENT_ARTIFACT_ROOT is not None  # filled by Settings
    path_map = tuple(settings.K8S_STEP_PATH_MAP) or ((str(settings.artifact_root), settings.DEPLOYMENT_ARTIFACT_ROOT),)
    runner = KubernetesStepRunner(
        kubernetes_config(settings),
        StepJobConfig(
            path_map=path_map,
            python=settings.K8S_STEP_PYTHON,
            python_by_step=_by_step(quantize=settings.K8S_STEP_QUANTIZER_PYTHON, gguf=settings.K8S_STEP_GGUF_PYTHON),
            image_by_step=_by_step(quantize=settings.K8S_STEP_QUANTIZER_IMAGE, gguf=settings.K8S_STEP_GGUF_IMAGE),
            gpus=settings.K8S_STEP_GPUS,
            cpu=settings.K8S_STEP_CPU or None,
            memory=settings.K8S_STEP_MEMORY or None,
        ),
    )
    return cast(StepRunner, runner.run_step)


def _by_step(**values: str) -> dict[str, str]:
    return {step: value for step, value in values.items() if value}


def worker_config(settings: Settings) -> WorkerConfig:
    assert settings.DEPLOYMENT_ARTIFACT_ROOT is not None  # filled by Settings
    return WorkerConfig(
        artifact_root=settings.artifact_root,
        adapter_root=settings.store_root,
        deployment_artifact_root=settings.DEPLOYMENT_ARTIFACT_ROOT,
        ml_python=settings.ML_PYTHON or sys.executable,
        quantizer_python=settings.QUANTIZER_PYTHON,
        gguf_python=settings.GGUF_PYTHON,
        lease_s=settings.JOB_LEASE_S,
        poll_s=settings.WORKER_POLL_S,
        max_attempts=settings.JOB_MAX_ATTEMPTS,
        ready_timeout_s=settings.DEPLOY_READY_TIMEOUT_S,
        demote_drain_s=settings.DEMOTE_DRAIN_S,
    )


async def serve_worker(settings: Settings, stop: asyncio.Event) -> None:
    """The worker process's main: runs jobs until `stop` is set (SIGTERM/SIGINT in the CLI)."""
    from app.db.session import create_engine, create_sessionmaker

    engine = create_engine(settings.DATABASE_URL, timeout_s=settings.DB_TIMEOUT_S)
    try:
        worker = Worker(
            create_sessionmaker(engine),
            worker_config(settings),
            launchers_from_settings(settings),
            step_runner=step_runner_from_settings(settings),
        )
        await worker.run_forever(stop)
    finally:
        await engine.dispose()
