"""The Kubernetes step runner against the fake API server of test_kubernetes.py: the test plays the Job
controller and the kubelet (a pod for the Job, its container's states, its timestamped log lines)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import replace
from typing import Any

import pytest
from kubernetes import client as k8s

from app.promotion.launchers.kubernetes import JOB_ID_LABEL, job_object
from app.promotion.ml import protocol
from app.promotion.runner import StepCancelled, StepRun
from app.promotion.steps_k8s import (
    ENV_ALLOWLIST,
    KubernetesStepRunner,
    LogCursor,
    StepJobConfig,
    StepJobError,
    map_path,
    pod_argv,
    step_name,
)
from tests.promotion.test_kubernetes import CFG, FakeKubernetesApi, rfc3339_nano, validate

PATH_MAP = (
    ("/srv/lgw/artifacts", "/models/artifacts"),
    ("/srv/lgw/adapters", "/models/adapters"),
    ("/srv/base-models", "/models/base"),
    ("/srv/lgw/artifacts/.staging", "/models/staging"),  # nested: the longest prefix wins
)
STEPS = StepJobConfig(
    path_map=PATH_MAP,
    python_by_step={"quantize": "/opt/awq/bin/python"},
    gpus=1,
    cpu="8",
    memory="48Gi",
    start_timeout_s=5.0,
    pull_error_grace_s=0.3,
)
JOB_ID = "5a1c0e2f-9b8d-4c3a-8e7f-6d5c4b3a2910"
ARGV = [
    "/work/main/.venv/bin/python", "-m", "app.promotion.ml.merge",
    "--base", "/srv/base-models/Qwen2.5-7B-Instruct",
    "--adapter", "/srv/lgw/adapters/ab/abcdef",
    "--dtype", "auto", "--tolerance", "0.001",
    "--out", "/srv/lgw/artifacts/.staging/5a1c0e2f-0011aabb",
]  # fmt: skip
ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "PATH": "/usr/bin",
    "PYTHONPATH": "/work/main",
    "CUDA_VISIBLE_DEVICES": "0",
    "GATEWAY_DATABASE_URL": "postgresql+asyncpg://lgw:hunter2@db/lgw",
}


def event(name: str, **fields: Any) -> str:
    return protocol.EVENT_PREFIX + json.dumps({"event": name, "time": time.time(), **fields})


# --- pure parts --------------------------------------------------------------------------------------


def test_argv_gets_the_images_interpreter_and_the_pods_paths() -> None:
    assert pod_argv(ARGV, "python", PATH_MAP) == [
        "python", "-m", "app.promotion.ml.merge",
        "--base", "/models/base/Qwen2.5-7B-Instruct",
        "--adapter", "/models/adapters/ab/abcdef",
        "--dtype", "auto", "--tolerance", "0.001",
        "--out", "/models/staging/5a1c0e2f-0011aabb",
    ]  # fmt: skip
    assert pod_argv(["py", "--model=/srv/lgw/artifacts/merged/k"], "python", PATH_MAP) == [
        "python",
        "--model=/models/artifacts/merged/k",
    ]
    assert map_path("/srv/lgw/artifacts", PATH_MAP) == "/models/artifacts"
    assert map_path("/srv/lgw/artifacts/a/./b/", PATH_MAP) == "/models/artifacts/a/b"
    assert step_name(ARGV) == "merge"
    assert step_name(["python", "-m", "app.promotion.ml.quantize"]) == "quantize"
    assert step_name(["python", "script.py"]) == "step"


@pytest.mark.parametrize(
    "path",
    [
        "/etc/passwd",
        "/srv/lgw/artifacts2/x",  # a sibling with the same leading characters is not under the root
        "/srv/lgw/artifacts/../secrets/key",
        "/srv",
    ],
)
def test_a_path_under_no_mapped_root_is_refused(path: str) -> None:
    with pytest.raises(StepJobError, match="under no root mapped into the step's pod"):
        pod_argv(["python", "--calibration", path], "python", PATH_MAP)
    with pytest.raises(StepJobError, match="under no root"):
        pod_argv(["python", f"--calibration={path}"], "python", PATH_MAP)


def test_log_cursor_gives_each_line_once() -> None:
    base = 1_780_000_000 * 1_000_000_000

    def stamped(*lines: tuple[int, str]) -> str:
        return "".join(f"{rfc3339_nano(base + ns)} {text}\n" for ns, text in lines)

    cursor = LogCursor()
    # Fractions of different lengths (trailing zeros trimmed) still order right: .1 < .12 < .2
    assert cursor.feed(stamped((100_000_000, "a"), (120_000_000, "b"), (120_000_000, "c"))) == ["a", "b", "c"]
    # The next answer overlaps: the same lines again, then new ones, one sharing the newest timestamp.
    assert cursor.feed(
        stamped((100_000_000, "a"), (120_000_000, "b"), (120_000_000, "c"), (120_000_000, "d"), (2, "old"))
    ) == ["d"]
    assert cursor.feed(stamped((120_000_000, "b"), (200_000_000, "e"), (1_000_000_000, "f g  h"))) == [
        "e",
        "f g  h",
    ]
    assert cursor.feed("") == []


def test_the_env_is_an_allowlist() -> None:
    assert "PYTHONPATH" not in ENV_ALLOWLIST
    assert "CUDA_VISIBLE_DEVICES" not in ENV_ALLOWLIST
    assert {"HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"} <= set(ENV_ALLOWLIST)


def test_path_map_must_be_absolute_and_on_the_model_volume() -> None:
    api = k8s.ApiClient(k8s.Configuration(host="http://127.0.0.1:9"))
    with pytest.raises(ValueError, match="absolute"):
        KubernetesStepRunner(CFG, replace(STEPS, path_map=(("data/artifacts", "/models"),)), api_client=api)
    with pytest.raises(ValueError, match="not on the model volume"):
        KubernetesStepRunner(CFG, replace(STEPS, path_map=(("/srv/base", "/base"),)), api_client=api)
    api.close()  # type: ignore[no-untyped-call]


# --- against the fake API server -------------------------------------------------------------------


@pytest.fixture
def fake() -> Iterator[FakeKubernetesApi]:
    fake = FakeKubernetesApi()
    fake.thread.start()
    yield fake
    fake.server.shutdown()
    fake.server.server_close()
    assert not fake.invalid, fake.invalid


def make_runner(fake: FakeKubernetesApi, steps: StepJobConfig = STEPS) -> KubernetesStepRunner:
    return KubernetesStepRunner(CFG, steps, api_client=k8s.ApiClient(k8s.Configuration(host=fake.url)))


@pytest.fixture
async def runner(fake: FakeKubernetesApi) -> AsyncIterator[KubernetesStepRunner]:
    runner = make_runner(fake)
    yield runner
    runner.close()


class Kubelet:
    """Plays the Job controller and the kubelet for the one Job the runner creates."""

    def __init__(self, fake: FakeKubernetesApi) -> None:
        self.fake = fake
        self.job: dict[str, Any] = {}
        self.pod_name = ""

    async def job_created(self, timeout_s: float = 5.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with self.fake.lock:
                jobs = [  # created through the API (the controller's selector): not a test's leftover
                    o
                    for (kind, _, _), o in self.fake.objects.items()
                    if kind == "jobs" and "selector" in o["spec"]
                ]
            if jobs:
                self.job = jobs[-1]
                self.pod_name = f"{self.job['metadata']['name']}-x7k2p"
                return self.job
            await asyncio.sleep(0.01)
        raise AssertionError("no Job was created")

    def pod(self, **status: Any) -> None:
        """Creates or updates the Job's pod."""
        with self.fake.lock:
            for pod in self.fake.pods:
                if pod["metadata"]["name"] == self.pod_name:
                    pod["status"] = status
                    return
            labels = dict(self.job["spec"]["template"]["metadata"]["labels"])
            meta = {"name": self.pod_name, "namespace": "lgw", "labels": labels,
                    "creationTimestamp": "2026-12-03T08:00:00Z"}  # fmt: skip
            self.fake.pods.append({"metadata": meta, "status": status})

    def container(self, state: dict[str, Any], phase: str = "Running", **pod_status: Any) -> None:
        self.pod(phase=phase, containerStatuses=[{"name": "step", "state": state}], **pod_status)

    def finish(self, exit_code: int, reason: str | None = None) -> None:
        reason = reason or ("Completed" if exit_code == 0 else "Error")
        self.container({"terminated": {"exitCode": exit_code, "reason": reason}},
                       phase="Succeeded" if exit_code == 0 else "Failed")  # fmt: skip
        cond = "Complete" if exit_code == 0 else "Failed"
        with self.fake.lock:
            self.job["status"] = {"conditions": [{"type": cond, "status": "True"}]}

    async def run(
        self, lines: Sequence[str], exit_code: int | None, *, gap_s: float = 0.005, reason: str | None = None
    ) -> None:
        """Pending, then running with `lines` written over time, then exited (None: runs on)."""
        await self.job_created()
        self.pod(phase="Pending")
        await asyncio.sleep(0.05)
        self.container({"running": {"startedAt": "2026-12-03T08:00:01Z"}})
        for line in lines:
            self.fake.log(self.pod_name, line)
            await asyncio.sleep(gap_s)
        if exit_code is not None:
            self.finish(exit_code, reason)


async def run_with_kubelet(
    runner: KubernetesStepRunner, kubelet: Kubelet, lines: Sequence[str], exit_code: int | None, **kw: Any
) -> tuple[StepRun, list[dict[str, Any]]]:
    events: list[dict[str, Any]] = []
    play = asyncio.create_task(kubelet.run(lines, exit_code, reason=kw.pop("reason", None)))
    try:
        run = await runner.run_step(ARGV, env=ENV, on_event=events.append, timeout_s=30, job_id=JOB_ID,
                                    attempt=2, **kw)  # fmt: skip
    finally:
        play.cancel()
    return run, events


async def test_a_step_runs_as_a_job_with_its_events_result_and_log(
    runner: KubernetesStepRunner, fake: FakeKubernetesApi
) -> None:
    progress = [event("progress", step="merge", fraction=i / 40, message=f"layer {i}") for i in range(40)]
    lines = [
        "Loading checkpoint shards: 100%",
        *progress[:20],
        "tqdm 10%\rtqdm 50%\rtqdm 100%",
        *progress[20:],
        event("result", step="merge", passed=True, max_abs_logit_diff=0.0004),
        "merged model written",
    ]
    kubelet = Kubelet(fake)
    live = StepRun()
    started = time.monotonic()
    run, events = await run_with_kubelet(runner, kubelet, lines, 0, into=live)
    assert time.monotonic() - started < 3
    assert run is live
    assert run.returncode == 0 and not run.gate_failed
    # Every event once and in order, although each log read overlaps the previous one by seconds.
    assert [e["message"] for e in events if e["event"] == "progress"] == [f"layer {i}" for i in range(40)]
    assert events[-1]["event"] == "result"
    assert run.result is not None and run.result["max_abs_logit_diff"] == 0.0004
    assert list(run.log) == ["Loading checkpoint shards: 100%", "tqdm 100%", "merged model written"]
    reads = [q for q in fake.log_queries if q.get("timestamps") == "true"]
    assert len(reads) > 3 and "sinceSeconds" not in reads[0] and all("sinceSeconds" in q for q in reads[1:])
    assert all(q["container"] == "step" for q in reads)

    # The Job as sent (the fake validated it against the schema, strictly).
    (body,) = [b for m, p, b in fake.requests if m == "POST" and p.endswith("/jobs")]
    validate(body)
    assert body["metadata"]["name"] == "lgw-job-5a1c0e2f-9b8-merge-2"
    assert body["metadata"]["labels"][JOB_ID_LABEL] == JOB_ID
    pod = body["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert c["command"] == pod_argv(ARGV, "python", PATH_MAP)
    assert c["image"] == CFG.worker_image
    env = {e["name"]: e["value"] for e in c["env"]}
    assert env["HF_HUB_OFFLINE"] == "1" and env["TRANSFORMERS_OFFLINE"] == "1"
    for name in ("PATH", "PYTHONPATH", "CUDA_VISIBLE_DEVICES", "GATEWAY_DATABASE_URL"):
        assert name not in env
    assert "hunter2" not in json.dumps(body)
    assert c["resources"] == {
        "requests": {"nvidia.com/gpu": "1", "cpu": "8", "memory": "48Gi"},
        "limits": {"nvidia.com/gpu": "1", "memory": "48Gi"},
    }
    assert body["spec"]["backoffLimit"] == 0
    assert body["spec"]["activeDeadlineSeconds"] == 30 + 300
    assert pod["terminationGracePeriodSeconds"] == 5
    # A finished Job stays for its TTL (kubectl logs); nothing was deleted.
    assert fake.deletes == []


async def test_the_gguf_step_runs_on_cpus_with_its_own_interpreter(fake: FakeKubernetesApi) -> None:
    # llama.cpp's converter and quantizer and the gate's torch run on CPUs: the pod asks for no GPU
    # (a GPU node could keep it pending for nothing), and runs the interpreter of the GGUF environment.
    runner = make_runner(fake, steps=replace(STEPS, python_by_step={"gguf": "/opt/gguf/bin/python"}))
    argv = [
        "/work/main/.venv-gguf/bin/python", "-m", "app.promotion.ml.gguf",
        "--model", "/srv/lgw/artifacts/merged/0011aabb", "--type", "Q4_K_M", "--max-logprob-diff", "0.15",
        "--pre-tokenizer", "gpt-2", "--out", "/srv/lgw/artifacts/.staging/5a1c0e2f-0022ccdd",
    ]  # fmt: skip
    play = asyncio.create_task(Kubelet(fake).run([event("result", step="gguf", passed=True)], 0))
    try:
        run = await runner.run_step(argv, env=ENV, timeout_s=30, job_id=JOB_ID, attempt=1)
    finally:
        play.cancel()
        runner.close()
    assert run.returncode == 0 and run.result is not None and run.result["passed"] is True
    (body,) = [b for m, p, b in fake.requests if m == "POST" and p.endswith("/jobs")]
    validate(body)
    assert body["metadata"]["name"].endswith("-gguf-1")
    (c,) = body["spec"]["template"]["spec"]["containers"]
    assert c["command"][:3] == ["/opt/gguf/bin/python", "-m", "app.promotion.ml.gguf"]
    assert c["command"][c["command"].index("--model") + 1] == "/models/artifacts/merged/0011aabb"
    assert c["command"][c["command"].index("--out") + 1] == "/models/staging/5a1c0e2f-0022ccdd"
    assert c["resources"] == {"requests": {"cpu": "8", "memory": "48Gi"}, "limits": {"memory": "48Gi"}}


async def test_a_failed_gate_is_exit_status_3(runner: KubernetesStepRunner, fake: FakeKubernetesApi) -> None:
    lines = [
        event("progress", step="merge", fraction=0.5, message="comparing logits"),
        event("result", step="merge", passed=False, max_abs_logit_diff=0.2),
        "gate failed: max |logit diff| 0.2 > tolerance 0.001",
    ]
    run, _ = await run_with_kubelet(runner, Kubelet(fake), lines, protocol.GATE_FAILED)
    assert run.returncode == 3 and run.gate_failed
    assert run.result is not None and run.result["passed"] is False
    assert run.log_tail.splitlines()[-1] == "gate failed: max |logit diff| 0.2 > tolerance 0.001"


@pytest.mark.parametrize(
    ("code", "reason", "last_line"),
    [
        (1, "Error", "RuntimeError: safetensors header is corrupt"),
        (137, "OOMKilled", "[kubernetes] the step container was ended: OOMKilled (exit status 137)"),
    ],
)
async def test_a_crash_keeps_its_exit_status_and_log_tail(
    runner: KubernetesStepRunner, fake: FakeKubernetesApi, code: int, reason: str, last_line: str
) -> None:
    lines = [
        event("progress", step="merge", fraction=0.1, message="loading"),
        "Traceback (most recent call last):",
        '  File "/app/app/promotion/ml/merge.py", line 88, in main',
        "RuntimeError: safetensors header is corrupt",
    ]
    run, _ = await run_with_kubelet(runner, Kubelet(fake), lines, code, reason=reason)
    assert run.returncode == code and not run.gate_failed
    assert run.result is None
    assert "Traceback (most recent call last):" in run.log_tail
    assert run.log_tail.splitlines()[-1] == last_line


async def test_cancelling_deletes_the_job_and_its_pod(
    runner: KubernetesStepRunner, fake: FakeKubernetesApi
) -> None:
    kubelet = Kubelet(fake)
    stop = asyncio.Event()
    events: list[dict[str, Any]] = []
    play = asyncio.create_task(
        kubelet.run([event("progress", step="merge", fraction=0.2, message="x")], None)
    )
    task = asyncio.create_task(
        runner.run_step(ARGV, env=ENV, on_event=events.append, stop=stop, timeout_s=30, job_id=JOB_ID)
    )
    for _ in range(200):  # until it runs and its first event was read
        if events:
            break
        await asyncio.sleep(0.01)
    stop.set()
    with pytest.raises(StepCancelled):
        await asyncio.wait_for(task, 2)
    await play
    name = kubelet.job["metadata"]["name"]
    assert ("jobs", name, {"propagationPolicy": "Foreground"}) in [
        (k, n, {q: v for q, v in query.items() if q == "propagationPolicy"}) for k, n, query in fake.deletes
    ]
    assert not [key for key in fake.objects if key[0] == "jobs"]
    assert fake.pods == []  # the garbage collector took the pod with the Job
    # Already stopped: nothing is created at all.
    before = len(fake.requests)
    with pytest.raises(StepCancelled):
        await runner.run_step(ARGV, env=ENV, stop=stop, job_id=JOB_ID)
    assert len(fake.requests) == before


async def test_a_timeout_deletes_the_job(runner: KubernetesStepRunner, fake: FakeKubernetesApi) -> None:
    kubelet = Kubelet(fake)
    play = asyncio.create_task(kubelet.run(["working"], None))
    started = time.monotonic()
    with pytest.raises(TimeoutError, match=r"within 0\.4 s"):
        await runner.run_step(ARGV, env=ENV, timeout_s=0.4, job_id=JOB_ID)
    assert 0.4 <= time.monotonic() - started < 2
    await play
    assert [(k, n, q["propagationPolicy"]) for k, n, q in fake.deletes] == [
        ("jobs", kubelet.job["metadata"]["name"], "Foreground")
    ]
    assert fake.objects == {} and fake.pods == []


async def test_a_path_the_pod_cannot_see_is_refused_before_anything_is_created(
    runner: KubernetesStepRunner, fake: FakeKubernetesApi
) -> None:
    argv = [*ARGV[:-1], "/tmp/lgw-staging/out"]
    with pytest.raises(
        StepJobError, match=r"/tmp/lgw-staging/out is under no root mapped into the step's pod"
    ):
        await runner.run_step(argv, env=ENV, timeout_s=30, job_id=JOB_ID)
    assert fake.requests == []


async def test_a_pod_that_is_never_scheduled_fails_with_the_reason(fake: FakeKubernetesApi) -> None:
    runner = make_runner(fake, replace(STEPS, start_timeout_s=0.3))
    kubelet = Kubelet(fake)

    async def unschedulable() -> None:
        await kubelet.job_created()
        kubelet.pod(
            phase="Pending",
            conditions=[{"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                         "message": "0/4 nodes are available: 4 Insufficient nvidia.com/gpu."}],
        )  # fmt: skip
        with fake.lock:
            fake.events = [
                {"type": "Warning", "reason": "FailedScheduling", "message": "0/4 nodes are available",
                 "involvedObject": {"kind": "Pod", "name": kubelet.pod_name},
                 "lastTimestamp": "2026-12-03T08:00:01Z"},
            ]  # fmt: skip

    play = asyncio.create_task(unschedulable())
    started = time.monotonic()
    try:
        with pytest.raises(StepJobError) as caught:
            await runner.run_step(ARGV, env=ENV, timeout_s=30, job_id=JOB_ID)
    finally:
        runner.close()
    assert 0.3 <= time.monotonic() - started < 2
    await play
    message = str(caught.value)
    assert "did not start within 0.3s" in message
    assert "Unschedulable" in message
    assert "Insufficient nvidia.com/gpu" in message
    assert "FailedScheduling" in message
    # It would have started later, unattended: deleted.
    assert [(k, q["propagationPolicy"]) for k, _, q in fake.deletes] == [("jobs", "Foreground")]


async def test_an_image_that_cannot_be_pulled_fails_fast(
    runner: KubernetesStepRunner, fake: FakeKubernetesApi
) -> None:
    kubelet = Kubelet(fake)

    async def pull_fails() -> None:
        await kubelet.job_created()
        kubelet.container(
            {"waiting": {"reason": "ImagePullBackOff",
                         "message": 'Back-off pulling image "registry.example/lora-gateway-worker:0.1.0"'}},
            phase="Pending",
        )  # fmt: skip

    play = asyncio.create_task(pull_fails())
    started = time.monotonic()
    with pytest.raises(StepJobError, match="the image cannot be pulled") as caught:
        await runner.run_step(ARGV, env=ENV, timeout_s=30, job_id=JOB_ID)
    assert time.monotonic() - started < 2  # the grace (0.3 s), not start_timeout_s (5 s)
    await play
    assert "Back-off pulling image" in str(caught.value)
    assert fake.objects == {}


async def test_jobs_left_by_an_earlier_attempt_are_deleted_first(
    runner: KubernetesStepRunner, fake: FakeKubernetesApi
) -> None:
    orphan = job_object(JOB_ID, "quantize", ["python"], CFG, attempt=1)
    fake.put("jobs", orphan)
    other = job_object("77777777-0000-4000-8000-000000000000", "merge", ["python"], CFG, attempt=1)
    fake.put("jobs", other)
    finished = job_object(JOB_ID, "merge", ["python"], CFG, attempt=1)
    finished["status"] = {
        "conditions": [{"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded"}]
    }
    fake.put("jobs", finished)
    run, _ = await run_with_kubelet(runner, Kubelet(fake), [event("result", step="merge", passed=True)], 0)
    assert run.returncode == 0
    assert [(k, n) for k, n, _ in fake.deletes] == [("jobs", orphan["metadata"]["name"])]
    assert ("jobs", "lgw", other["metadata"]["name"]) in fake.objects  # another job's: untouched
    assert ("jobs", "lgw", finished["metadata"]["name"]) in fake.objects  # done: kept for its TTL
    created = next(i for i, (m, p, _) in enumerate(fake.requests) if m == "POST")
    deleted = next(i for i, (m, _, _) in enumerate(fake.requests) if m == "DELETE")
    assert deleted < created


async def test_a_refused_job_is_a_step_job_error(
    runner: KubernetesStepRunner, fake: FakeKubernetesApi
) -> None:
    fake.fail[("POST", "jobs")] = 403
    with pytest.raises(StepJobError, match="creating Job lgw/lgw-job-5a1c0e2f-9b8-merge: 403"):
        await runner.run_step(ARGV, env=ENV, timeout_s=30, job_id=JOB_ID)
    assert fake.deletes == []  # nothing was created, so nothing (of anyone's) is deleted
