"""The launcher interface: what the worker asks of wherever a dedicated deployment runs."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol


class LaunchError(RuntimeError):
    """The deployment could not be started or did not become ready; the message is for the job's error."""


@dataclass(frozen=True)
class DeploymentSpec:
    """One dedicated vLLM deployment serving one merged (optionally AWQ-quantized) model, never as a
    LoRA base: it is started without --enable-lora."""

    deployment_id: str  # the registry's id (hex); names the process / Kubernetes objects
    model_dir: str  # the merged or quantized model directory, as the vLLM server sees it
    served_model_name: str  # opaque name the gateway sends as `model` (never the tenant's text)
    quantized: bool = False  # an AWQ (compressed-tensors) model: vLLM reads the scheme from its config
    tensor_parallel_size: int = 1
    max_model_len: int | None = None
    dtype: str | None = None  # None: vLLM's choice ("auto"); CPU tests pass float32
    api_key: str | None = field(default=None, repr=False)  # the bearer token the server requires
    # Launcher-specific resources, e.g. {"gpus": 1, "cpu": "4", "memory": "32Gi"} for Kubernetes, or
    # {"kv_cache_bytes": 67108864} for a local CPU server.
    resources: dict[str, Any] = field(default_factory=dict)
    extra_args: tuple[str, ...] = ()


@dataclass(frozen=True)
class Launched:
    """What the worker records about a started deployment (stored as JSON in the deployment row), so
    that a restarted worker can check or stop it."""

    url: str  # base URL the gateway sends requests to
    ref: dict[str, Any]  # launcher-specific handle: pid and process group, or namespace and names


class Launcher(Protocol):
    name: str  # "local" or "kubernetes"

    async def launch(self, spec: DeploymentSpec) -> Launched:
        """Start the deployment and return at once (wait_ready waits)."""
        ...

    async def wait_ready(self, launched: Launched, timeout_s: float) -> None:
        """Return once it answers /health; raise LaunchError (with what it logged) if it exits or the
        timeout passes. The caller stops it on failure."""
        ...

    async def alive(self, launched: Launched) -> bool:
        """Whether it still runs (the process, or the Deployment's ready replicas)."""
        ...

    async def stop(self, launched: Launched) -> None:
        """Stop it and everything it started; idempotent (stopping a stopped one is fine)."""
        ...
