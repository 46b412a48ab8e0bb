"""The worker built from GATEWAY_* settings: which launchers it has and where its ML steps run."""

from __future__ import annotations

from pathlib import Path

import pytest

from app.promotion.launchers.kubernetes import KubernetesLauncher
from app.promotion.launchers.local import LocalLauncher
from app.promotion.runner import run_step
from app.promotion.steps_k8s import KubernetesStepRunner, StepJobError
from app.promotion.worker import launchers_from_settings, step_runner_from_settings
from app.settings import Settings

KUBECONFIG = """apiVersion: v1
kind: Config
clusters: [{name: c, cluster: {server: "http://127.0.0.1:9"}}]
users: [{name: u, user: {token: t}}]
contexts: [{name: x, context: {cluster: c, user: u}}]
current-context: x
"""


def settings(tmp_path: Path, **env: object) -> Settings:
    return Settings(_env_file=None, DATA_DIR=tmp_path / "data", **env)  # type: ignore[call-arg]


def test_local_only_by_default(tmp_path: Path) -> None:
    s = settings(tmp_path)
    launchers = launchers_from_settings(s)
    assert set(launchers) == {"local"} and isinstance(launchers["local"], LocalLauncher)
    assert step_runner_from_settings(s) is run_step  # steps run here, on whatever device torch sees


def test_kubernetes_launcher_and_step_jobs_from_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(KUBECONFIG)
    monkeypatch.setenv("GATEWAY_K8S_NODE_SELECTOR", '{"gpu": "h200"}')
    monkeypatch.setenv("GATEWAY_K8S_TOLERATIONS", '[{"key": "nvidia.com/gpu", "operator": "Exists"}]')
    s = settings(
        tmp_path,
        K8S_NAMESPACE="lgw",
        K8S_MODEL_PVC="models",
        K8S_WORKER_IMAGE="registry.example/lora-gateway-worker:1",
        K8S_KUBECONFIG=str(kubeconfig),
        K8S_RUN_AS_USER=-1,
        K8S_STEPS=True,
        K8S_STEP_QUANTIZER_PYTHON="/opt/awq/bin/python",
        K8S_STEP_GGUF_PYTHON="/opt/gguf/bin/python",
        K8S_STEP_GGUF_IMAGE="registry.example/lora-gateway-gguf:1",
        ARTIFACT_STORE=tmp_path / "artifacts",
        DEPLOYMENT_ARTIFACT_ROOT="/models/artifacts",
    )
    launcher = launchers_from_settings(s)["kubernetes"]
    assert isinstance(launcher, KubernetesLauncher)
    cfg = launcher.cfg
    assert (cfg.namespace, cfg.model_pvc, cfg.run_as_user) == ("lgw", "models", None)
    assert cfg.node_selector == {"gpu": "h200"} and cfg.tolerations[0]["operator"] == "Exists"
    runner = step_runner_from_settings(s)
    owner = getattr(runner, "__self__", None)
    assert isinstance(owner, KubernetesStepRunner)
    # The default path map: the artifact store as the pods mount it.
    assert owner.steps.path_map == ((str(tmp_path / "artifacts"), "/models/artifacts"),)
    # Each ML step's own environment; unset ones (the quantizer's image) fall back to the worker's.
    assert owner.steps.python_by_step == {"quantize": "/opt/awq/bin/python", "gguf": "/opt/gguf/bin/python"}
    assert owner.steps.image_by_step == {"gguf": "registry.example/lora-gateway-gguf:1"}
    assert owner.steps.gpus_by_step.get("gguf") == 0 and owner.steps.gpus == 1  # llama.cpp here runs on CPUs


async def test_a_step_path_outside_the_mapped_roots_is_refused_before_any_api_call(tmp_path: Path) -> None:
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(KUBECONFIG)
    s = settings(
        tmp_path, K8S_NAMESPACE="lgw", K8S_MODEL_PVC="models", K8S_WORKER_IMAGE="w:1", K8S_KUBECONFIG=str(kubeconfig),
        K8S_STEPS=True, ARTIFACT_STORE=tmp_path / "artifacts", DEPLOYMENT_ARTIFACT_ROOT="/models/artifacts",
    )  # fmt: skip
    runner = step_runner_from_settings(s)
    argv = ["python", "-m", "app.promotion.ml.merge", "--base", "/etc/secret-model", "--out", str(tmp_path / "artifacts" / "x")]
    with pytest.raises(StepJobError, match="under no root mapped"):
        await runner(argv, job_id="j1", attempt=1)  # the API server (port 9) is never asked
