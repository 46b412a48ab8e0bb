"""The registry's tables: tenants, API keys, base models, backends, adapters, jobs, deployments."""

from __future__ import annotations

import enum
import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Enum,
    Float,
    ForeignKey,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import Mapped, mapped_column
from sqlalchemy.sql.expression import false, true

from app.db.base import Base, CreatedMixin, IdMixin, UTCDateTime


def _enum(cls: type[enum.Enum]) -> Enum:
    # Stored as plain strings (no native PG enum): adding a state is then a code change, not a migration.
    return Enum(cls, native_enum=False, length=32, values_callable=lambda e: [m.value for m in e])


class BackendKind(enum.StrEnum):
    SHARED = "shared"  # serves many tenants' adapters on top of the base model
    DEDICATED = "dedicated"  # runs one promoted (merged) adapter


class BackendState(enum.StrEnum):
    ACTIVE = "active"
    DRAINING = "draining"  # no new adapters placed here; in-flight work finishes
    DOWN = "down"


class AdapterState(enum.StrEnum):
    READY = "ready"
    DISABLED = "disabled"
    DELETED = "deleted"  # row kept (and files kept) until no backend can still read them


class JobState(enum.StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


class DeploymentState(enum.StrEnum):
    PENDING = "pending"
    STARTING = "starting"
    READY = "ready"  # up and past the served gate; takes the adapter's traffic once `active`
    STOPPING = "stopping"
    STOPPED = "stopped"
    FAILED = "failed"


class Tenant(IdMixin, CreatedMixin, Base):
    __tablename__ = "tenants"

    name: Mapped[str] = mapped_column(String(64), unique=True)
    display_name: Mapped[str | None] = mapped_column(String(200))
    # Most adapters of this tenant registered on one backend at once (None: no cap).
    max_adapters_per_backend: Mapped[int | None] = mapped_column(Integer)
    # Rates, concurrency and request caps (app.limits.state.Limits as a dict); None: unlimited.
    limits: Mapped[dict[str, int] | None] = mapped_column(JSON)


class ApiKey(IdMixin, CreatedMixin, Base):
    __tablename__ = "api_keys"

    tenant_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    name: Mapped[str | None] = mapped_column(String(100))
    # The first characters of the key, safe to show so people can tell keys apart.
    prefix: Mapped[str] = mapped_column(String(16))
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    last_used_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    limits: Mapped[dict[str, int] | None] = mapped_column(JSON)  # on top of the tenant's


class BaseModel(IdMixin, CreatedMixin, Base):
    __tablename__ = "base_models"

    name: Mapped[str] = mapped_column(String(200), unique=True)
    # What backends load: a local directory or a hub/object-store URI.
    path: Mapped[str] = mapped_column(Text)
    # Other names adapters' base_model_name_or_path may use for this model (e.g. a hub id).
    aliases: Mapped[list[str]] = mapped_column(JSON, default=list)
    architecture: Mapped[str | None] = mapped_column(String(100))
    hidden_size: Mapped[int] = mapped_column(Integer)
    num_layers: Mapped[int] = mapped_column(Integer)
    # Module short name -> [in_features, out_features]: what an adapter's lora_A/lora_B must fit.
    module_shapes: Mapped[dict[str, list[int]]] = mapped_column(JSON)
    # Whether tenants may call the base model itself (without an adapter) and see it in /v1/models.
    public: Mapped[bool] = mapped_column(Boolean, default=True, server_default=true())


class Backend(IdMixin, CreatedMixin, Base):
    __tablename__ = "backends"

    name: Mapped[str] = mapped_column(String(100), unique=True)
    url: Mapped[str] = mapped_column(String(500), unique=True)
    base_model_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("base_models.id", ondelete="RESTRICT"), index=True
    )
    # vLLM's --max-loras: adapters active in one batch.
    gpu_slots: Mapped[int] = mapped_column(Integer)
    max_lora_rank: Mapped[int] = mapped_column(Integer)
    # How many adapters may be registered on it at once (keep <= its --max-cpu-loras).
    capacity: Mapped[int] = mapped_column(Integer)
    # Requests it runs in one batch (vLLM's --max-num-seqs, or the operator's target concurrency); placement
    # sends no more than this many at once. None: unknown, no such limit.
    max_num_seqs: Mapped[int | None] = mapped_column(Integer)
    kind: Mapped[BackendKind] = mapped_column(_enum(BackendKind), default=BackendKind.SHARED)
    state: Mapped[BackendState] = mapped_column(_enum(BackendState), default=BackendState.ACTIVE)
    # The bearer token the backend requires (vLLM's --api-key), sent on every data and control call.
    # Write-only through the admin API. Stored as given: the gateway must present it.
    api_key: Mapped[str | None] = mapped_column(String(500))


class Adapter(IdMixin, CreatedMixin, Base):
    __tablename__ = "adapters"
    __table_args__ = (UniqueConstraint("tenant_id", "name", "version"),)

    tenant_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(128))
    version: Mapped[int] = mapped_column(Integer)
    base_model_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("base_models.id", ondelete="RESTRICT"), index=True
    )
    rank: Mapped[int] = mapped_column(Integer)
    alpha: Mapped[float] = mapped_column(Float)
    target_modules: Mapped[list[str]] = mapped_column(JSON)
    # Content digest of the adapter directory; names its folder in the store.
    sha256: Mapped[str] = mapped_column(String(64), index=True)
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    # Folder relative to the adapter store root.
    storage_path: Mapped[str] = mapped_column(String(300))
    state: Mapped[AdapterState] = mapped_column(_enum(AdapterState), default=AdapterState.READY)
    # An operator's pin: once loaded on a backend it is never evicted there.
    pinned: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    # Limits on the adapter's own traffic, on top of its tenant's and the caller's key's (app.limits);
    # a new version takes the last one's.
    limits: Mapped[dict[str, int] | None] = mapped_column(JSON)


class Job(IdMixin, CreatedMixin, Base):
    """A promotion (or demotion) run by a worker. The row is also the queue entry: a worker claims it by
    setting a lease it renews while it works, so a crashed worker's job is taken over once its lease
    expires and no two workers run one job at once (app/promotion/jobs.py)."""

    __tablename__ = "jobs"

    kind: Mapped[str] = mapped_column(String(32))
    adapter_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("adapters.id", ondelete="SET NULL"), index=True
    )
    state: Mapped[JobState] = mapped_column(_enum(JobState), default=JobState.QUEUED, index=True)
    params: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    result: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    error: Mapped[str | None] = mapped_column(Text)
    updated_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    step: Mapped[str | None] = mapped_column(String(32))  # the step running (or that failed)
    progress: Mapped[float] = mapped_column(Float, default=0.0, server_default="0")  # of the current step
    # One entry per step begun: name, state, started_at, seconds, figures (gates), reused (resumed).
    steps: Mapped[list[dict[str, Any]]] = mapped_column(JSON, default=list, server_default="[]")
    log_tail: Mapped[str | None] = mapped_column(Text)
    lease_owner: Mapped[str | None] = mapped_column(String(64))
    lease_until: Mapped[datetime | None] = mapped_column(UTCDateTime)
    attempts: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class Deployment(IdMixin, CreatedMixin, Base):
    """A dedicated vLLM serving one promoted adapter's merged model; an `active` READY one takes that
    adapter's traffic (the routing table, app/promotion/routes.py)."""

    __tablename__ = "deployments"

    adapter_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("adapters.id", ondelete="SET NULL"), index=True
    )
    backend_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("backends.id", ondelete="SET NULL"))
    job_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("jobs.id", ondelete="SET NULL"))
    launcher: Mapped[str] = mapped_column(String(32))  # "local" or "kubernetes"
    model_path: Mapped[str] = mapped_column(Text)
    state: Mapped[DeploymentState] = mapped_column(_enum(DeploymentState), default=DeploymentState.PENDING)
    # Whether the adapter's traffic goes here (set by the switch, cleared first on demotion).
    active: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    served_model_name: Mapped[str | None] = mapped_column(String(200))
    quantization: Mapped[str] = mapped_column(String(16), default="none", server_default="none")
    tensor_parallel_size: Mapped[int] = mapped_column(Integer, default=1, server_default="1")
    # What the launcher returned (URL and its handle: pid, or Kubernetes object names).
    handle: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    error: Mapped[str | None] = mapped_column(Text)
    updated_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class RoutingEpoch(Base):
    """One row: bumped by every change of the routing table (a switch or a demotion). Each gateway replica
    polls it (GATEWAY_ROUTES_POLL_S) and reloads the table when it moves, so a switch reaches every replica
    within about one poll, without a cache expiry."""

    __tablename__ = "routing_epoch"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    epoch: Mapped[int] = mapped_column(BigInteger, default=0)
    updated_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class GatewayReplica(Base):
    """What each gateway replica last saw of the routing epoch: the worker waits for every live replica to
    report the new epoch before it stops a deployment or calls a switch done."""

    __tablename__ = "gateway_replicas"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    epoch: Mapped[int] = mapped_column(BigInteger, default=0)
    seen_at: Mapped[datetime] = mapped_column(UTCDateTime)


class UsageHour(Base):
    """Requests and tokens per tenant, API key, model and hour, from the backends' usage reports; summed
    in each gateway process and added here in batches (app.limits.metering), never per request."""

    __tablename__ = "usage_hours"

    tenant_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), primary_key=True)
    hour: Mapped[datetime] = mapped_column(UTCDateTime, primary_key=True)
    api_key_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("api_keys.id", ondelete="CASCADE"), primary_key=True)
    model: Mapped[str] = mapped_column(String(200), primary_key=True)  # the tenant's adapter, or a base model
    requests: Mapped[int] = mapped_column(BigInteger, default=0)
    prompt_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    completion_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
