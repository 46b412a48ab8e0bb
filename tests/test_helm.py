"""The Helm chart (helm/lora-gateway), offline: `helm lint`, `helm template` of the default values,
values-production.yaml and the chart's ci/ combinations (every optional part on; URLs as values), every
rendered object against the Kubernetes 1.35 OpenAPI schema in strict mode (an unknown field fails), the
values against values.schema.json (and a bad value refused), and what the objects say: vLLM's serving
flags and GPUs, the NetworkPolicy's peers, the RBAC the worker's launcher needs, the hooks, the alert
rules and dashboard embedded as they are, and the registration script run against a real gateway.

Helm comes from scripts/setup-helm.sh (`make helm`, which `make test` runs); without it the module is
skipped. The Prometheus Operator's kinds (ServiceMonitor, PrometheusRule) are CRDs, which
kubernetes-validate has no schema for: they get a structural check of their own here.
"""

from __future__ import annotations

import base64
import copy
import functools
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "helm" / "lora-gateway"
K8S_VERSION = "1.35"
RELEASE, NAMESPACE = "lgw", "lora"


def _helm_binary() -> str | None:
    local = ROOT / ".venv" / "bin" / "helm"
    if local.is_file() and os.access(local, os.X_OK):
        return str(local)
    return shutil.which("helm")


HELM = _helm_binary()
pytestmark = pytest.mark.skipif(
    HELM is None, reason="helm is not installed: run `make helm` (scripts/setup-helm.sh) to get it"
)

SCENARIOS: dict[str, tuple[str, ...]] = {
    "default": (),
    "production": ("-f", str(CHART / "values-production.yaml")),
    "all-on": ("-f", str(CHART / "ci" / "all-on-values.yaml")),
    "external-urls": ("-f", str(CHART / "ci" / "external-urls-values.yaml")),
}


def helm(*args: str) -> subprocess.CompletedProcess[str]:
    assert HELM is not None
    return subprocess.run([HELM, *args], capture_output=True, text=True, timeout=60, check=False)


@functools.cache
def render(*args: str) -> tuple[dict[str, Any], ...]:
    out = helm("template", RELEASE, str(CHART), "--namespace", NAMESPACE, *args)
    assert out.returncode == 0, out.stderr
    return tuple(doc for doc in yaml.safe_load_all(out.stdout) if doc)


def render_error(*args: str) -> str:
    out = helm("template", RELEASE, str(CHART), "--namespace", NAMESPACE, *args)
    assert out.returncode != 0, "the render should have failed"
    return out.stderr


def scenario(name: str) -> tuple[dict[str, Any], ...]:
    return render(*SCENARIOS[name])


def objects(docs: tuple[dict[str, Any], ...], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def one(docs: tuple[dict[str, Any], ...], kind: str, name: str) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind} {name}: {len(found)} found"
    return found[0]


def component(docs: tuple[dict[str, Any], ...], kind: str, name: str) -> list[dict[str, Any]]:
    return [
        d for d in docs
        if d["kind"] == kind and d["metadata"]["labels"].get("app.kubernetes.io/component") == name
    ]  # fmt: skip


def pod_spec(workload: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = workload["spec"]["template"]["spec"]
    return spec


def container(workload: dict[str, Any], name: str | None = None) -> dict[str, Any]:
    containers = pod_spec(workload)["containers"]
    if name is None:
        assert len(containers) == 1
        return dict(containers[0])
    return dict(next(c for c in containers if c["name"] == name))


def env_of(c: dict[str, Any]) -> dict[str, Any]:
    """name -> value, or the valueFrom object."""
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in c.get("env", [])}


def flag(args: list[str], name: str) -> str:
    assert args.count(name) == 1, f"{name} in {args}"
    return args[args.index(name) + 1]


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def values_of(*files: Path) -> dict[str, Any]:
    """values.yaml with the files merged over it as Helm does (maps merge, null deletes a key)."""

    def merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
        out = copy.deepcopy(base)
        for key, value in over.items():
            if value is None:
                out.pop(key, None)
            elif isinstance(value, dict) and isinstance(out.get(key), dict):
                out[key] = merge(out[key], value)
            else:
                out[key] = value
        return out

    merged: dict[str, Any] = yaml.safe_load((CHART / "values.yaml").read_text())
    for f in files:
        merged = merge(merged, yaml.safe_load(f.read_text()))
    return merged


def backend(**changes: Any) -> tuple[str, str]:
    """--set-json arguments replacing the default backend by itself with `changes` (--set on a list
    element would replace the whole element)."""
    (default,) = values_of()["vllm"]["backends"]
    return ("--set-json", "vllm.backends=" + json.dumps([default | changes]))


# --- lint and schema ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_lint_strict(name: str) -> None:
    out = helm("lint", "--strict", str(CHART), *SCENARIOS[name])
    assert out.returncode == 0, out.stdout + out.stderr
    assert "0 chart(s) failed" in out.stdout


def _schema() -> dict[str, Any]:
    schema: dict[str, Any] = json.loads((CHART / "values.schema.json").read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    return schema


@pytest.mark.parametrize(
    "files",
    [(), ("values-production.yaml",), ("ci/all-on-values.yaml",), ("ci/external-urls-values.yaml",)],
    ids=["default", "production", "all-on", "external-urls"],
)
def test_values_files_match_the_schema(files: tuple[str, ...]) -> None:
    jsonschema.Draft7Validator(_schema()).validate(values_of(*(CHART / f for f in files)))


def test_schema_is_strict_at_every_level() -> None:
    """Every object level the chart defines refuses unknown keys (Kubernetes' own objects pass through)."""
    loose: list[str] = []

    def walk(node: Any, where: str) -> None:
        if not isinstance(node, dict):
            return
        if (
            node.get("type") == "object"
            and "properties" in node
            and node.get("additionalProperties") is not False
        ):
            loose.append(where)
        for key, value in node.items():
            if isinstance(value, dict):
                walk(value, f"{where}/{key}")
            elif isinstance(value, list):
                for i, item in enumerate(value):
                    walk(item, f"{where}/{key}/{i}")

    walk(_schema(), "#")
    assert not loose


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (("--set", "gateway.replicas=three"), "/gateway/replicas"),
        (("--set", "gateway.replica=3"), "'replica' not allowed"),
        (backend(maxLoraRank=17), "at '/vllm/backends/0/maxLoraRank'"),
        (backend(tensorParallelSize=0), "at '/vllm/backends/0/tensorParallelSize'"),
        (backend(name="Bad_Name"), "at '/vllm/backends/0/name'"),
        (backend(extra=1), "'extra' not allowed"),
        (backend(maxLoras="8"), "at '/vllm/backends/0/maxLoras': got string, want integer"),
        (("--set", "auth.adminApiKey=short"), "/auth/adminApiKey"),
        (("--set", "externalDatabase.url=mysql://db/x"), "/externalDatabase/url"),
        (("--set", "unknownTopLevel=1"), "'unknownTopLevel' not allowed"),
    ],
)
def test_schema_refuses_bad_values(args: tuple[str, ...], expected: str) -> None:
    assert expected in render_error(*args)


def test_schema_refuses_bad_values_in_python_too() -> None:
    validator = jsonschema.Draft7Validator(_schema())
    values = values_of()
    values["gateway"]["replicas"] = "three"
    values["worker"]["kubernetes"]["nope"] = True
    errors = {"/".join(map(str, e.absolute_path)) for e in validator.iter_errors(values)}
    assert errors == {"gateway/replicas", "worker/kubernetes"}


# --- every object against the Kubernetes schema ------------------------------------------------------------


_SM_ENDPOINT = {"port", "path", "interval", "scrapeTimeout", "authorization", "scheme", "tlsConfig"}


def _check_service_monitor(sm: dict[str, Any], docs: tuple[dict[str, Any], ...]) -> None:
    """ServiceMonitor (monitoring.coreos.com/v1): the fields used here, and that it selects a Service of
    the render whose named port it scrapes."""
    assert sm["apiVersion"] == "monitoring.coreos.com/v1"
    assert set(sm) == {"apiVersion", "kind", "metadata", "spec"}
    assert set(sm["spec"]) <= {"selector", "namespaceSelector", "endpoints", "targetLabels", "jobLabel"}
    assert sm["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    services = [
        s
        for s in objects(docs, "Service")
        if selects(sm["spec"]["selector"]["matchLabels"], s["metadata"]["labels"])
    ]
    assert services
    for endpoint in sm["spec"]["endpoints"]:
        assert set(endpoint) <= _SM_ENDPOINT
        assert re.fullmatch(r"\d+[smh]", endpoint["interval"])
        for service in services:
            assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}
        if "authorization" in endpoint:
            auth = endpoint["authorization"]
            assert auth["type"] == "Bearer"
            assert set(auth["credentials"]) == {"name", "key"}
    for label in sm["spec"].get("targetLabels", []):
        assert all(label in s["metadata"]["labels"] for s in services)


def _check_prometheus_rule(rule: dict[str, Any]) -> None:
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    assert set(rule) == {"apiVersion", "kind", "metadata", "spec"}
    assert set(rule["spec"]) == {"groups"}
    for group in rule["spec"]["groups"]:
        assert set(group) <= {"name", "interval", "rules", "limit", "partial_response_strategy", "labels"}
        assert group["name"] and isinstance(group["rules"], list)
        for r in group["rules"]:
            assert set(r) <= {"alert", "record", "expr", "for", "keep_firing_for", "labels", "annotations"}
            assert ("alert" in r) != ("record" in r) and isinstance(r["expr"], str | int)


def _check_metadata(doc: dict[str, Any]) -> None:
    meta = doc["metadata"]
    assert set(meta) <= {"name", "namespace", "labels", "annotations"}
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?", meta["name"])
    assert meta["labels"]["app.kubernetes.io/instance"] == RELEASE


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_every_object_validates_for_kubernetes_1_35(name: str) -> None:
    docs = scenario(name)
    kinds = set()
    for doc in docs:
        _check_metadata(doc)
        kinds.add(doc["kind"])
        if doc["apiVersion"].startswith("monitoring.coreos.com/"):
            # CRDs: kubernetes-validate has no schema for them (checked structurally instead).
            with pytest.raises(kubernetes_validate.SchemaNotFoundError):
                kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
            if doc["kind"] == "ServiceMonitor":
                _check_service_monitor(doc, docs)
            else:
                assert doc["kind"] == "PrometheusRule"
                _check_prometheus_rule(doc)
            continue
        try:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(f"{doc['kind']} {doc['metadata']['name']}: {e.message} at {list(e.path)}")
    names = [(d["kind"], d["metadata"]["name"]) for d in docs]
    assert len(names) == len(set(names)), "two objects of one kind share a name"
    assert {"Deployment", "Service", "Job", "ConfigMap", "NetworkPolicy", "Role"} <= kinds


def test_the_all_on_combination_renders_every_kind() -> None:
    kinds = {d["kind"] for d in scenario("all-on")}
    assert kinds == {
        "Deployment", "StatefulSet", "Service", "Secret", "ConfigMap", "Job", "PersistentVolumeClaim",
        "ServiceAccount", "Role", "RoleBinding", "NetworkPolicy", "HorizontalPodAutoscaler",
        "PodDisruptionBudget", "Ingress", "ServiceMonitor", "PrometheusRule",
    }  # fmt: skip


# --- vLLM ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["default", "production", "all-on"])
def test_vllm_args_gpus_and_key(name: str) -> None:
    docs = scenario(name)
    files = [Path(SCENARIOS[name][1])] if SCENARIOS[name] else []
    values = values_of(*files)
    backends = values["vllm"]["backends"]
    deployments = component(docs, "Deployment", "vllm")
    assert len(deployments) == len(backends) >= 1
    for wanted_backend in backends:
        dep = one(docs, "Deployment", f"{RELEASE}-lora-gateway-vllm-{wanted_backend['name']}")
        c = container(dep)
        args = c["args"]
        tp = wanted_backend.get("tensorParallelSize", 1)
        assert c["command"] == ["vllm", "serve"]
        assert args[0] == wanted_backend["model"]
        assert "--enable-lora" in args
        assert flag(args, "--max-loras") == str(wanted_backend["maxLoras"])
        assert flag(args, "--max-cpu-loras") == str(
            wanted_backend.get("maxCpuLoras") or wanted_backend["maxLoras"]
        )
        assert flag(args, "--max-lora-rank") == str(wanted_backend["maxLoraRank"])
        assert flag(args, "--tensor-parallel-size") == str(tp)
        assert flag(args, "--served-model-name") == wanted_backend["baseModel"]
        if wanted_backend.get("maxModelLen"):
            assert flag(args, "--max-model-len") == str(wanted_backend["maxModelLen"])
        if wanted_backend.get("quantization"):
            assert flag(args, "--quantization") == wanted_backend["quantization"]
        if wanted_backend.get("dtype"):
            assert flag(args, "--dtype") == wanted_backend["dtype"]
        extra = wanted_backend.get("extraArgs", [])
        assert args[len(args) - len(extra) :] == extra
        gpu = values["vllm"]["gpuResource"]
        assert c["resources"]["requests"][gpu] == c["resources"]["limits"][gpu] == tp
        env = env_of(c)
        assert env["VLLM_API_KEY"]["secretKeyRef"]["name"] in {
            values["auth"]["existingSecret"],
            f"{RELEASE}-lora-gateway",
        }
        assert env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True"
        assert not any(a.startswith("--api-key") for a in args), "the key belongs in the Secret, not the args"
        assert dep["spec"]["replicas"] == 1 and dep["spec"]["strategy"] == {"type": "Recreate"}
        assert pod_spec(dep)["enableServiceLinks"] is False
        service = one(docs, "Service", dep["metadata"]["name"])
        assert selects(service["spec"]["selector"], dep["spec"]["template"]["metadata"]["labels"])
        assert not any(
            selects(service["spec"]["selector"], other["spec"]["template"]["metadata"]["labels"])
            for other in deployments if other is not dep
        )  # fmt: skip


def test_production_has_a_tensor_parallel_backend_on_two_gpus() -> None:
    docs = scenario("production")
    tps = sorted(
        flag(container(d)["args"], "--tensor-parallel-size") for d in component(docs, "Deployment", "vllm")
    )
    assert tps == ["1", "2"]
    big = one(docs, "Deployment", f"{RELEASE}-lora-gateway-vllm-llama-70b-a")
    assert container(big)["resources"]["limits"]["nvidia.com/gpu"] == 2


def test_chart_flags_cannot_be_overridden_through_extra_args() -> None:
    assert "--max-loras is set by the chart" in render_error(*backend(extraArgs=["--max-loras=99"]))
    assert "--api-key is set by the chart" in render_error(*backend(extraArgs=["--api-key", "x"]))
    assert "leave nvidia.com/gpu out" in render_error(*backend(resources={"limits": {"nvidia.com/gpu": 4}}))
    assert "maxCpuLoras (2) must be >= maxLoras (4)" in render_error(*backend(maxCpuLoras=2))


# --- shared volume, gateway and worker -------------------------------------------------------------------


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_shared_volume_is_mounted_at_one_path_everywhere(name: str) -> None:
    docs = scenario(name)
    gateway = one(docs, "Deployment", f"{RELEASE}-lora-gateway")
    worker = one(docs, "Deployment", f"{RELEASE}-lora-gateway-worker")
    claims = set()
    mounts = set()
    for workload in [gateway, worker, *component(docs, "Deployment", "vllm")]:
        volume = next(v for v in pod_spec(workload)["volumes"] if v["name"] == "shared")
        claims.add(volume["persistentVolumeClaim"]["claimName"])
        mount = next(m for m in container(workload)["volumeMounts"] if m["name"] == "shared")
        mounts.add(mount["mountPath"])
        assert mount.get("readOnly", False) == (
            workload["metadata"]["labels"]["app.kubernetes.io/component"] == "vllm"
        )
    assert len(claims) == 1 and len(mounts) == 1
    (path,) = mounts
    pvcs = objects(docs, "PersistentVolumeClaim")
    if name == "external-urls":
        assert not pvcs and claims == {"lora-shared"}
    else:
        assert [p["metadata"]["name"] for p in pvcs] == list(claims)
        assert pvcs[0]["spec"]["accessModes"] == ["ReadWriteMany"]
    for workload in (gateway, worker):
        env = env_of(container(workload))
        assert env["GATEWAY_ADAPTER_STORE"] == env["GATEWAY_BACKEND_ADAPTER_ROOT"] == f"{path}/adapters"
        assert env["GATEWAY_ARTIFACT_STORE"] == env["GATEWAY_DEPLOYMENT_ARTIFACT_ROOT"] == f"{path}/artifacts"
    worker_env = env_of(container(worker))
    assert worker_env["GATEWAY_K8S_MODEL_MOUNT_PATH"] == path


def test_gateway_command_probes_and_shutdown() -> None:
    values = values_of(CHART / "ci" / "all-on-values.yaml")["gateway"]
    gateway = one(scenario("all-on"), "Deployment", f"{RELEASE}-lora-gateway")
    c = container(gateway)
    assert c["command"] == ["lora-gateway"]
    assert c["args"] == ["serve", "--host", "0.0.0.0", "--port", "8080", "--workers", "2", "--access-log"]
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert c["startupProbe"]["httpGet"]["path"] == "/healthz"
    env = env_of(c)
    assert float(env["GATEWAY_DRAIN_S"]) == values["drainSeconds"]
    assert float(env["GATEWAY_SHUTDOWN_GRACE_S"]) == values["shutdownGraceSeconds"]
    assert c["lifecycle"]["preStop"] == {"sleep": {"seconds": values["preStopSleepSeconds"]}}
    needed = values["preStopSleepSeconds"] + values["drainSeconds"] + values["shutdownGraceSeconds"]
    assert (
        pod_spec(gateway)["terminationGracePeriodSeconds"] == needed + values["terminationGraceMarginSeconds"]
    )
    assert "replicas" not in gateway["spec"], "the HPA owns the replica count"
    assert pod_spec(gateway)["enableServiceLinks"] is False
    err = render_error("--set", "gateway.terminationGracePeriodSeconds=20")
    assert "shorter than preStopSleepSeconds + drainSeconds + shutdownGraceSeconds (35)" in err


@pytest.mark.parametrize(
    "args",
    [
        ("--set", "gateway.replicas=2"),
        ("--set", "gateway.autoscaling.enabled=true"),
        ("--set", "gateway.workers=4"),
        ("--set", "gateway.replicas=2", "--set", "postgresql.enabled=true"),
    ],
)
def test_several_gateway_processes_without_redis_fail_the_render(args: tuple[str, ...]) -> None:
    err = render_error(*args)
    assert "Redis" in err and "GATEWAY_REDIS_URL" in err and "redis.enabled" in err


def test_several_gateway_replicas_with_redis_render() -> None:
    docs = render(
        "--set", "gateway.replicas=3", "--set", "redis.enabled=true", "--set", "postgresql.enabled=true"
    )
    gateway = one(docs, "Deployment", f"{RELEASE}-lora-gateway")
    assert gateway["spec"]["replicas"] == 3
    assert env_of(container(gateway))["GATEWAY_REDIS_URL"] == f"redis://{RELEASE}-lora-gateway-redis:6379/0"
    # ... but not on SQLite: one gateway process only.
    assert "SQLite" in render_error("--set", "gateway.replicas=3", "--set", "redis.enabled=true")


def test_security_contexts() -> None:
    docs = scenario("all-on")
    for workload in objects(docs, "Deployment") + objects(docs, "StatefulSet") + objects(docs, "Job"):
        spec = pod_spec(workload)
        assert spec["securityContext"]["runAsNonRoot"] is True
        assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        assert spec["enableServiceLinks"] is False
        for c in spec["containers"]:
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"] == {"drop": ["ALL"]}
            is_vllm = workload["metadata"]["labels"]["app.kubernetes.io/component"] == "vllm"
            # vLLM's libraries write beside themselves; everything else runs on a read-only root.
            assert sc.get("readOnlyRootFilesystem", False) is not is_vllm
        if workload["metadata"]["labels"]["app.kubernetes.io/component"] != "worker":
            assert spec["automountServiceAccountToken"] is False


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_everything_on_the_shared_volume_runs_as_one_user(name: str) -> None:
    """Gateway, worker, jobs, vLLM and what the worker launches (GATEWAY_K8S_RUN_AS_USER) share a UID, so
    that what one writes on the shared volume the others can read."""
    docs = scenario(name)
    on_volume = [
        d for d in objects(docs, "Deployment") + objects(docs, "Job")
        if any(v["name"] == "shared" for v in pod_spec(d).get("volumes", []))
    ]  # fmt: skip
    assert len(on_volume) >= 3
    uids = {
        (pod_spec(d)["securityContext"]["runAsUser"], pod_spec(d)["securityContext"]["runAsGroup"])
        for d in on_volume
    }
    assert uids == {(10001, 10001)}, "the images' user (docker/Dockerfile.gateway, Dockerfile.worker)"
    worker = env_of(container(one(docs, "Deployment", f"{RELEASE}-lora-gateway-worker")))
    assert worker["GATEWAY_K8S_RUN_AS_USER"] == "10001"


def test_reserved_environment_is_refused() -> None:
    assert "GATEWAY_DATABASE_URL is set by the chart" in render_error("--set", "env.GATEWAY_DATABASE_URL=x")
    assert "GATEWAY_REDIS_URL is set by the chart" in render_error("--set", "gateway.env.GATEWAY_REDIS_URL=x")


# --- secrets -----------------------------------------------------------------------------------------------


def _secret_refs(docs: tuple[dict[str, Any], ...]) -> set[tuple[str, str]]:
    refs = set()
    for workload in objects(docs, "Deployment") + objects(docs, "StatefulSet") + objects(docs, "Job"):
        for c in pod_spec(workload)["containers"]:
            for e in c.get("env", []):
                if "valueFrom" in e:
                    ref = e["valueFrom"]["secretKeyRef"]
                    refs.add((ref["name"], ref["key"]))
    return refs


def test_the_chart_generates_the_keys_it_is_not_given() -> None:
    docs = scenario("default")
    (secret,) = objects(docs, "Secret")
    data = {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}
    assert set(data) == {"GATEWAY_ADMIN_API_KEY", "GATEWAY_METRICS_TOKEN", "VLLM_API_KEY"}
    assert all(len(v) >= 16 for v in data.values()) and len(set(data.values())) == 3
    assert _secret_refs(docs) <= {(secret["metadata"]["name"], k) for k in data}


def test_existing_secrets_are_used_and_none_is_made() -> None:
    docs = scenario("production")
    assert not objects(docs, "Secret")
    assert _secret_refs(docs) == {
        ("lora-gateway-keys", "GATEWAY_ADMIN_API_KEY"),
        ("lora-gateway-keys", "GATEWAY_METRICS_TOKEN"),
        ("lora-gateway-keys", "VLLM_API_KEY"),
        ("lora-gateway-db", "GATEWAY_DATABASE_URL"),
        ("lora-gateway-redis", "GATEWAY_REDIS_URL"),
        ("hf-token", "HF_TOKEN"),
    }
    gateway = env_of(container(one(docs, "Deployment", f"{RELEASE}-lora-gateway")))
    assert {
        "GATEWAY_DATABASE_URL",
        "GATEWAY_REDIS_URL",
        "GATEWAY_ADMIN_API_KEY",
        "GATEWAY_METRICS_TOKEN",
    } <= set(gateway)


def test_urls_given_as_values_land_in_secrets_only() -> None:
    docs = scenario("external-urls")
    values = values_of(CHART / "ci" / "external-urls-values.yaml")
    main = one(docs, "Secret", f"{RELEASE}-lora-gateway")
    data = {k: base64.b64decode(v).decode() for k, v in main["data"].items()}
    assert data["GATEWAY_DATABASE_URL"] == values["externalDatabase"]["url"]
    assert data["GATEWAY_REDIS_URL"] == values["externalRedis"]["url"]
    assert data["GATEWAY_ADMIN_API_KEY"] == values["auth"]["adminApiKey"]
    rendered = yaml.safe_dump_all([d for d in docs if d["kind"] != "Secret"])
    for secret in (
        values["externalDatabase"]["url"],
        values["auth"]["adminApiKey"],
        values["auth"]["vllmApiKey"],
    ):
        assert secret not in rendered


# --- hooks -------------------------------------------------------------------------------------------------


def _migrations(docs: tuple[dict[str, Any], ...]) -> dict[str, Any]:
    return one(docs, "Job", f"{RELEASE}-lora-gateway-migrations")


@pytest.mark.parametrize("name", ["production", "external-urls"])
def test_migrations_run_as_a_pre_install_pre_upgrade_hook(name: str) -> None:
    docs = scenario(name)
    job = _migrations(docs)
    annotations = job["metadata"]["annotations"]
    assert annotations["helm.sh/hook"] == "pre-install,pre-upgrade"
    assert "before-hook-creation" in annotations["helm.sh/hook-delete-policy"]
    c = container(job)
    assert [*c["command"], *c["args"]] == ["lora-gateway", "migrate"]
    ref = env_of(c)["GATEWAY_DATABASE_URL"]["secretKeyRef"]
    if name == "production":
        assert ref["name"] == "lora-gateway-db"  # the user's, there before the release
    else:
        # A hook Secret of its own, made before the Job: the release's Secret does not exist pre-install.
        secret = one(docs, "Secret", ref["name"])
        hook = secret["metadata"]["annotations"]
        assert hook["helm.sh/hook"] == annotations["helm.sh/hook"]
        assert int(hook["helm.sh/hook-weight"]) < int(annotations["helm.sh/hook-weight"])


@pytest.mark.parametrize("name", ["default", "all-on"])
def test_a_database_made_by_the_release_is_migrated_post_install(name: str) -> None:
    """SQLite on the chart's volume, or the in-chart Postgres: neither exists before the release does."""
    job = _migrations(scenario(name))
    assert job["metadata"]["annotations"]["helm.sh/hook"] == "post-install,pre-upgrade"


@pytest.mark.parametrize("name", ["default", "production", "all-on"])
def test_registration_hook_registers_every_backend(name: str) -> None:
    docs = scenario(name)
    files = [Path(SCENARIOS[name][1])] if SCENARIOS[name] else []
    values = values_of(*files)
    job = one(docs, "Job", f"{RELEASE}-lora-gateway-register")
    config = one(docs, "ConfigMap", f"{RELEASE}-lora-gateway-register")
    for hooked in (job, config):
        assert hooked["metadata"]["annotations"]["helm.sh/hook"] == "post-install,post-upgrade"
    assert int(config["metadata"]["annotations"]["helm.sh/hook-weight"]) < int(
        job["metadata"]["annotations"]["helm.sh/hook-weight"]
    )
    # After the first migration when that runs post-install too.
    assert int(job["metadata"]["annotations"]["helm.sh/hook-weight"]) > int(
        _migrations(docs)["metadata"]["annotations"]["helm.sh/hook-weight"]
    )
    assert config["data"]["register-backends.py"] == (CHART / "files" / "register-backends.py").read_text()
    spec = json.loads(config["data"]["registration.json"])
    wanted = [b for b in values["vllm"]["backends"] if b.get("register", True)]
    assert [b["name"] for b in spec["backends"]] == [b["name"] for b in wanted]
    for got, wanted_backend in zip(spec["backends"], wanted, strict=True):
        service = one(docs, "Service", f"{RELEASE}-lora-gateway-vllm-{wanted_backend['name']}")
        assert (
            got["url"]
            == f"http://{service['metadata']['name']}.{NAMESPACE}.svc:{service['spec']['ports'][0]['port']}"
        )
        assert got["base_model"] == wanted_backend["baseModel"]
        assert got["gpu_slots"] == wanted_backend["maxLoras"]
        assert got["capacity"] == (wanted_backend.get("maxCpuLoras") or wanted_backend["maxLoras"])
        assert got["max_lora_rank"] == wanted_backend["maxLoraRank"]
        assert got["api_key_env"] == "VLLM_API_KEY" and "api_key" not in got
    env = env_of(container(job))
    assert env["VLLM_API_KEY"] == env_of(container(component(docs, "Deployment", "vllm")[0]))["VLLM_API_KEY"]
    # Through the Service that includes not-ready pods: the gateway is not ready before a backend exists.
    direct = one(docs, "Service", f"{RELEASE}-lora-gateway-direct")
    assert direct["spec"]["publishNotReadyAddresses"] is True
    assert env["GATEWAY_URL"].startswith(f"http://{RELEASE}-lora-gateway-direct.{NAMESPACE}.svc:")


def test_base_model_shapes_match_the_gateways_own_reading_of_config_json() -> None:
    from app.registry.base_models import facts_from_config

    values = values_of(CHART / "values-production.yaml")
    config = one(scenario("production"), "ConfigMap", f"{RELEASE}-lora-gateway-register")
    models = {m["name"]: m for m in json.loads(config["data"]["registration.json"])["base_models"]}
    for model in values["baseModels"]:
        shape = model["shape"]
        facts = facts_from_config({
            "hidden_size": shape["hiddenSize"],
            "num_hidden_layers": shape["numLayers"],
            "num_attention_heads": shape["numAttentionHeads"],
            "num_key_value_heads": shape.get("numKeyValueHeads"),
            "intermediate_size": shape["intermediateSize"],
        })  # fmt: skip
        got = models[model["name"]]
        assert got["module_shapes"] == facts.module_shapes
        assert (got["hidden_size"], got["num_layers"]) == (facts.hidden_size, facts.num_layers)
        assert got["path"] == model["path"] and got["aliases"] == model["aliases"]


def test_a_backend_of_an_unknown_base_model_fails_the_render() -> None:
    assert "is not one of baseModels" in render_error(*backend(baseModel="nope"))
    render(*backend(baseModel="nope", register=False))  # registered by hand: fine


# --- NetworkPolicy, RBAC, monitoring ---------------------------------------------------------------------


def _pod_labels(docs: tuple[dict[str, Any], ...], name: str) -> list[dict[str, str]]:
    return [d["spec"]["template"]["metadata"]["labels"] for d in component(docs, "Deployment", name)]


@pytest.mark.parametrize("name", ["default", "production", "all-on"])
def test_vllm_pods_take_connections_from_gateway_and_worker_only(name: str) -> None:
    docs = scenario(name)
    policy = one(docs, "NetworkPolicy", f"{RELEASE}-lora-gateway-vllm")
    selector = policy["spec"]["podSelector"]["matchLabels"]
    vllm_pods = _pod_labels(docs, "vllm")
    assert vllm_pods and all(selects(selector, labels) for labels in vllm_pods)
    others = [
        d["spec"]["template"]["metadata"]["labels"]
        for d in objects(docs, "Deployment") + objects(docs, "StatefulSet")
        if d["metadata"]["labels"]["app.kubernetes.io/component"] not in ("vllm", "gateway", "worker")
    ]
    assert not any(selects(selector, labels) for labels in others + _pod_labels(docs, "gateway"))
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    port = values_of()["vllm"]["port"]
    gateway_pods = _pod_labels(docs, "gateway")
    worker_pods = _pod_labels(docs, "worker")
    first, *rest = policy["spec"]["ingress"]
    assert first["ports"] == [{"protocol": "TCP", "port": port}]
    peers = first["from"]
    assert all(set(peer) == {"podSelector"} for peer in peers), "same-namespace pods only"
    admitted = [labels for labels in gateway_pods + worker_pods + vllm_pods + others
                if any(selects(p["podSelector"]["matchLabels"], labels) for p in peers)]  # fmt: skip
    assert admitted == gateway_pods + worker_pods
    if name == "default":
        assert rest == []
    else:  # Prometheus, from its namespace, to the metrics port only
        (metrics,) = rest
        assert metrics["ports"] == [{"protocol": "TCP", "port": port}]
        assert all("namespaceSelector" in peer for peer in metrics["from"])


def test_dedicated_deployments_policy_selects_the_launchers_pods() -> None:
    from app.promotion.launchers.base import DeploymentSpec
    from app.promotion.launchers.kubernetes import KubernetesConfig, deployment_object

    docs = scenario("default")
    worker_env = env_of(container(one(docs, "Deployment", f"{RELEASE}-lora-gateway-worker")))
    cfg = KubernetesConfig(
        namespace=worker_env["GATEWAY_K8S_NAMESPACE"],
        model_pvc=worker_env["GATEWAY_K8S_MODEL_PVC"],
        model_mount_path=worker_env["GATEWAY_K8S_MODEL_MOUNT_PATH"],
        labels=json.loads(worker_env["GATEWAY_K8S_LABELS"]),
    )
    spec = DeploymentSpec(
        deployment_id="0f3a9c1b2d4e5f60718293a4b5c6d7e8",
        model_dir=f"{worker_env['GATEWAY_DEPLOYMENT_ARTIFACT_ROOT']}/merged/x",
        served_model_name="dep-1",
        api_key="sk-0123456789abcdef",
    )
    pod = deployment_object(spec, cfg)["spec"]["template"]
    policy = one(docs, "NetworkPolicy", f"{RELEASE}-lora-gateway-dedicated")
    assert policy["metadata"]["namespace"] == cfg.namespace
    assert selects(policy["spec"]["podSelector"]["matchLabels"], pod["metadata"]["labels"])
    assert pod["spec"]["volumes"][0]["persistentVolumeClaim"]["claimName"] == f"{RELEASE}-lora-gateway-shared"


def _launcher_calls() -> set[tuple[str, str, str]]:
    """(apiGroup, resource, verb) of every Kubernetes call in the launcher and the step runner, read from
    their source, so that a new call without its RBAC rule fails here."""
    group = {"apps": "apps", "core": "", "batch": "batch"}
    verb = {"create": "create", "read": "get", "replace": "update", "delete": "delete", "list": "list",
            "patch": "patch", "watch": "watch"}  # fmt: skip
    calls = set()
    for path in ("app/promotion/launchers/kubernetes.py", "app/promotion/steps_k8s.py"):
        source = (ROOT / path).read_text()
        for api, method in re.findall(r"self\._(apps|core|batch)\.(\w+)", source):
            m = re.fullmatch(
                r"(create|read|replace|delete|list|patch)_namespaced_(\w+?)(_status|_log)?", method
            )
            assert m, method
            resource = m[2] + ("es" if m[2].endswith("s") else "s")
            if m[3]:
                resource += "/" + m[3].lstrip("_")
            calls.add((group[api], resource, verb[m[1]]))
    source = (ROOT / "app/promotion/launchers/kubernetes.py").read_text()
    # launch() applies its Secret, Deployment and Service through _method(create/read/replace), stop and a
    # failed launch delete them.
    assert 'for verb in ("create", "read", "replace")' in source and '_method("delete"' in source
    for kind, api in (("secrets", ""), ("deployments", "apps"), ("services", "")):
        calls |= {(api, kind, v) for v in ("create", "get", "update", "delete")}
    return calls


def test_worker_rbac_covers_every_launcher_call_and_no_more() -> None:
    docs = scenario("default")
    role = one(docs, "Role", f"{RELEASE}-lora-gateway-worker")
    granted = {
        (g, r, v)
        for rule in role["rules"] for g in rule["apiGroups"] for r in rule["resources"] for v in rule["verbs"]
    }  # fmt: skip
    assert granted == _launcher_calls()
    binding = one(docs, "RoleBinding", f"{RELEASE}-lora-gateway-worker")
    worker = one(docs, "Deployment", f"{RELEASE}-lora-gateway-worker")
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": pod_spec(worker)["serviceAccountName"], "namespace": NAMESPACE}
    ]
    assert pod_spec(worker)["automountServiceAccountToken"] is True
    env = env_of(container(worker))
    assert env["GATEWAY_K8S_NAMESPACE"] == role["metadata"]["namespace"] == NAMESPACE
    assert json.loads(env["GATEWAY_K8S_LABELS"])["app.kubernetes.io/instance"] == RELEASE


def test_dedicated_deployments_in_another_namespace() -> None:
    docs = scenario("external-urls")
    role = one(docs, "Role", f"{RELEASE}-lora-gateway-worker")
    binding = one(docs, "RoleBinding", f"{RELEASE}-lora-gateway-worker")
    policy = one(docs, "NetworkPolicy", f"{RELEASE}-lora-gateway-dedicated")
    assert role["metadata"]["namespace"] == binding["metadata"]["namespace"] == "lora-dedicated"
    assert binding["subjects"][0]["namespace"] == NAMESPACE
    assert policy["metadata"]["namespace"] == "lora-dedicated"
    for peer in policy["spec"]["ingress"][0]["from"]:
        assert peer["namespaceSelector"] == {"matchLabels": {"kubernetes.io/metadata.name": NAMESPACE}}
    env = env_of(container(one(docs, "Deployment", f"{RELEASE}-lora-gateway-worker")))
    assert (env["GATEWAY_K8S_NAMESPACE"], env["GATEWAY_K8S_MODEL_PVC"]) == (
        "lora-dedicated",
        "lora-shared-dedicated",
    )


def test_prometheus_rule_carries_the_groups_of_alerts_yaml() -> None:
    alerts = yaml.safe_load((CHART / "files" / "alerts.yaml").read_text())
    for name in ("production", "all-on"):
        (rule,) = objects(scenario(name), "PrometheusRule")
        assert rule["spec"]["groups"] == alerts["groups"]
        assert rule["metadata"]["labels"]["release"] in {"kube-prometheus-stack", "prometheus"}


def test_dashboard_configmap_holds_the_dashboard_verbatim() -> None:
    text = (CHART / "files" / "grafana-dashboard.json").read_text()
    (dashboard,) = [
        c
        for c in objects(scenario("production"), "ConfigMap")
        if c["metadata"]["name"].endswith("-dashboard")
    ]
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert dashboard["metadata"]["annotations"] == {"grafana_folder": "LLM"}
    assert list(dashboard["data"].values()) == [text]
    json.loads(text)


def test_service_monitors_scrape_gateway_with_the_metrics_token_and_vllm() -> None:
    docs = scenario("production")
    gateway_sm = one(docs, "ServiceMonitor", f"{RELEASE}-lora-gateway")
    (endpoint,) = gateway_sm["spec"]["endpoints"]
    assert endpoint["path"] == "/metrics"
    assert endpoint["authorization"]["credentials"] == {
        "name": "lora-gateway-keys",
        "key": "GATEWAY_METRICS_TOKEN",
    }
    gateway_env = env_of(container(one(docs, "Deployment", f"{RELEASE}-lora-gateway")))
    assert gateway_env["GATEWAY_METRICS_TOKEN"]["secretKeyRef"] == endpoint["authorization"]["credentials"]
    vllm_sm = one(docs, "ServiceMonitor", f"{RELEASE}-lora-gateway-vllm")
    matched = [
        s
        for s in objects(docs, "Service")
        if selects(vllm_sm["spec"]["selector"]["matchLabels"], s["metadata"]["labels"])
    ]
    assert sorted(s["metadata"]["name"] for s in matched) == sorted(
        d["metadata"]["name"] for d in component(docs, "Deployment", "vllm")
    )
    assert objects(scenario("default"), "ServiceMonitor") == []


# --- the registration script against a real gateway ---------------------------------------------------------


ADMIN = "helm-test-admin-key-0123456789"


@pytest.fixture(scope="module")
def live_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The gateway app on SQLite, served over HTTP in a thread (the script runs as its own process)."""
    import uvicorn
    from alembic import command
    from pydantic import SecretStr

    from app.cli import alembic_config
    from app.main import create_app
    from app.settings import Settings

    root = tmp_path_factory.mktemp("helm-gateway")
    url = f"sqlite+aiosqlite:///{root / 'gateway.db'}"
    cfg = alembic_config(url)
    cfg.attributes["configure_logger"] = False
    command.upgrade(cfg, "head")
    settings = Settings(
        _env_file=None,  # type: ignore[call-arg]
        DATABASE_URL=url,
        DATA_DIR=root / "data",
        ADMIN_API_KEY=SecretStr(ADMIN),
        REDIS_URL="",
        RECONCILE_INTERVAL_S=3600,
        UPSTREAM_CONNECT_TIMEOUT_S=0.5,  # the registered backends do not exist here
    )
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(create_app(settings), log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the gateway did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(15)


def _run_registration(
    url: str, spec: dict[str, Any], key: str = "vllm-key-0123456789"
) -> subprocess.CompletedProcess[str]:
    env = {
        "PATH": os.environ.get("PATH", ""),
        "GATEWAY_URL": url,
        "GATEWAY_ADMIN_API_KEY": ADMIN,
        "LGW_REGISTRATION": json.dumps(spec),
        "VLLM_API_KEY": key,
        "LGW_WAIT_S": "10",
    }
    script = CHART / "files" / "register-backends.py"
    return subprocess.run(
        [sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=60, check=False
    )


def _get(url: str, path: str) -> dict[str, Any]:
    import httpx

    response = httpx.get(url + path, headers={"Authorization": f"Bearer {ADMIN}"}, timeout=10)
    response.raise_for_status()
    data: dict[str, Any] = response.json()
    return data


def test_registration_script_creates_then_patches(live_gateway: str) -> None:
    config = one(scenario("all-on"), "ConfigMap", f"{RELEASE}-lora-gateway-register")
    spec = json.loads(config["data"]["registration.json"])
    spec["base_models"] = [m for m in spec["base_models"] if m["name"] != "on-volume"]  # no config.json here
    first = _run_registration(live_gateway, spec)
    assert first.returncode == 0, first.stderr
    assert "backend qwen-a: created" in first.stdout and "backend qwen-tp2: created" in first.stdout
    backend = _get(live_gateway, "/admin/v1/backends/qwen-tp2")
    assert (backend["gpu_slots"], backend["capacity"], backend["max_lora_rank"], backend["max_num_seqs"]) == (
        8,
        64,
        64,
        32,
    )
    assert backend["api_key_set"] is True
    assert backend["url"] == f"http://{RELEASE}-lora-gateway-vllm-qwen-tp2.{NAMESPACE}.svc:8000"
    tiny = _get(live_gateway, "/admin/v1/base-models/tiny")
    assert tiny["module_shapes"] == {"q_proj": [128, 128], "v_proj": [128, 128]} and tiny["public"] is False

    # An upgrade with other sizes: the same backends, patched; the base models stay.
    for b in spec["backends"]:
        b["gpu_slots"], b["capacity"] = 12, 96
    again = _run_registration(live_gateway, spec)
    assert again.returncode == 0, again.stderr
    assert "base model tiny: unchanged" in again.stdout and "backend qwen-tp2: patched" in again.stdout
    backend = _get(live_gateway, "/admin/v1/backends/qwen-tp2")
    assert (backend["gpu_slots"], backend["capacity"]) == (12, 96)
    assert len(_get(live_gateway, "/admin/v1/backends")["data"]) == 2

    # What cannot be patched is refused with a message, not changed silently.
    spec["backends"][0]["url"] = "http://elsewhere:8000"
    moved = _run_registration(live_gateway, spec)
    assert moved.returncode == 1
    assert "cannot be patched; delete the backend" in moved.stderr
