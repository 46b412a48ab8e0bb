"""What a tenant may send on the two generation routes: the OpenAI fields of each endpoint plus the
vLLM extras chosen on purpose, nothing else. vLLM takes many more fields, and some of them reach
inside it (`kv_transfer_params` and `request_id` name other requests' state, `priority` jumps other
tenants' queue, `vllm_xargs` and `logits_processors` hand arguments to server-side code,
`chat_template` is a Jinja program, `prompt_embeds` feeds tensors straight into the model): a field
not listed here is a 400 that names it, never forwarded.

The gateway also sets `cache_salt` on every request, overwriting the client's: vLLM's prefix cache is
then shared within a tenant only, so no tenant can time another's prompts through cache hits."""

from __future__ import annotations

import hashlib
import uuid
from typing import Any

from app.errors import InvalidRequest

# OpenAI's own fields, on both endpoints.
_OPENAI_COMMON = frozenset({
    "model", "frequency_penalty", "logit_bias", "logprobs", "max_tokens", "n", "presence_penalty",
    "seed", "stop", "stream", "stream_options", "temperature", "top_p", "user",
})  # fmt: skip
_OPENAI_CHAT = frozenset({
    "messages", "max_completion_tokens", "top_logprobs", "response_format", "tools", "tool_choice",
    "parallel_tool_calls", "functions", "function_call", "metadata", "store", "reasoning_effort",
    "service_tier", "prediction", "modalities", "safety_identifier", "prompt_cache_key", "verbosity",
})  # fmt: skip
_OPENAI_COMPLETIONS = frozenset({"prompt", "best_of", "echo", "suffix"})

# vLLM's sampling and structured-output extras: they shape this request's own tokens only.
_VLLM_EXTRAS = frozenset({
    "top_k", "min_p", "min_tokens", "ignore_eos", "repetition_penalty", "length_penalty",
    "stop_token_ids", "bad_words", "allowed_token_ids", "skip_special_tokens",
    "spaces_between_special_tokens", "include_stop_str_in_output", "truncate_prompt_tokens",
    "prompt_logprobs", "return_tokens_as_token_ids", "structured_outputs", "guided_json",
    "guided_regex", "guided_choice", "guided_grammar", "guided_whitespace_pattern",
    "cache_salt",  # taken, and always overwritten with the tenant's own (below)
})  # fmt: skip
_VLLM_CHAT = frozenset({"echo", "add_generation_prompt", "continue_final_message", "chat_template_kwargs"})
_VLLM_COMPLETIONS = frozenset({"add_special_tokens", "response_format"})

FIELDS = {
    "/v1/chat/completions": _OPENAI_COMMON | _OPENAI_CHAT | _VLLM_EXTRAS | _VLLM_CHAT,
    "/v1/completions": _OPENAI_COMMON | _OPENAI_COMPLETIONS | _VLLM_EXTRAS | _VLLM_COMPLETIONS,
}
_STREAM_OPTIONS = frozenset({"include_usage", "continuous_usage_stats"})
# Message content parts a text model takes. Images, audio, video and files reach vLLM's media loaders
# (which fetch URLs): refused until a base model opts in to media.
_TEXT_PARTS = frozenset({"text", "refusal"})


def salt(tenant_id: uuid.UUID) -> str:
    """One prefix-cache partition per tenant, the same on every gateway replica."""
    return hashlib.sha256(b"lgw-cache-salt:" + tenant_id.bytes).hexdigest()[:32]


def check(route: str, body: dict[str, Any], tenant_id: uuid.UUID) -> bool:
    """Refuses what may not be forwarded, sets the tenant's cache salt; returns whether it streams."""
    allowed = FIELDS[route]
    for name in body:
        if name not in allowed:
            raise InvalidRequest(f"unsupported parameter: '{name}'", param=name)
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise InvalidRequest("'stream' must be a boolean", param="stream")
    opts = body.get("stream_options")
    if opts is not None:
        if not isinstance(opts, dict):
            raise InvalidRequest("'stream_options' must be an object", param="stream_options")
        for name, value in opts.items():
            if name not in _STREAM_OPTIONS:
                raise InvalidRequest(
                    f"unsupported parameter: 'stream_options.{name}'", param=f"stream_options.{name}"
                )
            if not isinstance(value, bool):
                raise InvalidRequest(
                    f"'stream_options.{name}' must be a boolean", param=f"stream_options.{name}"
                )
    if "messages" in body:
        _check_messages(body["messages"])
    body["cache_salt"] = salt(tenant_id)
    return stream


def _check_messages(messages: Any) -> None:
    if not isinstance(messages, list):
        raise InvalidRequest("'messages' must be an array", param="messages")
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise InvalidRequest(f"'messages[{i}]' must be an object", param=f"messages[{i}]")
        content = message.get("content")
        if not isinstance(content, list):
            continue  # a string (or null, with tool calls): vLLM validates the rest
        for j, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind not in _TEXT_PARTS:
                raise InvalidRequest(
                    f"content part type {kind!r} is not supported: this model takes text only",
                    param=f"messages[{i}].content[{j}].type",
                )
