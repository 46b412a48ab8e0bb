"""Read-only views of registry rows that the hot path keeps in memory (never ORM objects)."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field

from app.limits.state import Limits


@dataclass(frozen=True, slots=True)
class TenantView:
    """A tenant as one of its API keys sees it (the cache holds one per key)."""

    id: uuid.UUID
    name: str
    max_adapters_per_backend: int | None = None
    key_id: uuid.UUID | None = None  # the key the request came with
    limits: Limits | None = None  # the tenant's
    key_limits: Limits | None = None  # the key's own, on top of the tenant's


@dataclass(frozen=True, slots=True)
class BaseModelView:
    id: uuid.UUID
    name: str
    aliases: tuple[str, ...]
    public: bool


@dataclass(frozen=True, slots=True)
class AdapterView:
    id: uuid.UUID
    tenant_id: uuid.UUID
    name: str
    version: int
    base_model: BaseModelView
    sha256: str
    storage_path: str
    created_at: float
    pinned: bool = False
    limits: Limits | None = None  # on its own traffic, on top of the tenant's and the key's

    @property
    def served_name(self) -> str:
        """The opaque name the backend knows it by: from id and content, never the tenant's text."""
        return f"lgw-{self.id.hex}-{self.sha256[:12]}"


@dataclass(frozen=True, slots=True)
class BackendView:
    id: uuid.UUID
    name: str
    url: str
    base_model_id: uuid.UUID
    gpu_slots: int
    capacity: int
    max_num_seqs: int | None = None
    api_key: str | None = field(default=None, repr=False)  # its bearer token; never in a log line
