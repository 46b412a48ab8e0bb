"""Admin API shapes: XCreate for input, XRead for output."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Generic, TypeVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    HttpUrl,
    SecretStr,
    StrictBool,
    StringConstraints,
    model_validator,
)

from app.db.models import AdapterState, BackendKind, BackendState

# Names appear in URLs and as OpenAI `model` ids: keep them boring.
# Upper bounds on counts and sizes: far above any real fleet, and inside a 32-bit database integer
# (an unbounded one reached the database and failed there, a 500).
_MAX_COUNT = 100_000
_MAX_DIM = 1 << 20
Slug = Annotated[str, StringConstraints(pattern=r"^[a-z0-9](?:[a-z0-9_-]{0,62}[a-z0-9])?$")]
AdapterName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9](?:[A-Za-z0-9._-]{0,126}[A-Za-z0-9])?$")]
ModelName = Annotated[
    str, StringConstraints(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9][A-Za-z0-9._/:-]*$")
]


class _Read(BaseModel):
    model_config = ConfigDict(from_attributes=True)


_MAX_RATE = 1_000_000_000  # per minute: far above any real tenant, inside a 64-bit counter for years


class LimitsIn(BaseModel):
    """A tenant's (or one API key's) limits; an absent field is no limit. Rates count per minute across
    every gateway replica (a sliding window estimated from two clock minutes: README, "Tenant limits")."""

    model_config = ConfigDict(extra="forbid")
    requests_per_minute: int | None = Field(None, ge=1, le=_MAX_RATE)
    tokens_per_minute: int | None = Field(
        None, ge=1, le=_MAX_RATE, description="prompt + completion tokens; reserved at admission, settled at the end"
    )
    concurrent_requests: int | None = Field(None, ge=1, le=_MAX_COUNT)
    max_tokens: int | None = Field(
        None, ge=1, le=10_000_000, description="most completion tokens a request may ask for (and its default)"
    )
    max_n: int | None = Field(None, ge=1, le=128, description="most choices (`n`) a request may ask for")
    max_prompt_bytes: int | None = Field(
        None, ge=1, le=1 << 30, description="largest prompt (its text, UTF-8) a request may send"
    )


class TenantCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: Slug
    display_name: str | None = Field(None, max_length=200)
    max_adapters_per_backend: int | None = Field(
        None, ge=1, le=_MAX_COUNT, description="Cap on one backend's adapters"
    )
    limits: LimitsIn | None = None


class TenantUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    display_name: str | None = Field(None, max_length=200)
    max_adapters_per_backend: int | None = Field(None, ge=1, le=_MAX_COUNT)
    limits: LimitsIn | None = Field(None, description="replaces the tenant's limits; null removes them")


class TenantRead(_Read):
    id: uuid.UUID
    name: str
    display_name: str | None
    max_adapters_per_backend: int | None
    limits: LimitsIn | None = None
    created_at: datetime


class ApiKeyCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str | None = Field(None, max_length=100)


class ApiKeyUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str | None = Field(None, max_length=100)
    limits: LimitsIn | None = Field(
        None, description="this key's own limits, on top of the tenant's; null removes them"
    )


class ApiKeyRead(_Read):
    id: uuid.UUID
    name: str | None
    prefix: str
    limits: LimitsIn | None = None
    created_at: datetime
    last_used_at: datetime | None
    revoked_at: datetime | None


class ApiKeyCreated(ApiKeyRead):
    key: str = Field(description="The secret key. Shown only in this response; store it now.")


class BaseModelCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: ModelName
    path: str = Field(min_length=1, max_length=4096)
    aliases: list[ModelName] = Field(default_factory=list, max_length=32)
    architecture: str | None = Field(None, max_length=100)
    public: bool = Field(True, description="Tenants may call the base model itself")
    # Optional when `path` is a local folder with config.json: then they are read from it.
    hidden_size: int | None = Field(None, ge=1, le=_MAX_DIM)
    num_layers: int | None = Field(None, ge=1, le=_MAX_COUNT)
    module_shapes: (
        dict[
            str, Annotated[list[Annotated[int, Field(ge=1, le=_MAX_DIM)]], Field(min_length=2, max_length=2)]
        ]
        | None
    ) = None


class BaseModelRead(_Read):
    id: uuid.UUID
    name: str
    path: str
    aliases: list[str]
    architecture: str | None
    hidden_size: int
    num_layers: int
    module_shapes: dict[str, list[int]]
    public: bool
    created_at: datetime


_API_KEY = (
    "the bearer token the backend requires (vLLM's --api-key / VLLM_API_KEY), sent on every call to it; "
    "write-only: never shown again"
)
_MAX_NUM_SEQS = (
    "Requests it runs in one batch (vLLM --max-num-seqs, or a target concurrency); placement sends it no "
    "more at once. Unset: no such limit"
)


class BackendCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: Slug
    url: HttpUrl
    base_model: str = Field(description="Name of a registered base model")
    gpu_slots: int = Field(ge=1, le=1024, description="vLLM --max-loras")
    max_lora_rank: int = Field(16, ge=1, le=1024, description="vLLM --max-lora-rank")
    capacity: int | None = Field(
        None, ge=1, le=_MAX_COUNT, description="Adapters registered at once; default = gpu_slots"
    )
    max_num_seqs: int | None = Field(None, ge=1, le=_MAX_COUNT, description=_MAX_NUM_SEQS)
    kind: BackendKind = BackendKind.SHARED
    api_key: SecretStr | None = Field(None, min_length=1, max_length=500, description=_API_KEY)

    @model_validator(mode="after")
    def _capacity_covers_slots(self) -> BackendCreate:
        if self.capacity is not None and self.capacity < self.gpu_slots:
            raise ValueError("capacity must be >= gpu_slots (vLLM's --max-cpu-loras >= --max-loras)")
        return self


class BackendUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    state: BackendState | None = None
    gpu_slots: int | None = Field(None, ge=1, le=1024)
    max_lora_rank: int | None = Field(None, ge=1, le=1024)
    capacity: int | None = Field(None, ge=1, le=_MAX_COUNT)
    max_num_seqs: int | None = Field(
        None, ge=1, le=_MAX_COUNT, description=_MAX_NUM_SEQS + "; null clears it"
    )
    api_key: SecretStr | None = Field(
        None, max_length=500, description=_API_KEY + "; an empty string clears it"
    )


class BackendRead(_Read):
    id: uuid.UUID
    name: str
    url: str
    base_model: str
    gpu_slots: int
    max_lora_rank: int
    capacity: int
    max_num_seqs: int | None
    kind: BackendKind
    state: BackendState
    api_key_set: bool = Field(description="whether the gateway sends a bearer token to it (never shown)")
    created_at: datetime


class AdapterRead(_Read):
    id: uuid.UUID
    tenant: str
    name: str
    version: int
    base_model: str
    rank: int
    alpha: float
    target_modules: list[str]
    sha256: str
    size_bytes: int
    state: AdapterState
    pinned: bool
    limits: LimitsIn | None = None
    created_at: datetime


class AdapterUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    pinned: StrictBool | None = Field(None, description="Never evict it from a backend once loaded")
    state: AdapterState | None = Field(None, description="ready or disabled")
    limits: LimitsIn | None = Field(
        None,
        description="limits on this adapter's traffic, on top of its tenant's and the key's; null removes them "
        "(a new version takes the last one's)",
    )


T = TypeVar("T")


class Page(BaseModel, Generic[T]):
    object: str = "list"
    data: list[T]
