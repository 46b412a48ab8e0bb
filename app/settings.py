"""Gateway configuration: environment variables prefixed GATEWAY_, a .env file, embedded defaults."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="GATEWAY_", env_file=".env", extra="ignore")

    # Everything the embedded default keeps on disk lives here (SQLite file, adapter store, admin key).
    DATA_DIR: Path = Path("data")
    # Empty means the embedded SQLite default; production sets postgresql+asyncpg://...
    DATABASE_URL: str = ""
    # Content-addressed adapter files; vLLM backends must be able to read this path (shared volume).
    ADAPTER_STORE: Path | None = None
    ADMIN_API_KEY: SecretStr | None = None

    HOST: str = "127.0.0.1"
    PORT: int = Field(8080, ge=1, le=65535)

    # Registry lookups on the request path are cached this long: a revoked key or a deleted adapter
    # stops working within this many seconds on every replica (at once on the one that made the change).
    CACHE_TTL_S: float = Field(5.0, ge=0.1, le=3600)
    MAX_REQUEST_BYTES: int = Field(8 << 20, ge=1024)
    # The adapter store's path as the vLLM backends see it (e.g. where a shared volume is mounted there).
    BACKEND_ADAPTER_ROOT: str | None = None
    UPSTREAM_CONNECT_TIMEOUT_S: float = Field(5.0, gt=0)
    UPSTREAM_READ_TIMEOUT_S: float = Field(600.0, gt=0)

    # On SIGTERM: /readyz answers 503 at once, new requests are still served for DRAIN_S (while load
    # balancers take the gateway out), then the server stops accepting and waits up to
    # SHUTDOWN_GRACE_S for requests in flight (streams included) before it exits.
    DRAIN_S: float = Field(5.0, ge=0, le=600)
    SHUTDOWN_GRACE_S: float = Field(30.0, ge=0, le=3600)
    # Every database call (connect, statement, wait for a pooled connection) gives up after this long.
    DB_TIMEOUT_S: float = Field(5.0, gt=0, le=120)
    # While the database does not answer, cached registry answers (keys, adapters, backends) are served
    # up to this long after they were loaded; unknown keys and admin calls get a 503 meanwhile.
    REGISTRY_MAX_STALE_S: float = Field(300.0, ge=0)

    # Residency: empty means the in-process store (one gateway process); several replicas need Redis.
    REDIS_URL: str = ""
    # Every Redis call (connect, command) gives up after this long, and is not retried by the client:
    # while Redis is down requests that need the fleet's state get a 503 within about this long (fail
    # closed), and the first calls after it returns succeed (no restart).
    REDIS_TIMEOUT_S: float = Field(1.0, gt=0, le=30)
    REDIS_PREFIX: str = "lgw"
    # Connections to Redis per gateway process; a call waits (up to REDIS_TIMEOUT_S) for a free one.
    REDIS_MAX_CONNECTIONS: int = Field(256, ge=4, le=10_000)
    # While Redis does not answer: "closed" (503 for every adapter request) or "warm" (adapters this
    # process recently placed keep going to those backends; no loads or evictions until it is back).
    REDIS_OUTAGE: str = Field("closed", pattern="^(closed|warm)$")
    PLACEMENT_POLICY: str = Field("pack", pattern="^(pack|lru|affinity|round-robin|random)$")
    # Most adapter loads under way at once per base model, across all its backends (0: no cap; each
    # backend still loads one at a time, since vLLM decodes nothing while it loads). Set 1 when the
    # backends share one GPU: two vLLM servers loading on one GPU at once take ~2.5 s a load instead of
    # ~0.2 s (bench/PLACEMENT.md).
    PLACEMENT_POOL_LOADS: int = Field(0, ge=0)
    # A load lock outlives a gateway that died mid-load by at most this long.
    LOAD_LOCK_TTL_S: float = Field(60.0, gt=0)
    # A request's lease on its adapter (what keeps it from being evicted under the request) lives this
    # long unless renewed; each gateway process renews its own every third of it. A killed gateway's
    # leases vanish after about this long.
    LEASE_TTL_S: float = Field(30.0, ge=1)
    # How long a request may wait for a slot or for someone else's load before it gets a 503.
    PLACEMENT_WAIT_S: float = Field(30.0, gt=0)
    # Requests of one base model waiting at once in one gateway process (over it: 503 at once), and the
    # share of those one tenant may hold (over it: 429 at once).
    PLACEMENT_MAX_WAITERS: int = Field(1024, ge=1)
    PLACEMENT_TENANT_SHARE: float = Field(0.5, gt=0, le=1)
    # After this long waiting for a free GPU slot, a request may go to a backend whose slots are all
    # active (one more adapter there). Off by default (= PLACEMENT_WAIT_S): under a backlog most requests
    # wait seconds, and overfilling them collapses throughput (bench/PLACEMENT.md).
    PLACEMENT_PATIENCE_S: float = Field(30.0, ge=0)
    # Backends' /v1/models is compared with the residency state this often (and on every 404).
    RECONCILE_INTERVAL_S: float = Field(15.0, gt=0)
    # Consecutive failed health checks after which a backend gets no traffic until it answers again.
    UNHEALTHY_AFTER: int = Field(2, ge=1)

    # Traffic per adapter for the promotion advice: summed in process, added every TRAFFIC_FLUSH_S into
    # TRAFFIC_BUCKET_S buckets (in Redis when set, shared by replicas; kept 25 h), at most
    # TRAFFIC_MAX_ADAPTERS adapters per flush (the rest summed as "other").
    TRAFFIC_FLUSH_S: float = Field(10.0, gt=0, le=300)
    TRAFFIC_BUCKET_S: int = Field(300, ge=10, le=3600)
    TRAFFIC_MAX_ADAPTERS: int = Field(10_000, ge=1, le=1_000_000)

    # Tenant limits (set per tenant and API key through the admin API). Counted in Redis when
    # GATEWAY_REDIS_URL is set (shared by every replica), else in the process. While Redis does not
    # answer, limited tenants' requests get a 503 ("closed") or go through unlimited ("open").
    LIMITS_REDIS_OUTAGE: str = Field("closed", pattern="^(closed|open)$")
    # max_tokens put into a token-limited tenant's request that names none (unless its cap is lower).
    LIMITS_DEFAULT_MAX_TOKENS: int = Field(4096, ge=1, le=10_000_000)
    # A request's place under a concurrency limit outlives a gateway that died serving it by this long.
    LIMITS_LEASE_S: float = Field(60.0, ge=3, le=3600)
    # With Redis: the share of each rate limit one process takes at once and admits from itself, without a
    # round trip per request (app.limits.allotment). Never more than the limit is admitted; across R
    # processes at most R x this share of a limit may go unused. 0: every admission asks Redis.
    LIMITS_LOCAL_SHARE: float = Field(0.002, ge=0, le=0.05)
    # Usage for billing is summed in the process and written every USAGE_FLUSH_S: a gateway killed (not
    # stopped) loses at most that much of it.
    USAGE_FLUSH_S: float = Field(10.0, gt=0, le=3600)

    # Promotion. Each replica polls the routing epoch this often: a switch reaches it within about this.
    ROUTES_POLL_S: float = Field(0.25, gt=0, le=10)
    # Merged and quantized models (content-addressed); dedicated deployments must be able to read it.
    ARTIFACT_STORE: Path | None = None
    # /metrics (Prometheus): a bearer token it asks for (default: the admin key; tenants' keys never
    # read it: its labels name tenants and adapters). Labels: at most METRICS_MAX_MODELS model names and
    # METRICS_MAX_TENANTS tenants, the busiest, the rest as "other"; METRICS_TENANT_LABEL off drops it.
    METRICS_TOKEN: SecretStr | None = None
    METRICS_MAX_MODELS: int = Field(100, ge=1, le=10_000)
    METRICS_MAX_TENANTS: int = Field(100, ge=1, le=10_000)
    METRICS_TENANT_LABEL: bool = True
    METRICS_RERANK_S: float = Field(60.0, gt=0)
    # Logs: JSON lines on stderr ("json"), readable lines ("console"), or "auto" (console at a terminal).
    # One line per /v1 request: "all", "errors" (status >= 400), or "off"; never keys or prompt text.
    LOG_LEVEL: str = Field("INFO", pattern="^(?i:debug|info|warning|error)$")
    LOG_FORMAT: str = Field("auto", pattern="^(auto|json|console)$")
    LOG_REQUESTS: str = Field("errors", pattern="^(all|errors|off)$")
    # The artifact store's path as dedicated deployments see it (default: the same path).
    DEPLOYMENT_ARTIFACT_ROOT: str | None = None
    # Interpreters of the ML steps: the merge runs where torch + transformers + peft are installed (the
    # gateway's own venv with the `ml` extra by default), AWQ in the quantizer's venv
    # (scripts/setup-quantizer.sh), local deployments with the vLLM venv's python.
    ML_PYTHON: str = ""
    QUANTIZER_PYTHON: str = ".venv-awq/bin/python"
    GGUF_PYTHON: str = ".venv-gguf/bin/python"  # llama.cpp's converter and quantizer (scripts/setup-gguf.sh)
    LOCAL_VLLM_PYTHON: str = ".venv-vllm/bin/python"
    # Extra `vllm serve` arguments of local dedicated deployments (e.g. "--dtype float32" on a CPU).
    LOCAL_VLLM_ARGS: str = ""
    # A worker's claim on its job lives this long unless renewed (every third of it): a crashed worker's
    # job is taken over by another after about this long.
    JOB_LEASE_S: float = Field(30.0, ge=3, le=3600)
    WORKER_POLL_S: float = Field(1.0, gt=0, le=60)
    # Attempts (workers that took the job and died) before a job is failed instead of resumed.
    JOB_MAX_ATTEMPTS: int = Field(3, ge=1, le=20)
    # A dedicated deployment that does not answer /health within this long fails its job.
    DEPLOY_READY_TIMEOUT_S: float = Field(900.0, gt=0)
    # Demotion: how long running requests on the deployment may take to finish before it is stopped.
    DEMOTE_DRAIN_S: float = Field(60.0, ge=0)

    # Kubernetes: dedicated deployments (launcher "kubernetes") and, with K8S_STEPS, the ML steps as Jobs
    # on GPU nodes. Off while K8S_NAMESPACE is empty. Models are read from (and steps write to) the PVC
    # K8S_MODEL_PVC mounted at K8S_MODEL_MOUNT_PATH: set DEPLOYMENT_ARTIFACT_ROOT to the artifact store's
    # path under it. Inside a cluster the pod's service account is used, else K8S_KUBECONFIG/K8S_CONTEXT.
    K8S_NAMESPACE: str = ""
    K8S_MODEL_PVC: str = ""
    K8S_MODEL_MOUNT_PATH: str = "/models"
    K8S_IMAGE: str = "vllm/vllm-openai:v0.32.0"
    K8S_WORKER_IMAGE: str = ""  # the image with lora-gateway and the ML extras (step Jobs)
    K8S_GPU_RESOURCE: str = "nvidia.com/gpu"
    K8S_NODE_SELECTOR: dict[str, str] = Field(default_factory=dict)  # JSON
    K8S_TOLERATIONS: list[dict[str, Any]] = Field(default_factory=list)  # JSON, Kubernetes' own form
    K8S_LABELS: dict[str, str] = Field(default_factory=dict)
    K8S_IMAGE_PULL_SECRETS: list[str] = Field(default_factory=list)
    K8S_SERVICE_ACCOUNT: str = ""
    K8S_RUN_AS_USER: int = Field(1000, ge=-1)  # -1: the image's own user
    K8S_KUBECONFIG: str = ""
    K8S_CONTEXT: str = ""
    K8S_STEPS: bool = False  # run merge / quantize as Kubernetes Jobs instead of local subprocesses
    # [[local prefix, pod prefix], ...]: where the artifact store, adapter store and base models are in
    # the step's pod (default: ARTIFACT_STORE -> DEPLOYMENT_ARTIFACT_ROOT).
    K8S_STEP_PATH_MAP: list[tuple[str, str]] = Field(default_factory=list)
    K8S_STEP_PYTHON: str = "python"
    K8S_STEP_QUANTIZER_PYTHON: str = ""  # the quantizer's interpreter in its image (its pins clash)
    K8S_STEP_QUANTIZER_IMAGE: str = ""
    K8S_STEP_GGUF_PYTHON: str = ""  # the GGUF exporter's interpreter in its image (llama.cpp's converter)
    K8S_STEP_GGUF_IMAGE: str = ""
    K8S_STEP_GPUS: int = Field(1, ge=0)
    K8S_STEP_CPU: str = ""
    K8S_STEP_MEMORY: str = ""

    # Freeze start-up objects out of the garbage collector's scans (fewer event-loop pauses under load).
    GC_FREEZE: bool = True

    # Upload limits: a LoRA adapter of a 70B model at r=64 is ~1 GiB; anything larger is not an adapter.
    MAX_ADAPTER_BYTES: int = Field(1 << 30, ge=1024)
    # Rank ceiling used when a base model has no backend yet (vLLM's own --max-lora-rank default is 16).
    DEFAULT_MAX_LORA_RANK: int = Field(64, ge=1)

    @model_validator(mode="after")
    def _fill_embedded_defaults(self) -> Settings:
        if not self.DATABASE_URL:
            self.DATABASE_URL = f"sqlite+aiosqlite:///{(self.DATA_DIR / 'gateway.db').resolve()}"
        if self.ADAPTER_STORE is None:
            self.ADAPTER_STORE = self.DATA_DIR / "adapters"
        self.ADAPTER_STORE = self.ADAPTER_STORE.resolve()
        if self.ARTIFACT_STORE is None:
            self.ARTIFACT_STORE = self.DATA_DIR / "artifacts"
        self.ARTIFACT_STORE = self.ARTIFACT_STORE.resolve()
        if self.DEPLOYMENT_ARTIFACT_ROOT is None:
            self.DEPLOYMENT_ARTIFACT_ROOT = str(self.ARTIFACT_STORE)
        if self.BACKEND_ADAPTER_ROOT is None:
            self.BACKEND_ADAPTER_ROOT = str(self.ADAPTER_STORE)
        if self.ADMIN_API_KEY is not None and len(self.ADMIN_API_KEY.get_secret_value()) < 16:
            raise ValueError("GATEWAY_ADMIN_API_KEY must be at least 16 characters")
        return self

    @property
    def store_root(self) -> Path:
        assert self.ADAPTER_STORE is not None  # filled by the validator
        return self.ADAPTER_STORE

    @property
    def artifact_root(self) -> Path:
        assert self.ARTIFACT_STORE is not None  # filled by the validator
        return self.ARTIFACT_STORE

    @property
    def is_sqlite(self) -> bool:
        return self.DATABASE_URL.startswith("sqlite")


@functools.lru_cache
def get_settings() -> Settings:
    return Settings()
