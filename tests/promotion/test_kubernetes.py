"""The Kubernetes launcher: its manifests against the Kubernetes OpenAPI schema (offline, strict: an unknown
field fails), and its API calls against a fake API server.

The fake (FakeKubernetesApi below) exists because no Kubernetes API server can run on this machine: it is
a small HTTP server in a thread that implements just the endpoints the launcher and the step runner
(test_steps_k8s.py) use, with the API's status codes (201/409 on create, 404, resourceVersion conflicts, an
immutable clusterIP), and checks every object it is sent against the same schema. Tests play the kubelet
and the controllers by setting the Deployment's status, the pods it lists and their (timestamped) logs.
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
import subprocess
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import kubernetes_validate
import pytest
from kubernetes import client as k8s

from app.promotion.launchers.base import DeploymentSpec, Launched, LaunchError
from app.promotion.launchers.kubernetes import (
    API_KEY_HASH_ANNOTATION,
    DEPLOYMENT_ID_LABEL,
    KubernetesConfig,
    KubernetesLauncher,
    deployment_object,
    job_object,
    object_name,
    secret_name,
    secret_object,
    service_object,
)

K8S_VERSION = "1.37"  # the newest schema kubernetes-validate ships
SECRET = "sk-backend-0123456789abcdef-never-in-a-manifest"
DEP_ID = "0f3a9c1b2d4e5f60718293a4b5c6d7e8"

CFG = KubernetesConfig(
    namespace="lgw",
    model_pvc="lgw-models",
    worker_image="registry.example/lora-gateway-worker:0.1.0",
    labels={"team": "ml-serving"},
    node_selector={"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"},
    tolerations=({"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},),
    service_account="lgw-serving",
    image_pull_secrets=("regcred",),
    extra_env={"VLLM_LOGGING_LEVEL": "INFO"},
    poll_interval_s=0.02,
    request_timeout_s=5.0,
    delete_wait_s=2.0,
)


def spec(**kw: Any) -> DeploymentSpec:
    values: dict[str, Any] = {
        "deployment_id": DEP_ID,
        "model_dir": f"/models/merged/{DEP_ID}",
        "served_model_name": "dep-7f0c",
        "api_key": SECRET,
    }
    return DeploymentSpec(**(values | kw))


def validate(obj: dict[str, Any]) -> None:
    kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


def container(deployment: dict[str, Any]) -> dict[str, Any]:
    containers: list[dict[str, Any]] = deployment["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


def test_the_strict_schema_refuses_an_unknown_field() -> None:
    """The validation below means something: a misspelt field fails."""
    obj = deployment_object(spec(), CFG)
    container(obj)["readinesProbe"] = container(obj).pop("readinessProbe")
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(obj)


@pytest.mark.parametrize("tp", [1, 2])
def test_deployment_and_service_are_schema_valid(tp: int) -> None:
    s = spec(
        tensor_parallel_size=tp,
        max_model_len=8192,
        dtype="bfloat16",
        resources={"cpu": "8", "memory": "64Gi"},
    )
    dep, svc = deployment_object(s, CFG), service_object(s, CFG)
    validate(dep)
    validate(svc)
    c = container(dep)
    assert c["command"] == ["vllm", "serve"]
    assert c["args"] == [
        f"/models/merged/{DEP_ID}",
        "--served-model-name", "dep-7f0c",
        "--port", "8000",
        "--tensor-parallel-size", str(tp),
        "--max-model-len", "8192",
        "--dtype", "bfloat16",
    ]  # fmt: skip
    assert "--enable-lora" not in c["args"]
    assert c["resources"]["limits"] == {"nvidia.com/gpu": str(tp), "memory": "64Gi"}
    assert c["resources"]["requests"] == {"nvidia.com/gpu": str(tp), "cpu": "8", "memory": "64Gi"}
    pod = dep["spec"]["template"]["spec"]
    shm = next(v for v in pod["volumes"] if v["name"] == "dshm")
    assert shm["emptyDir"]["medium"] == "Memory"
    assert {"name": "dshm", "mountPath": "/dev/shm"} in c["volumeMounts"]
    models = next(m for m in c["volumeMounts"] if m["name"] == "models")
    assert models == {"name": "models", "mountPath": "/models", "readOnly": True}
    assert dep["spec"]["replicas"] == 1
    assert dep["spec"]["strategy"] == {"type": "Recreate"}
    assert pod["enableServiceLinks"] is False
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert c["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    for probe in ("startupProbe", "readinessProbe"):
        assert c[probe]["httpGet"] == {"path": "/health", "port": 8000, "scheme": "HTTP"}

    name = dep["metadata"]["name"]
    assert name == "lgw-dep-0f3a9c1b2d4e" == svc["metadata"]["name"] == object_name(DEP_ID)
    for obj in (dep, svc, dep["spec"]["template"]):
        labels = obj["metadata"]["labels"]
        assert labels["app.kubernetes.io/name"] == "lora-gateway-deployment"
        assert labels["app.kubernetes.io/managed-by"] == "lora-gateway"
        assert labels[DEPLOYMENT_ID_LABEL] == DEP_ID
        assert labels["team"] == "ml-serving"
    assert svc["spec"]["selector"] == dep["spec"]["selector"]["matchLabels"]
    assert svc["spec"]["ports"][0]["port"] == 8000


VLLM_PYTHON = Path(__file__).resolve().parents[2] / ".venv-vllm" / "bin" / "python"
PARSE_SERVE_ARGS = """
import json, sys
from vllm.entrypoints.cli.serve import ServeSubcommand
from vllm.utils.argparse_utils import FlexibleArgumentParser
parser = FlexibleArgumentParser()
ServeSubcommand().subparser_init(parser.add_subparsers(dest="cmd"))
a = parser.parse_args(["serve", *json.loads(sys.argv[1])])
print(json.dumps({k: getattr(a, k) for k in ("model_tag", "served_model_name", "port", "tensor_parallel_size",
                  "max_model_len", "dtype", "enable_lora", "quantization", "api_key")}))
"""


@pytest.mark.vllm
def test_vllm_accepts_the_arguments() -> None:
    """The pinned image's vLLM (0.32, as the CPU build here) parses the container's arguments as meant."""
    dep = deployment_object(
        spec(tensor_parallel_size=2, max_model_len=8192, dtype="bfloat16", quantized=True), CFG
    )
    assert container(dep)["command"] == ["vllm", "serve"]
    assert CFG.image.endswith(":v0.32.0")
    run = subprocess.run(
        [str(VLLM_PYTHON), "-c", PARSE_SERVE_ARGS, json.dumps(container(dep)["args"])],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    parsed = json.loads(run.stdout.strip().splitlines()[-1])
    assert parsed == {
        "model_tag": f"/models/merged/{DEP_ID}",
        "served_model_name": ["dep-7f0c"],
        "port": 8000,
        "tensor_parallel_size": 2,
        "max_model_len": 8192,
        "dtype": "bfloat16",
        "enable_lora": None,
        "quantization": None,
        "api_key": None,
    }
    assert "deprecated" not in run.stderr.lower() and "will be removed" not in run.stderr


def test_gpus_from_resources_may_exceed_tp() -> None:
    dep = deployment_object(spec(tensor_parallel_size=2, resources={"gpus": 4}), CFG)
    validate(dep)
    assert container(dep)["resources"]["limits"]["nvidia.com/gpu"] == "4"


def test_quantized_needs_no_quantization_flag() -> None:
    dep = deployment_object(spec(quantized=True, model_dir=f"/models/quantized/{DEP_ID}-awq"), CFG)
    validate(dep)
    args = container(dep)["args"]
    assert args[0] == f"/models/quantized/{DEP_ID}-awq"
    assert not any(a.startswith("--quantization") for a in args)


def test_api_key_comes_from_the_deployments_secret_and_never_as_a_literal() -> None:
    dep = deployment_object(spec(), CFG)
    validate(dep)
    env = {e["name"]: e for e in container(dep)["env"]}
    assert env["VLLM_API_KEY"] == {
        "name": "VLLM_API_KEY",
        "valueFrom": {
            "secretKeyRef": {"name": "lgw-dep-0f3a9c1b2d4e-key", "key": "api-key", "optional": False}
        },
    }
    assert secret_name(DEP_ID) == "lgw-dep-0f3a9c1b2d4e-key"
    for obj in (dep, service_object(spec(), CFG)):
        text = json.dumps(obj)
        assert SECRET not in text
        assert base64.b64encode(SECRET.encode()).decode() not in text
    assert "--api-key" not in container(dep)["args"]
    # Another token changes the pod template (a rollout: env from a Secret is read at container start).
    digest = dep["spec"]["template"]["metadata"]["annotations"][API_KEY_HASH_ANNOTATION]
    other = deployment_object(spec(api_key="sk-another-token"), CFG)
    assert other["spec"]["template"]["metadata"]["annotations"][API_KEY_HASH_ANNOTATION] != digest
    assert len(digest) == 16


def test_secret_is_schema_valid_and_labelled_like_the_deployment() -> None:
    secret = secret_object(spec(), CFG)
    validate(secret)
    assert secret["metadata"] == {
        "name": "lgw-dep-0f3a9c1b2d4e-key",
        "namespace": "lgw",
        "labels": deployment_object(spec(), CFG)["metadata"]["labels"],
    }
    assert secret["type"] == "Opaque"
    assert base64.b64decode(secret["data"]["api-key"]).decode() == SECRET
    with pytest.raises(ValueError, match="no api_key"):
        secret_object(spec(api_key=None), CFG)


def test_a_spec_without_an_api_key_is_refused_unless_allowed() -> None:
    with pytest.raises(ValueError, match="unauthenticated"):
        deployment_object(spec(api_key=None), CFG)
    dep = deployment_object(spec(api_key=None), replace(CFG, allow_unauthenticated=True))
    validate(dep)
    assert "VLLM_API_KEY" not in {e["name"] for e in container(dep)["env"]}
    assert API_KEY_HASH_ANNOTATION not in dep["spec"]["template"]["metadata"].get("annotations", {})
    # Allowing unauthenticated specs never drops a key that was asked for.
    env = {
        e["name"]
        for e in container(deployment_object(spec(), replace(CFG, allow_unauthenticated=True)))["env"]
    }
    assert "VLLM_API_KEY" in env
    with pytest.raises(ValueError, match="VLLM_API_KEY"):
        deployment_object(spec(), replace(CFG, extra_env={"VLLM_API_KEY": SECRET}))


def test_fewer_gpus_than_tp_is_refused() -> None:
    with pytest.raises(ValueError, match="tensor_parallel_size 4"):
        deployment_object(spec(tensor_parallel_size=4, resources={"gpus": 2}), CFG)


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"model_dir": "/elsewhere/model"}, "not under the model volume"),
        ({"model_dir": "/models/../etc"}, "not under the model volume"),
        ({"extra_args": ("--enable-lora",)}, "--enable-lora"),
        ({"extra_args": (f"--api-key={SECRET}",)}, "--api-key"),
        ({"deployment_id": "not a label!"}, "label value"),
    ],
)
def test_bad_specs_are_refused(kw: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        deployment_object(spec(**kw), CFG)


def test_root_is_possible_for_images_that_need_it() -> None:
    dep = deployment_object(spec(), replace(CFG, run_as_user=None))
    validate(dep)
    assert "runAsNonRoot" not in dep["spec"]["template"]["spec"]["securityContext"]


def test_step_job_is_schema_valid() -> None:
    cmd = [
        "lora-gateway",
        "step",
        "merge",
        "--job-dir",
        "/models/jobs/abc",
        "--adapter",
        "/models/adapters/x",
    ]
    job = job_object("9b1e77aa00cc44dd", "merge", cmd, CFG, cpu="8", memory="48Gi", attempt=2)
    validate(job)
    assert job["metadata"]["name"] == "lgw-job-9b1e77aa00cc-merge-2"
    js = job["spec"]
    assert js["backoffLimit"] == 0
    assert js["activeDeadlineSeconds"] > 0
    assert js["ttlSecondsAfterFinished"] > 0
    pod = js["template"]["spec"]
    assert pod["restartPolicy"] == "Never"
    (c,) = pod["containers"]
    assert c["command"] == cmd
    assert c["image"] == CFG.worker_image
    assert c["resources"]["limits"] == {"nvidia.com/gpu": "1", "memory": "48Gi"}
    assert {"name": "models", "mountPath": "/models", "readOnly": False} in c["volumeMounts"]
    models = next(v for v in pod["volumes"] if v["name"] == "models")
    assert models["persistentVolumeClaim"] == {"claimName": "lgw-models", "readOnly": False}
    for labels in (job["metadata"]["labels"], js["template"]["metadata"]["labels"]):
        assert labels["lora-gateway/job-id"] == "9b1e77aa00cc44dd"
        assert labels["lora-gateway/step"] == "merge"
    # The Deployment and the Job run as one user: what the step writes, the server can read.
    dep_pod = deployment_object(spec(), CFG)["spec"]["template"]["spec"]
    assert pod["securityContext"] == dep_pod["securityContext"]


def test_cpu_only_job_and_long_step_names_stay_valid() -> None:
    job = job_object(
        "9b1e77aa00cc44dd", "evaluate-held-out-perplexity-of-the-quantized-model", ["true"], CFG, gpus=0
    )
    validate(job)
    assert len(job["metadata"]["name"]) <= 63
    assert "resources" not in job["spec"]["template"]["spec"]["containers"][0] or not job["spec"]["template"][
        "spec"
    ]["containers"][0]["resources"].get("limits")
    with pytest.raises(ValueError, match="worker image"):
        job_object("9b1e77aa00cc44dd", "merge", ["true"], replace(CFG, worker_image=None))


# --- the fake API server ------------------------------------------------------------------------------


def _status(code: int, reason: str, message: str) -> dict[str, Any]:
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "reason": reason,
            "message": message, "code": code}  # fmt: skip


def rfc3339_nano(ns: int) -> str:
    """As the kubelet prefixes log lines: nanoseconds, trailing zeros of the fraction trimmed."""
    seconds, frac = divmod(ns, 1_000_000_000)
    base = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))
    digits = f"{frac:09d}".rstrip("0")
    return f"{base}.{digits}Z" if digits else f"{base}Z"


class FakeKubernetesApi:
    """Deployments, Services, Secrets and Jobs (create, read, replace, delete, list), pods (as the test sets
    them), pod logs (plain, or timestamped lines with sinceSeconds) and events of the core, apps and batch
    APIs."""

    ROUTE = re.compile(
        r"^/(?:api/v1|apis/apps/v1|apis/batch/v1)/namespaces/(?P<ns>[^/]+)"
        r"/(?P<kind>deployments|services|secrets|jobs|pods|events)"
        r"(?:/(?P<name>[^/]+)(?:/(?P<sub>status|log))?)?$"
    )

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.objects: dict[tuple[str, str, str], dict[str, Any]] = {}
        self.pods: list[dict[str, Any]] = []
        self.events: list[dict[str, Any]] = []
        self.logs: dict[str, str] = {}
        self.timed_logs: dict[str, list[tuple[int, str]]] = {}  # pod -> (time.time_ns(), line)
        self.log_queries: list[dict[str, str]] = []
        self.requests: list[tuple[str, str, Any]] = []
        self.deletes: list[tuple[str, str, dict[str, str]]] = []  # (kind, name, query)
        self.fail: dict[tuple[str, str], int] = {}  # (method, kind) -> status code, answered once
        self.invalid: list[str] = []
        self._version = 0
        self._gone_after_reads: dict[tuple[str, str, str], int] = {}
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length)) if length else None
                code, answer = fake.handle(self.command, self.path, body)
                data = answer.encode() if isinstance(answer, str) else json.dumps(answer).encode()
                self.send_response(code)
                ctype = "text/plain" if isinstance(answer, str) else "application/json"
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PUT = do_DELETE = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.02,), daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_port}"

    def _next_version(self) -> str:
        self._version += 1
        return str(self._version)

    def handle(self, method: str, path: str, body: Any) -> tuple[int, Any]:
        with self.lock:
            parts = urlsplit(path)
            query = {k: v[0] for k, v in parse_qs(parts.query).items()}
            self.requests.append((method, parts.path, body))
            m = self.ROUTE.match(parts.path)
            if not m:
                return 404, _status(404, "NotFound", f"no route {parts.path}")
            ns, kind, name, sub = m["ns"], m["kind"], m["name"], m["sub"]
            if code := self.fail.pop((method, kind), None):
                return code, _status(code, "InternalError", f"injected failure of {method} {kind}")
            if kind == "pods":
                return self._pods(ns, name, sub, query)
            if kind == "events":
                wanted = query.get("fieldSelector", "").removeprefix("involvedObject.name=")
                items = [e for e in self.events if e["involvedObject"]["name"] == wanted]
                return 200, {"kind": "EventList", "apiVersion": "v1", "metadata": {}, "items": items}
            key = (kind, ns, name or "")
            if method == "POST" and name is None:
                return self._create(kind, ns, body, query)
            if method == "GET" and name is None:
                wanted = _selector(query)
                items = [
                    o for (k, n, _), o in self.objects.items()
                    if k == kind and n == ns and wanted.items() <= o["metadata"].get("labels", {}).items()
                ]  # fmt: skip
                return 200, {"kind": "List", "apiVersion": "v1", "metadata": {}, "items": items}
            if method == "PUT" and name and sub is None:
                return self._replace(key, body, query)
            current = self.objects.get(key)
            if current is None:
                return 404, _status(404, "NotFound", f'{kind} "{name}" not found')
            if method == "GET":
                if key in self._gone_after_reads:
                    self._gone_after_reads[key] -= 1
                    if self._gone_after_reads[key] <= 0:
                        del self._gone_after_reads[key], self.objects[key]
                return 200, current
            if method == "DELETE":
                self.deletes.append((kind, name or "", query))
                del self.objects[key]
                if kind == "jobs":  # the garbage collector takes the Job's pods with it
                    selector = current["spec"].get("selector") or {"matchLabels": {"job-name": name}}
                    labels = selector["matchLabels"]
                    self.pods = [
                        p for p in self.pods if not labels.items() <= p["metadata"]["labels"].items()
                    ]
                return 200, _status(200, "", "") | {"status": "Success"}
            return 405, _status(405, "MethodNotAllowed", method)

    def _check(self, body: dict[str, Any], query: dict[str, str]) -> str | None:
        if query.get("fieldValidation") != "Strict":
            return "the launcher must ask for strict field validation"
        try:
            kubernetes_validate.validate(body, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:
            self.invalid.append(str(e.message))
            return str(e.message)
        return None

    def _create(self, kind: str, ns: str, body: dict[str, Any], query: dict[str, str]) -> tuple[int, Any]:
        if error := self._check(body, query):
            return 400, _status(400, "BadRequest", error)
        key = (kind, ns, body["metadata"]["name"])
        if key in self.objects:
            return 409, _status(409, "AlreadyExists", f'{kind} "{key[2]}" already exists')
        obj = json.loads(json.dumps(body))
        obj["metadata"] |= {
            "resourceVersion": self._next_version(),
            "uid": f"uid-{self._version}",
            "generation": 1,
        }
        if kind == "services":
            obj["spec"]["clusterIP"] = "10.96.0.42"
            obj["spec"]["clusterIPs"] = ["10.96.0.42"]
        elif kind == "deployments":
            obj["status"] = {"observedGeneration": 1}
        elif kind == "jobs":  # as the Job controller's defaults since 1.27
            uid = obj["metadata"]["uid"]
            obj["spec"]["selector"] = {"matchLabels": {"batch.kubernetes.io/controller-uid": uid}}
            obj["spec"]["template"]["metadata"]["labels"] |= {
                "batch.kubernetes.io/controller-uid": uid,
                "batch.kubernetes.io/job-name": key[2],
                "controller-uid": uid,
                "job-name": key[2],
            }
            obj["status"] = {}
        self.objects[key] = obj
        return 201, obj

    def _replace(
        self, key: tuple[str, str, str], body: dict[str, Any], query: dict[str, str]
    ) -> tuple[int, Any]:
        if error := self._check(body, query):
            return 400, _status(400, "BadRequest", error)
        current = self.objects.get(key)
        if current is None:
            return 404, _status(404, "NotFound", f'{key[0]} "{key[2]}" not found')
        sent = body["metadata"].get("resourceVersion")
        if sent and sent != current["metadata"]["resourceVersion"]:
            return 409, _status(409, "Conflict", "the object has been modified")
        if key[0] == "services" and body["spec"].get("clusterIP", "10.96.0.42") != "10.96.0.42":
            return 422, _status(422, "Invalid", "spec.clusterIP: field is immutable")
        obj = json.loads(json.dumps(body))
        generation = current["metadata"]["generation"] + (obj.get("spec") != current.get("spec"))
        obj["metadata"] |= {"resourceVersion": self._next_version(), "uid": current["metadata"]["uid"],
                            "generation": generation}  # fmt: skip
        if key[0] == "services":
            obj["spec"].setdefault("clusterIP", "10.96.0.42")
        elif "status" in current:
            obj["status"] = current["status"]
        self.objects[key] = obj
        return 200, obj

    def _pods(self, ns: str, name: str | None, sub: str | None, query: dict[str, str]) -> tuple[int, Any]:
        if name and sub == "log":
            self.log_queries.append(query)
            if name in self.timed_logs:
                since = query.get("sinceSeconds")
                oldest = time.time_ns() - int(since) * 1_000_000_000 if since else 0
                stamps = query.get("timestamps") == "true"
                lines = [f"{rfc3339_nano(t)} {text}" if stamps else text
                         for t, text in self.timed_logs[name] if t >= oldest]  # fmt: skip
                return 200, "".join(line + "\n" for line in lines)
            if name not in self.logs:
                return 404, _status(404, "NotFound", f'pods "{name}" not found')
            lines = self.logs[name].splitlines()[-int(query.get("tailLines", "100000")) :]
            return 200, "\n".join(lines) + "\n"
        wanted = _selector(query)
        items = [p for p in self.pods if wanted.items() <= p["metadata"]["labels"].items()]
        return 200, {"kind": "PodList", "apiVersion": "v1", "metadata": {}, "items": items}

    # The test as kubelet and controller.
    def set_deployment_status(self, name: str, **status: Any) -> None:
        with self.lock:
            obj = self.objects[("deployments", CFG.namespace, name)]
            obj["status"] = {"observedGeneration": obj["metadata"]["generation"], **status}

    def mark_deleting(self, kind: str, name: str, gone_after_reads: int) -> None:
        """Its deletion in progress: it goes once it has been read this many times (not after a time, so
        that a slow machine cannot make it vanish before the launcher has seen it)."""
        with self.lock:
            key = (kind, CFG.namespace, name)
            self.objects[key]["metadata"]["deletionTimestamp"] = "2026-01-01T00:00:00Z"
            self._gone_after_reads[key] = gone_after_reads

    def put(self, kind: str, obj: dict[str, Any]) -> None:
        """An object made by someone else (not through the API, not validated)."""
        with self.lock:
            meta = obj["metadata"]
            meta.setdefault("resourceVersion", self._next_version())
            meta.setdefault("uid", f"uid-{self._version}")
            meta.setdefault("generation", 1)
            self.objects[(kind, meta["namespace"], meta["name"])] = obj

    def log(self, pod_name: str, *lines: str) -> None:
        """Lines the pod writes now (stamped with the current time, as the container runtime does)."""
        with self.lock:
            stamped = self.timed_logs.setdefault(pod_name, [])
            for line in lines:
                stamped.append((time.time_ns(), line))

    def calls(self) -> list[tuple[str, str]]:
        with self.lock:
            return [(method, path) for method, path, _ in self.requests]


def _selector(query: dict[str, str]) -> dict[str, str]:
    return dict(kv.split("=", 1) for kv in query.get("labelSelector", "").split(",") if kv)


@pytest.fixture
def fake_api() -> Iterator[FakeKubernetesApi]:
    fake = FakeKubernetesApi()
    fake.thread.start()
    yield fake
    fake.server.shutdown()
    fake.server.server_close()
    assert not fake.invalid, fake.invalid


@pytest.fixture
async def launcher(fake_api: FakeKubernetesApi) -> AsyncIterator[KubernetesLauncher]:
    api = k8s.ApiClient(k8s.Configuration(host=fake_api.url))
    launcher = KubernetesLauncher(CFG, api_client=api)
    yield launcher
    launcher.close()


NAME = object_name(DEP_ID)
DEP_PATH = f"/apis/apps/v1/namespaces/lgw/deployments/{NAME}"
SVC_PATH = f"/api/v1/namespaces/lgw/services/{NAME}"
SECRET_NAME = secret_name(DEP_ID)
SECRET_PATH = f"/api/v1/namespaces/lgw/secrets/{SECRET_NAME}"


def pod(name: str, **status: Any) -> dict[str, Any]:
    labels = {"app.kubernetes.io/name": "lora-gateway-deployment", DEPLOYMENT_ID_LABEL: DEP_ID}
    return {"metadata": {"name": name, "namespace": "lgw", "labels": labels}, "status": status}


async def test_launch_creates_a_secret_a_deployment_and_a_service(
    launcher: KubernetesLauncher, fake_api: FakeKubernetesApi
) -> None:
    launched = await launcher.launch(spec(tensor_parallel_size=2))
    assert launched.url == f"http://{NAME}.lgw.svc:8000"
    assert launched.ref == {"namespace": "lgw", "deployment": NAME, "service": NAME, "secret": SECRET_NAME}
    assert fake_api.calls() == [
        ("POST", "/api/v1/namespaces/lgw/secrets"),  # first: the pod cannot start without it
        ("POST", "/apis/apps/v1/namespaces/lgw/deployments"),
        ("POST", "/api/v1/namespaces/lgw/services"),
    ]
    posted = [body for method, _, body in fake_api.requests if method == "POST"]
    for body in posted:
        validate(body)
    assert posted[0] == secret_object(spec(), CFG)
    assert posted[1] == deployment_object(spec(tensor_parallel_size=2), CFG)
    assert posted[2] == service_object(spec(), CFG)
    stored_secret = fake_api.objects[("secrets", "lgw", SECRET_NAME)]
    assert base64.b64decode(stored_secret["data"]["api-key"]).decode() == SECRET
    # The token is in the Secret only: not in the Deployment or the Service, plain or base64.
    encoded = base64.b64encode(SECRET.encode()).decode()
    for kind in ("deployments", "services"):
        text = json.dumps(fake_api.objects[(kind, "lgw", NAME)])
        assert SECRET not in text
        assert encoded not in text
    env = {e["name"]: e for e in container(fake_api.objects[("deployments", "lgw", NAME)])["env"]}
    assert env["VLLM_API_KEY"]["valueFrom"]["secretKeyRef"]["name"] == SECRET_NAME


async def test_relaunch_replaces_all_three(launcher: KubernetesLauncher, fake_api: FakeKubernetesApi) -> None:
    await launcher.launch(spec())
    first = fake_api.objects[("deployments", "lgw", NAME)]["metadata"]["resourceVersion"]
    launched = await launcher.launch(spec(max_model_len=4096, api_key="sk-rotated-token"))
    assert launched.ref["deployment"] == NAME
    assert fake_api.calls()[3:] == [
        ("POST", "/api/v1/namespaces/lgw/secrets"),
        ("GET", SECRET_PATH),
        ("PUT", SECRET_PATH),
        ("POST", "/apis/apps/v1/namespaces/lgw/deployments"),
        ("GET", DEP_PATH),
        ("PUT", DEP_PATH),
        ("POST", "/api/v1/namespaces/lgw/services"),
        ("GET", SVC_PATH),
        ("PUT", SVC_PATH),
    ]
    put_dep = next(body for method, path, body in fake_api.requests if method == "PUT" and path == DEP_PATH)
    assert put_dep["metadata"]["resourceVersion"] == first
    stored = fake_api.objects[("deployments", "lgw", NAME)]
    assert "4096" in container(stored)["args"]
    assert stored["metadata"]["generation"] == 2
    assert fake_api.objects[("services", "lgw", NAME)]["spec"]["clusterIP"] == "10.96.0.42"
    secret = fake_api.objects[("secrets", "lgw", SECRET_NAME)]
    assert base64.b64decode(secret["data"]["api-key"]).decode() == "sk-rotated-token"
    assert len(fake_api.objects) == 3


async def test_launch_refuses_a_secret_owned_by_another_deployment(
    launcher: KubernetesLauncher, fake_api: FakeKubernetesApi
) -> None:
    twin = DEP_ID[:12] + "ffffffffffffffffffff"  # same first 12 characters: same object names
    theirs = secret_object(spec(deployment_id=twin, api_key="sk-theirs"), CFG)
    assert theirs["metadata"]["name"] == SECRET_NAME
    fake_api.put("secrets", theirs)
    with pytest.raises(LaunchError, match=f"Secret lgw/{SECRET_NAME} belongs to deployment '{twin}'"):
        await launcher.launch(spec())
    assert [m for m, _ in fake_api.calls()] == ["POST", "GET"]  # nothing replaced, nothing else created
    assert fake_api.objects[("secrets", "lgw", SECRET_NAME)]["data"] == theirs["data"]
    assert len(fake_api.objects) == 1


async def test_a_failed_launch_leaves_nothing_behind(
    launcher: KubernetesLauncher, fake_api: FakeKubernetesApi
) -> None:
    fake_api.fail[("POST", "services")] = 500
    with pytest.raises(LaunchError, match="injected failure"):
        await launcher.launch(spec())
    assert fake_api.objects == {}
    assert [(kind, name) for kind, name, _ in fake_api.deletes] == [
        ("deployments", NAME),
        ("secrets", SECRET_NAME),
    ]


async def test_launch_refuses_to_replace_another_deployments_objects(
    launcher: KubernetesLauncher, fake_api: FakeKubernetesApi
) -> None:
    await launcher.launch(spec())
    twin = DEP_ID[:12] + "ffffffffffffffffffff"  # same first 12 characters: same object name
    with pytest.raises(LaunchError, match="belongs to deployment"):
        await launcher.launch(spec(deployment_id=twin))
    assert container(fake_api.objects[("deployments", "lgw", NAME)]) == container(
        deployment_object(spec(), CFG)
    )


async def test_launch_waits_for_a_deletion_in_progress(
    launcher: KubernetesLauncher, fake_api: FakeKubernetesApi
) -> None:
    await launcher.launch(spec())
    uid = fake_api.objects[("deployments", "lgw", NAME)]["metadata"]["uid"]
    fake_api.mark_deleting("deployments", NAME, gone_after_reads=2)
    before = len(fake_api.calls())
    await launcher.launch(spec())
    dep_calls = [c for c in fake_api.calls()[before:] if "/deployments" in c[1]]
    assert dep_calls[:2] == [("POST", "/apis/apps/v1/namespaces/lgw/deployments"), ("GET", DEP_PATH)]
    assert dep_calls[-1] == ("POST", "/apis/apps/v1/namespaces/lgw/deployments")  # created anew once gone
    assert ("PUT", DEP_PATH) not in dep_calls  # a replace would have been lost with the deletion
    stored = fake_api.objects[("deployments", "lgw", NAME)]
    assert stored["metadata"]["uid"] != uid
    assert "deletionTimestamp" not in stored["metadata"]


async def test_a_bad_spec_is_a_launch_error_and_sends_nothing(
    launcher: KubernetesLauncher, fake_api: FakeKubernetesApi
) -> None:
    with pytest.raises(LaunchError, match="cannot hold"):
        await launcher.launch(spec(tensor_parallel_size=2, resources={"gpus": 1}))
    assert fake_api.calls() == []


async def test_wait_ready_returns_once_a_replica_is_ready(
    launcher: KubernetesLauncher, fake_api: FakeKubernetesApi
) -> None:
    launched = await launcher.launch(spec())
    fake_api.pods = [pod("lgw-dep-0f3a9c1b2d4e-7d9f-abcde", phase="Pending")]
    waiting = asyncio.create_task(launcher.wait_ready(launched, timeout_s=5))
    await asyncio.sleep(0.15)
    assert not waiting.done()
    assert await launcher.alive(launched) is False
    fake_api.set_deployment_status(NAME, replicas=1, updatedReplicas=1, readyReplicas=1, availableReplicas=1)
    started = time.monotonic()
    await asyncio.wait_for(waiting, 2)
    assert time.monotonic() - started < 1
    assert await launcher.alive(launched) is True


async def test_a_stale_ready_replica_of_the_old_spec_does_not_count(
    launcher: KubernetesLauncher, fake_api: FakeKubernetesApi
) -> None:
    launched = await launcher.launch(spec())
    fake_api.set_deployment_status(NAME, replicas=1, updatedReplicas=1, readyReplicas=1)
    await launcher.launch(spec(max_model_len=2048))  # generation 2, not yet observed by the controller
    with fake_api.lock:
        fake_api.objects[("deployments", "lgw", NAME)]["status"]["observedGeneration"] = 1
    with pytest.raises(LaunchError, match="not ready after"):
        await launcher.wait_ready(launched, timeout_s=0.2)


async def test_wait_ready_times_out_with_what_the_cluster_says(
    launcher: KubernetesLauncher, fake_api: FakeKubernetesApi
) -> None:
    launched = await launcher.launch(spec(tensor_parallel_size=2))
    pod_name = "lgw-dep-0f3a9c1b2d4e-7d9f-abcde"
    fake_api.pods = [
        pod(
            pod_name,
            phase="Pending",
            conditions=[{"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                         "message": "0/4 nodes are available: 4 Insufficient nvidia.com/gpu."}],
        )
    ]  # fmt: skip
    fake_api.events = [
        {"type": "Warning", "reason": "FailedScheduling", "message": "0/4 nodes are available",
         "involvedObject": {"kind": "Pod", "name": pod_name}, "lastTimestamp": "2026-01-01T00:00:01Z"},
    ]  # fmt: skip
    started = time.monotonic()
    with pytest.raises(LaunchError) as caught:
        await launcher.wait_ready(launched, timeout_s=0.3)
    assert 0.3 <= time.monotonic() - started < 2
    message = str(caught.value)
    assert "not ready after 0.3s" in message
    assert "Unschedulable" in message
    assert "Insufficient nvidia.com/gpu" in message
    assert "FailedScheduling" in message


async def test_wait_ready_fails_at_once_when_vllm_crash_loops(
    launcher: KubernetesLauncher, fake_api: FakeKubernetesApi
) -> None:
    launched = await launcher.launch(spec())
    pod_name = "lgw-dep-0f3a9c1b2d4e-7d9f-xyz12"
    fake_api.pods = [
        pod(
            pod_name,
            phase="Running",
            containerStatuses=[{
                "name": "vllm", "ready": False, "restartCount": 3,
                "state": {"waiting": {"reason": "CrashLoopBackOff", "message": "back-off 40s"}},
                "lastState": {"terminated": {"exitCode": 1, "reason": "Error",
                                             "message": "torch.OutOfMemoryError: CUDA out of memory"}},
            }],
        )
    ]  # fmt: skip
    fake_api.logs[pod_name] = "INFO loading weights\nERROR EngineCore failed to start\n"
    started = time.monotonic()
    with pytest.raises(LaunchError) as caught:
        await launcher.wait_ready(launched, timeout_s=30)
    assert time.monotonic() - started < 2
    message = str(caught.value)
    assert "CrashLoopBackOff" in message
    assert "CUDA out of memory" in message
    assert "EngineCore failed to start" in message
    assert fake_api.log_queries[-1]["previous"] == "true"  # the crashed container's log


async def test_wait_ready_fails_at_once_when_no_pod_can_be_created(
    launcher: KubernetesLauncher, fake_api: FakeKubernetesApi
) -> None:
    launched = await launcher.launch(spec())
    fake_api.set_deployment_status(
        NAME,
        conditions=[{"type": "ReplicaFailure", "status": "True", "reason": "FailedCreate",
                     "message": 'pods "lgw-dep-0f3a9c1b2d4e-7d9f-" is forbidden: exceeded quota: gpu-quota'}],
    )  # fmt: skip
    with pytest.raises(LaunchError, match="exceeded quota") as caught:
        await launcher.wait_ready(launched, timeout_s=30)
    assert "no pod" in str(caught.value)


async def test_wait_ready_fails_when_the_deployment_is_gone(
    launcher: KubernetesLauncher, fake_api: FakeKubernetesApi
) -> None:
    launched = await launcher.launch(spec())
    await launcher.stop(launched)
    with pytest.raises(LaunchError, match="does not exist"):
        await launcher.wait_ready(launched, timeout_s=5)


async def test_stop_deletes_all_three_and_is_idempotent(
    launcher: KubernetesLauncher, fake_api: FakeKubernetesApi
) -> None:
    launched = await launcher.launch(spec())
    assert len(fake_api.objects) == 3
    await launcher.stop(launched)
    assert fake_api.objects == {}
    deletes = [(m, p) for m, p in fake_api.calls() if m == "DELETE"]
    assert deletes == [("DELETE", DEP_PATH), ("DELETE", SVC_PATH), ("DELETE", SECRET_PATH)]
    await launcher.stop(launched)  # all 404 now: fine
    assert await launcher.alive(launched) is False
    # A handle recorded before deployments had their own Secret: the Secret is found by its name.
    await launcher.launch(spec())
    await launcher.stop(
        Launched(url=launched.url, ref={k: v for k, v in launched.ref.items() if k != "secret"})
    )
    assert fake_api.objects == {}


async def test_an_unreachable_api_is_a_launch_error_not_dead(fake_api: FakeKubernetesApi) -> None:
    fake_api.server.shutdown()
    fake_api.server.server_close()
    api = k8s.ApiClient(k8s.Configuration(host=fake_api.url, retries=0))
    launcher = KubernetesLauncher(CFG, api_client=api)
    launched = Launched(url="http://x", ref={"namespace": "lgw", "deployment": NAME, "service": NAME})
    try:
        with pytest.raises(LaunchError):
            await launcher.alive(launched)
        with pytest.raises(LaunchError):
            await launcher.launch(spec())
    finally:
        launcher.close()
