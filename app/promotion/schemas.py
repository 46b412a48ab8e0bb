"""Admin API shapes of promotions, jobs and deployments."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from app.db.models import DeploymentState, JobState
from app.promotion.ml import gguf  # standard library only: the type names, no llama.cpp
from app.promotion.ml.protocol import InputError

_MAX_TEXTS = 1024
_MAX_TEXT_CHARS = 16_384


class Gates(BaseModel):
    """Thresholds of the step gates; unset ones keep the defaults shown."""

    model_config = ConfigDict(extra="forbid")
    logits_tolerance: float = Field(1e-3, gt=0, le=1, description="merge: max abs fp32 logit difference")
    max_kl: float = Field(0.02, gt=0, le=10, description="quantize: mean KL(merged || quantized)")
    min_top1: float = Field(0.95, ge=0, le=1, description="quantize: top-1 agreement with the merged model")
    served_min_top1: float = Field(0.95, ge=0, le=1, description="verify: top-1 agreement with the LoRA path")
    gguf_max_logprob_diff: float = Field(
        0.15, gt=0, le=100, description="gguf: mean |log p| change of the actual next token against the merged model"
    )
    served_min_exact: float | None = Field(
        None, ge=0, le=1, description="verify: share of prompts whose greedy answer is the LoRA path's "
        "(default 0.75 for quantization none, 0 for awq)",
    )


class GgufOptions(BaseModel):
    """A GGUF file of the merged model for llama.cpp users, made beside the promotion (never served by it)."""

    model_config = ConfigDict(extra="forbid")
    quant_type: str = Field(
        "Q4_K_M", max_length=16, description="a llama.cpp type: F16, BF16, F32, Q8_0, Q6_K, Q5_K_M, Q4_K_M, Q4_0, ..."
    )
    pre_tokenizer: str | None = Field(
        None, pattern=r"^[a-z0-9][a-z0-9._-]{0,63}$",
        description="llama.cpp pre-tokenizer name for a BPE tokenizer the converter does not recognise (e.g. gpt-2)",
    )  # fmt: skip

    @field_validator("quant_type")
    @classmethod
    def _known_type(cls, value: str) -> str:
        try:
            return gguf.canonical_type(value)
        except InputError as exc:
            raise ValueError(str(exc)) from None

    @field_validator("pre_tokenizer")
    @classmethod
    def _known_pre_tokenizer(cls, value: str | None) -> str | None:
        if value is not None and value not in gguf.shipped_pre_tokenizers():
            raise ValueError(f"llama.cpp knows no pre-tokenizer {value!r} (e.g. gpt-2, llama-bpe, qwen2, tekken)")
        return value


class PromotionCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    quantization: Literal["awq", "none"] = "awq"
    calibration_texts: list[str] | None = Field(
        None, min_length=1, max_length=_MAX_TEXTS, description="AWQ calibration texts (default: the shipped set)"
    )
    gguf: GgufOptions | None = None
    launcher: Literal["local", "kubernetes"] = "local"
    resources: dict[str, int | float | str] = Field(
        default_factory=dict, description="launcher resources, e.g. gpus, cpu, memory (Kubernetes)"
    )
    tensor_parallel_size: int = Field(1, ge=1, le=64)
    max_model_len: int | None = Field(None, ge=16, le=1 << 22)
    serve_dtype: Literal["auto", "float32", "bfloat16", "float16"] | None = None
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field("auto", description="merged model's dtype")
    gates: Gates = Field(default_factory=Gates)

    @model_validator(mode="after")
    def _check(self) -> PromotionCreate:
        if self.calibration_texts is not None:
            if self.quantization != "awq":
                raise ValueError("calibration_texts only apply to quantization 'awq'")
            if any(not t.strip() or len(t) > _MAX_TEXT_CHARS for t in self.calibration_texts):
                raise ValueError(f"each calibration text must be non-empty and at most {_MAX_TEXT_CHARS} characters")
        if len(self.resources) > 16:
            raise ValueError("at most 16 resources")
        return self


class JobStep(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: str
    state: str
    started_at: str | None = None
    seconds: float | None = None
    figures: dict[str, Any] | None = None


class JobRead(BaseModel):
    model_config = ConfigDict(from_attributes=True)
    id: uuid.UUID
    kind: str
    adapter_id: uuid.UUID | None
    state: JobState
    step: str | None
    progress: float
    steps: list[JobStep]
    params: dict[str, Any]
    result: dict[str, Any] | None
    error: str | None
    log_tail: str | None
    attempts: int
    cancel_requested: bool
    created_at: datetime
    updated_at: datetime | None
    finished_at: datetime | None


class DeploymentRead(BaseModel):
    id: uuid.UUID
    adapter_id: uuid.UUID | None
    job_id: uuid.UUID | None
    launcher: str
    state: DeploymentState
    active: bool
    quantization: str
    tensor_parallel_size: int
    model_path: str
    error: str | None
    created_at: datetime
    updated_at: datetime | None


class ArtifactRead(BaseModel):
    name: str
    kind: str
    size_bytes: int
    sha256: str
    download: str
