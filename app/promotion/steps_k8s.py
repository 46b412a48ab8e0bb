"""Runs one ML step (merge, AWQ quantize) as a Kubernetes Job on a GPU node, with the contract of
app.promotion.runner.run_step: the same keyword arguments, a StepRun back (exit status, result event,
bounded log tail), StepCancelled when `stop` is set and TimeoutError on timeout. Whatever ends a run other
than the container's own exit (cancel, timeout, a pod that cannot start, an error here) deletes the Job
with propagation Foreground, so no pod keeps a GPU or writes into a staging folder nobody will commit.

The Job (`job_object`) runs the same `python -m app.promotion.ml.<step> ...` command line as the local
runner, with three changes:
- argv[0], the worker's interpreter, becomes the image's (`python`, or per step);
- every absolute path in the arguments (alone, or as `--flag=/path`) is rewritten from the worker's
  filesystem to the pod's by the longest matching (local_prefix, pod_prefix) of `path_map`. A path under
  no mapped root is refused before anything is created: the pod could not read it (or, for --out, the
  worker could not read what the pod wrote). Relative arguments are passed as they are.
- the environment is an allowlist (HF offline flags and the like): the worker's own environment holds
  its database URL and keys, and PYTHONPATH, CUDA_VISIBLE_DEVICES and HOME are the image's and the
  device plugin's business.

The pod's log is polled, not followed. Each poll asks for timestamped lines since a little before the
previous poll (`sinceSeconds` measured on the kubelet's clock, so no clock skew matters) and drops the
lines it has already seen by their timestamp. Why not a `follow=True` stream in a thread: the official
client is synchronous, and a thread blocked reading a quiet stream (a quantization layer can take
minutes without a line) can be neither cancelled nor bounded without a read timeout, which then needs
exactly this resume-and-deduplicate logic anyway; a blocked thread would also hold up the event loop's
shutdown. Polling keeps every call bounded by request_timeout_s and makes cancellation immediate; the
cost is that events arrive up to poll_interval_s late, which nothing here notices (the worker writes
progress to the database every lease_s / 3).

The exit status is the step container's `state.terminated.exitCode` (so GATE_FAILED, 3, means the gate
refused). A pod that cannot start fails the step with what the scheduler, the kubelet and the events say:
at once for a state that never resolves by itself (InvalidImageName, CreateContainerConfigError, ...),
after pull_error_grace_s of ErrImagePull / ImagePullBackOff (a registry can be briefly away; a wrong image
or missing pull secret should not take the whole start budget), and after start_timeout_s for anything
else, Unschedulable included (a cluster autoscaler may be adding a GPU node, which takes minutes).

Operations note: the worker creates the staging folder and reads the result on its own mount of the same
volume, so the worker and the step pods must agree on file ownership (same UID, KubernetesConfig
run_as_user / run_as_group, or a shared group with group-writable folders).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import math
import posixpath
import re
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any

from kubernetes import client as k8s
from kubernetes.client.exceptions import ApiException

from app.promotion.launchers.base import LaunchError
from app.promotion.launchers.kubernetes import (
    _FATAL_WAITING,
    _TRANSPORT_ERRORS,
    JOB_ID_LABEL,
    STEP_CONTAINER,
    KubernetesClient,
    KubernetesConfig,
    _api_message,
    _get,
    job_object,
)
from app.promotion.ml import protocol
from app.promotion.runner import StepCancelled, StepRun

log = logging.getLogger(__name__)

# What of the worker's step environment reaches the pod (when set there).
ENV_ALLOWLIST = (
    "HF_HUB_OFFLINE",
    "HF_DATASETS_OFFLINE",
    "TRANSFORMERS_OFFLINE",
    "HF_HUB_DISABLE_TELEMETRY",
    "TOKENIZERS_PARALLELISM",
    "PYTORCH_CUDA_ALLOC_CONF",
)
_PULL_ERRORS = frozenset({"ErrImagePull", "ImagePullBackOff"})
_LOG_LINE_LIMIT = 2000  # as the local runner: longer lines are cut
_LOG_POLL_LIMIT_BYTES = 8 << 20  # one poll's answer; a step does not print 8 MiB in a few seconds
_LOG_OVERLAP_S = 5  # each poll reaches this far before the previous one (dropped as already seen)
_FINAL_LOG_POLLS = 3  # after the exit, while the result event has not arrived yet
_DEADLINE_MARGIN_S = 300  # activeDeadlineSeconds beyond timeout_s: the cluster's backstop, not the timeout
_ERROR_TAIL_LINES = 20
_GATE = protocol.GATE_FAILED
# RFC 3339 with up to nanoseconds, as the kubelet prefixes lines (trailing zeros of the fraction trimmed).
_TIMESTAMP = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d{1,9}))?(Z|[+-]\d\d:\d\d)$")


class StepJobError(LaunchError):
    """The step's Job could not run (refused, unschedulable, image, evicted, deleted, a path the pod cannot
    see): the message says why, for the job's error. A LaunchError, so the worker reports it as it is."""


@dataclass(frozen=True)
class StepJobConfig:
    # (local_prefix, pod_prefix): where the worker's artifact store, adapter store and base models are
    # mounted in the step's pod, e.g. (("/data/artifacts", "/models/artifacts"), ...).
    path_map: tuple[tuple[str, str], ...]
    python: str = "python"  # the image's interpreter; argv[0] becomes it
    # Per step, e.g. {"quantize": "/opt/venv-awq/bin/python"} for an image holding both environments.
    python_by_step: Mapping[str, str] = field(default_factory=dict)
    image_by_step: Mapping[str, str] = field(default_factory=dict)  # default: KubernetesConfig.worker_image
    gpus: int = 1
    # Per step; the GGUF export runs on CPUs only (llama.cpp and torch on CPU), so it asks for none.
    gpus_by_step: Mapping[str, int] = field(default_factory=lambda: {"gguf": 0})
    cpu: str | None = None
    memory: str | None = None
    env_allowlist: tuple[str, ...] = ENV_ALLOWLIST
    start_timeout_s: float = 900.0  # the pod runs within this long (scheduled, node scaled up, image pulled)
    pull_error_grace_s: float = 120.0  # ErrImagePull / ImagePullBackOff this long: give up
    api_outage_s: float = 300.0  # the API not answering this long (while the step runs): give up
    active_deadline_s: int = 6 * 3600  # the Job's own deadline when the caller gives no timeout_s
    ttl_after_finished_s: int = 24 * 3600  # finished Jobs stay this long for `kubectl logs`


def _norm(path: str) -> PurePosixPath:
    # normpath collapses "..", which is then judged where it leads; "//x" is "/x" for this purpose.
    return PurePosixPath("/" + posixpath.normpath(path).lstrip("/"))


def map_path(path: str, path_map: Sequence[tuple[str, str]]) -> str:
    """`path` as the pod sees it, by the longest matching local prefix; StepJobError if none matches."""
    target = _norm(path)
    best: tuple[PurePosixPath, str] | None = None
    for local, pod in path_map:
        root = _norm(local)
        if (target == root or root in target.parents) and (
            best is None or len(root.parts) > len(best[0].parts)
        ):
            best = (root, pod)
    if best is None:
        roots = ", ".join(f"{local} -> {pod}" for local, pod in path_map) or "none"
        raise StepJobError(
            f"the argument path {path} is under no root mapped into the step's pod (mapped: {roots}): the "
            "pod could not see it"
        )
    root, pod = best
    rest = target.relative_to(root)
    return str(PurePosixPath(pod) / rest) if rest.parts else str(PurePosixPath(pod))


def pod_argv(argv: Sequence[str], python: str, path_map: Sequence[tuple[str, str]]) -> list[str]:
    """The step's command line in the pod: the image's interpreter, paths mapped."""
    if not argv:
        raise StepJobError("the step needs a command line")
    out = [python]
    for arg in argv[1:]:
        if arg.startswith("/"):
            out.append(map_path(arg, path_map))
        elif arg.startswith("-") and "=" in arg and arg.split("=", 1)[1].startswith("/"):
            flag, value = arg.split("=", 1)
            out.append(f"{flag}={map_path(value, path_map)}")
        else:
            out.append(arg)
    return out


def step_name(argv: Sequence[str]) -> str:
    """ "merge" for `python -m app.promotion.ml.merge ...`; "step" when there is no -m."""
    for i, arg in enumerate(argv[:-1]):
        if arg == "-m":
            return re.sub(r"[^a-z0-9-]+", "-", argv[i + 1].rsplit(".", 1)[-1].lower()).strip("-") or "step"
    return "step"


def _timestamp_ns(text: str) -> int | None:
    m = _TIMESTAMP.match(text)
    if not m:
        return None
    try:
        seconds = dt.datetime.fromisoformat(m[1] + ("+00:00" if m[3] == "Z" else m[3])).timestamp()
    except ValueError:
        return None
    return int(seconds) * 1_000_000_000 + int((m[2] or "0").ljust(9, "0"))


class LogCursor:
    """Turns overlapping answers of `timestamps=true` log reads into each line once, in order. Lines are
    ordered by timestamp; of lines sharing the newest timestamp seen, it remembers how many it gave."""

    def __init__(self) -> None:
        self.last_ns = -1
        self.at_last = 0  # lines given with timestamp last_ns

    def feed(self, text: str) -> list[str]:
        out: list[str] = []
        same = 0  # lines at last_ns in this answer
        for raw in text.split("\n"):  # not splitlines(): a tqdm line holds carriage returns
            if not raw:
                continue
            stamp, _, line = raw.partition(" ")
            ns = _timestamp_ns(stamp)
            if ns is None:  # not a timestamped line (should not happen): keep it whole
                out.append(raw)
                continue
            if ns < self.last_ns:
                continue
            if ns == self.last_ns:
                same += 1
                if same <= self.at_last:
                    continue
                self.at_last += 1
            else:
                self.last_ns, self.at_last, same = ns, 1, 1
            out.append(line)
        return out


class KubernetesStepRunner(KubernetesClient):
    """`await runner.run_step(argv, env=..., on_event=..., stop=..., timeout_s=..., grace_s=..., into=...)`
    as run_step (grace_s: the pod's SIGTERM-to-SIGKILL grace when its Job is deleted; into: the StepRun
    filled as the step goes), plus the optional job_id, step and attempt that name the Job (job_id also lets
    a run delete the Jobs an earlier, dead worker left running for the same job)."""

    def __init__(
        self, cfg: KubernetesConfig, steps: StepJobConfig, api_client: k8s.ApiClient | None = None
    ) -> None:
        mount = _norm(cfg.model_mount_path)
        for local, pod in steps.path_map:
            if not local.startswith("/") or not pod.startswith("/"):
                raise ValueError(f"path_map entries must be absolute paths, not ({local!r}, {pod!r})")
            if _norm(pod) != mount and mount not in _norm(pod).parents:
                raise ValueError(
                    f"path_map maps {local} to {pod}, which is not on the model volume ({cfg.model_mount_path}):"
                    " the step's pod mounts no other volume"
                )
        super().__init__(cfg, api_client)
        self.steps = steps

    async def run_step(
        self,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        on_event: Callable[[dict[str, Any]], None] | None = None,
        stop: asyncio.Event | None = None,
        timeout_s: float | None = None,
        grace_s: float = 5.0,
        into: StepRun | None = None,
        job_id: str | None = None,
        step: str | None = None,
        attempt: int | None = None,
    ) -> StepRun:
        cfg, steps = self.cfg, self.steps
        if stop is not None and stop.is_set():
            raise StepCancelled()
        step = step or step_name(argv)
        python = steps.python_by_step.get(step, steps.python)
        command = pod_argv(argv, python, steps.path_map)  # refuses unmapped paths before anything exists
        pod_env = {k: v for k, v in (env or {}).items() if k in steps.env_allowlist}
        deadline_s = steps.active_deadline_s
        if timeout_s is not None:
            deadline_s = math.ceil(timeout_s) + _DEADLINE_MARGIN_S
        try:
            body = job_object(
                job_id or uuid.uuid4().hex[:16],
                step,
                command,
                cfg,
                gpus=steps.gpus_by_step.get(step, steps.gpus),
                cpu=steps.cpu,
                memory=steps.memory,
                env=pod_env,
                active_deadline_s=deadline_s,
                ttl_after_finished_s=steps.ttl_after_finished_s,
                attempt=attempt,
                image=steps.image_by_step.get(step),
                termination_grace_s=max(0, math.ceil(grace_s)),
            )
        except ValueError as e:
            raise StepJobError(f"cannot make the {step} Job: {e}") from e
        name = body["metadata"]["name"]
        run = into if into is not None else StepRun()
        may_exist = False  # from the moment the create is sent (a cancelled create may still land)

        async def work() -> int | None:
            nonlocal may_exist
            if job_id is not None:
                await self._delete_orphans(job_id)
            may_exist = True
            try:
                job = await self._create(body)
            except StepJobError as e:
                # The API refused it (or a same-named Job stayed): nothing of ours exists. A transport
                # error may have come after the create landed: then it is deleted like any other.
                may_exist = isinstance(e.__cause__, _TRANSPORT_ERRORS)
                raise
            return await self._follow(job, run, on_event)

        worker = asyncio.ensure_future(work())
        stopper = asyncio.ensure_future(stop.wait()) if stop is not None else None
        try:
            pending = {worker, *([stopper] if stopper else [])}
            done, _ = await asyncio.wait(pending, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
            if worker not in done:
                if stopper is not None and stopper in done:
                    raise StepCancelled()
                raise TimeoutError(f"step did not finish within {timeout_s:g} s")
            run.returncode = worker.result()
            return run
        except BaseException:
            if not worker.done():
                worker.cancel()
                with contextlib.suppress(BaseException):
                    await worker
            if may_exist:
                await asyncio.shield(self._delete(name))
            raise
        finally:
            if stopper is not None:
                stopper.cancel()

    # -- the Job ------------------------------------------------------------------------------------

    async def _create(self, body: dict[str, Any]) -> dict[str, Any]:
        """Creates the Job; a same-named one still being deleted is waited for (delete_wait_s)."""
        ns, name = self.cfg.namespace, body["metadata"]["name"]
        loop = asyncio.get_running_loop()
        gone_by = loop.time() + self.cfg.delete_wait_s
        while True:
            try:
                job: dict[str, Any] = await self._call(
                    self._batch.create_namespaced_job, ns, body, field_validation="Strict"
                )
                return job
            except ApiException as e:
                if e.status != 409:
                    raise StepJobError(f"creating Job {ns}/{name}: {_api_message(e)}") from e
            except (*_TRANSPORT_ERRORS, ValueError) as e:
                raise StepJobError(f"creating Job {ns}/{name}: {e}") from e
            if loop.time() >= gone_by:
                raise StepJobError(
                    f"a Job {ns}/{name} already exists and was not gone after {self.cfg.delete_wait_s:g}s"
                )
            await asyncio.sleep(min(self.cfg.poll_interval_s, 1.0))

    async def _delete_orphans(self, job_id: str) -> None:
        """Jobs of this job id still there were left by a worker that died (only the lease holder runs a
        job, one step at a time): delete them, so they stop writing and free their GPUs."""
        try:
            found = await self._call(
                self._batch.list_namespaced_job, self.cfg.namespace, label_selector=f"{JOB_ID_LABEL}={job_id}"
            )
        except (ApiException, *_TRANSPORT_ERRORS) as e:
            log.warning("could not list the Jobs of job %s: %s", job_id, e)
            return
        for job in (found or {}).get("items") or []:
            if _get(job, "metadata", "deletionTimestamp") or _job_finished(job) is not None:
                continue  # going, or done (kept for its TTL: its log is the earlier attempt's story)
            name = _get(job, "metadata", "name")
            log.warning("deleting Job %s/%s, left running by an earlier attempt", self.cfg.namespace, name)
            await self._delete(name, wait=False)

    async def _delete(self, name: str, *, wait: bool = True) -> None:
        """Deletes the Job and its pods (Foreground: the Job stays until its pods are gone, so waiting for
        the Job waits for the pods), bounded by delete_wait_s; a failure is logged, not raised (the Job's
        activeDeadlineSeconds is the backstop)."""
        ns = self.cfg.namespace
        loop = asyncio.get_running_loop()
        gone_by = loop.time() + self.cfg.delete_wait_s
        while True:
            try:
                await self._call(self._batch.delete_namespaced_job, name, ns, propagation_policy="Foreground")
                break
            except ApiException as e:
                if e.status == 404:
                    return
                error = _api_message(e)
            except _TRANSPORT_ERRORS as e:
                error = str(e)
            if loop.time() >= gone_by:
                log.error("could not delete Job %s/%s: %s", ns, name, error)
                return
            await asyncio.sleep(min(self.cfg.poll_interval_s, 1.0))
        while wait and loop.time() < gone_by:
            try:
                await self._call(self._batch.read_namespaced_job, name, ns)
            except ApiException as e:
                if e.status == 404:
                    return
            except _TRANSPORT_ERRORS:
                pass
            await asyncio.sleep(min(self.cfg.poll_interval_s, 1.0))
        if wait:
            log.warning("Job %s/%s still terminating after %gs", ns, name, self.cfg.delete_wait_s)

    async def _follow(
        self, job: dict[str, Any], run: StepRun, on_event: Callable[[dict[str, Any]], None] | None
    ) -> int | None:
        """Until the step container exits: its log into `run` and `on_event`; returns the exit status."""
        ns, name = self.cfg.namespace, job["metadata"]["name"]
        labels = _get(job, "spec", "selector", "matchLabels") or {"batch.kubernetes.io/job-name": name}
        selector = ",".join(f"{k}={v}" for k, v in labels.items())
        loop = asyncio.get_running_loop()
        created_at = loop.time()
        cursor = LogCursor()
        last_read: float | None = None  # when the previous log read was sent
        started = False
        pull_error_since: float | None = None
        api_ok_at = created_at

        async def read_log(pod_name: str) -> None:
            nonlocal last_read
            sent = loop.time()
            since = None if last_read is None else math.ceil(sent - last_read) + _LOG_OVERLAP_S
            try:
                text = await self._text(
                    self._core.read_namespaced_pod_log, pod_name, ns, container=STEP_CONTAINER,
                    timestamps=True, since_seconds=since, limit_bytes=_LOG_POLL_LIMIT_BYTES,
                )  # fmt: skip
            except (ApiException, *_TRANSPORT_ERRORS) as e:
                log.debug("reading the log of %s/%s: %s", ns, pod_name, e)  # the next poll reads it
                return
            last_read = sent
            if len(text) >= _LOG_POLL_LIMIT_BYTES and not text.endswith("\n"):
                text = text[: text.rfind("\n") + 1]  # cut at the limit: the partial line comes whole next
            for line in cursor.feed(text):
                self._line(line, run, on_event)

        async def fail(reason: str) -> StepJobError:
            diagnosis = await self._diagnose_pods(ns, name, labels, STEP_CONTAINER, logs=False)
            tail = "\n".join(list(run.log)[-_ERROR_TAIL_LINES:])
            return StepJobError(
                f"Job {ns}/{name}: {reason}\n{diagnosis}" + (f"\nlog tail:\n{tail}" if tail else "")
            )

        error = ""
        while True:
            now = loop.time()
            try:
                job = await self._call(self._batch.read_namespaced_job, name, ns)
                found = await self._call(self._core.list_namespaced_pod, ns, label_selector=selector)
            except ApiException as e:
                if e.status == 404:
                    raise await fail("the Job was deleted while the step ran") from e
                if e.status in (401, 403):
                    raise StepJobError(f"reading Job {ns}/{name}: {_api_message(e)}") from e
                error = _api_message(e)  # the API may be briefly away: ask again
            except _TRANSPORT_ERRORS as e:
                error = str(e)
            else:
                api_ok_at = now
                pod = max(
                    found.get("items") or [],
                    key=lambda p: str(_get(p, "metadata", "creationTimestamp") or ""),
                    default=None,
                )
                status = _container_status(pod)
                terminated = _get(status, "state", "terminated")
                if terminated or _get(status, "state", "running"):
                    started = True
                if pod is not None and started:
                    pod_name = str(pod["metadata"]["name"])
                    await read_log(pod_name)
                    if terminated:
                        # The runtime may still be writing the last lines when the exit is reported.
                        for _ in range(_FINAL_LOG_POLLS):
                            if run.result is not None or terminated.get("exitCode") not in (0, _GATE):
                                break
                            await asyncio.sleep(self.cfg.poll_interval_s)
                            await read_log(pod_name)
                        return _exit_status(pod, terminated, run)
                waiting = _get(status, "state", "waiting") or {}
                reason, message = waiting.get("reason"), waiting.get("message") or ""
                if reason in _FATAL_WAITING:
                    raise await fail(f"the step cannot start: {reason}: {message}")
                if reason not in _PULL_ERRORS:
                    pull_error_since = None
                elif pull_error_since is None:
                    pull_error_since = now
                if pull_error_since is not None and now - pull_error_since >= self.steps.pull_error_grace_s:
                    grace = self.steps.pull_error_grace_s
                    raise await fail(f"the image cannot be pulled ({reason} for {grace:g}s): {message}")
                if _get(pod, "status", "phase") == "Failed":  # evicted, or killed before its container ran
                    raise await fail(
                        f"pod {_get(pod, 'metadata', 'name')} failed: {_get(pod, 'status', 'reason')}: "
                        f"{_get(pod, 'status', 'message') or ''}"
                    )
                finished = _job_finished(job)
                if finished == "Complete":  # its pod already gone (it exited 0)
                    return 0
                if finished is not None:
                    raise await fail(f"the Job failed: {finished}")
                if not started and now - created_at >= self.steps.start_timeout_s:
                    raise await fail(f"the step's pod did not start within {self.steps.start_timeout_s:g}s")
            if now - api_ok_at >= self.steps.api_outage_s:
                raise StepJobError(
                    f"Job {ns}/{name}: the Kubernetes API did not answer for {self.steps.api_outage_s:g}s "
                    f"(last error: {error})"
                )
            await asyncio.sleep(self.cfg.poll_interval_s)

    @staticmethod
    def _line(line: str, run: StepRun, on_event: Callable[[dict[str, Any]], None] | None) -> None:
        event = protocol.parse(line)
        if event is None:
            # tqdm redraws with carriage returns: keep the last state of each line.
            text = line.rsplit("\r", 1)[-1]
            if text.strip():
                run.log.append(text[:_LOG_LINE_LIMIT])
            return
        if event["event"] == "result":
            run.result = event
        if on_event is not None:
            on_event(event)

    __call__ = run_step


def _container_status(pod: dict[str, Any] | None) -> dict[str, Any] | None:
    for status in _get(pod, "status", "containerStatuses") or []:
        if status.get("name") == STEP_CONTAINER:
            return dict(status)
    return None


def _job_finished(job: dict[str, Any]) -> str | None:
    """ "Complete", "<reason>: <message>" of a Failed condition, or None while it runs."""
    for cond in _get(job, "status", "conditions") or []:
        if cond.get("status") != "True":
            continue
        if cond.get("type") == "Complete":
            return "Complete"
        if cond.get("type") == "Failed":
            return f"{cond.get('reason')}: {cond.get('message') or ''}".rstrip(": ")
    return None


def _exit_status(pod: dict[str, Any], terminated: dict[str, Any], run: StepRun) -> int | None:
    code = terminated.get("exitCode")
    reason = terminated.get("reason")
    pod_reason = _get(pod, "status", "reason")
    # The kernel or the kubelet ended it (OOMKilled, DeadlineExceeded, an eviction): the step's own last
    # line says nothing of that, so the log tail ends with what Kubernetes says.
    if code not in (0, protocol.GATE_FAILED) and (pod_reason or reason not in (None, "Error", "Completed")):
        extra = f"; pod {pod_reason}: {_get(pod, 'status', 'message') or ''}" if pod_reason else ""
        message = (terminated.get("message") or "").strip().splitlines()
        run.log.append(
            f"[kubernetes] the step container was ended: {reason} (exit status {code}){extra}"
            + (f": {message[-1][:500]}" if message else "")
        )
    return int(code) if isinstance(code, int) else None
