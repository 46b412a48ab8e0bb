"""A minimal, fast, vLLM-shaped OpenAI server: the upstream that measures the gateway's own cost.

It decides what "an upstream that costs nothing" answers: the routes the gateway calls on a vLLM
backend (chat/completions and completions, plain JSON or SSE; the runtime LoRA API; /v1/models;
/health), with vLLM's status codes, error envelope and stream framing, and nothing else. Responses
are canned text of `max_tokens` tokens (default 16), produced at once, so that the load generator
and this server together still outrun one gateway core many times over.

It is raw asyncio + httptools (uvloop when installed) rather than a framework, because a framework
costs about as much per request as the proxy being measured.

    python bench/fake_upstream.py --port 8001 --model tiny-llama [--token-delay-ms 0]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

import httptools

_REASONS = {200: b"OK", 400: b"Bad Request", 404: b"Not Found", 405: b"Method Not Allowed"}
_DEFAULT_MAX_TOKENS = 16
_WORDS = (" the", " gateway", " routes", " each", " request", " to", " a", " backend")
_ids = itertools.count(1)


@dataclass
class Response:
    """What a handler answers: a whole body, or SSE events written one by one (chunked)."""

    status: int = 200
    body: bytes = b""
    content_type: bytes = b"application/json"
    events: list[bytes] = field(default_factory=list)
    stream: bool = False


def _json(status: int, payload: Any) -> Response:
    return Response(status=status, body=json.dumps(payload, separators=(",", ":")).encode())


def _error(status: int, message: str, err_type: str, param: str | None = None) -> Response:
    # vLLM's envelope: code is the HTTP status as an int.
    return _json(status, {"error": {"message": message, "type": err_type, "param": param, "code": status}})


class FakeVllm:
    """The state of one fake backend: its base model and the adapters loaded at runtime."""

    def __init__(self, model: str, token_delay_s: float = 0.0, keep_alive_s: float = 5.0) -> None:
        self.model = model
        self.token_delay_s = token_delay_s
        self.keep_alive_s = keep_alive_s
        self.adapters: dict[str, str] = {}  # lora_name -> lora_path
        self.created = int(time.time())
        self.routes: dict[tuple[bytes, bytes], Callable[[bytes], Response]] = {
            (b"POST", b"/v1/chat/completions"): self.chat_completions,
            (b"POST", b"/v1/completions"): self.completions,
            (b"POST", b"/v1/load_lora_adapter"): self.load_lora_adapter,
            (b"POST", b"/v1/unload_lora_adapter"): self.unload_lora_adapter,
            (b"GET", b"/v1/models"): self.list_models,
            (b"GET", b"/health"): lambda _body: Response(body=b"", content_type=b"text/plain"),
        }

    def handle(self, method: bytes, path: bytes, body: bytes) -> Response:
        route = self.routes.get((method, path.split(b"?", 1)[0]))
        if route is None:
            if any(p == path for _m, p in self.routes):
                return _json(405, {"detail": "Method Not Allowed"})
            return _json(404, {"detail": "Not Found"})
        return route(body)

    # --- runtime LoRA API ------------------------------------------------------------------------------

    def load_lora_adapter(self, body: bytes) -> Response:
        request = _parse(body)
        if request is None:
            return _error(400, "request body is not a JSON object", "BadRequestError")
        name, path = request.get("lora_name"), request.get("lora_path")
        if not isinstance(name, str) or not isinstance(path, str) or not name or not path:
            return _error(400, "Both 'lora_name' and 'lora_path' must be provided.", "InvalidUserInput")
        if name in self.adapters and not request.get("load_inplace"):
            return _error(400, f"The lora adapter '{name}' has already been loaded.", "InvalidUserInput")
        # vLLM reads the files at load time: a path it cannot read is a 404 there too.
        if not os.path.isfile(os.path.join(path, "adapter_config.json")):
            return _error(
                404, f"Loading lora {name} failed: No adapter found for {path}", "NotFoundError", "lora_path"
            )
        self.adapters[name] = path
        return Response(
            body=f"Success: LoRA adapter '{name}' added successfully.".encode(), content_type=b"text/plain"
        )

    def unload_lora_adapter(self, body: bytes) -> Response:
        request = _parse(body)
        name = request.get("lora_name") if request else None
        if not isinstance(name, str) or name not in self.adapters:
            return _error(404, f"The lora adapter '{name}' cannot be found.", "NotFoundError")
        del self.adapters[name]
        return Response(
            body=f"Success: LoRA adapter '{name}' removed successfully.".encode(), content_type=b"text/plain"
        )

    def list_models(self, _body: bytes) -> Response:
        base = self._model_card(self.model, root=self.model, parent=None)
        loras = [self._model_card(name, root=path, parent=self.model) for name, path in self.adapters.items()]
        return _json(200, {"object": "list", "data": [base, *loras]})

    def _model_card(self, model_id: str, *, root: str, parent: str | None) -> dict[str, Any]:
        return {
            "id": model_id,
            "object": "model",
            "created": self.created,
            "owned_by": "vllm",
            "root": root,
            "parent": parent,
            "max_model_len": 2048,
            "permission": [],
        }

    # --- generation ------------------------------------------------------------------------------------

    def chat_completions(self, body: bytes) -> Response:
        return self._generate(body, chat=True)

    def completions(self, body: bytes) -> Response:
        return self._generate(body, chat=False)

    def _generate(self, body: bytes, *, chat: bool) -> Response:
        request = _parse(body)
        if request is None:
            return _error(400, "request body is not a JSON object", "BadRequestError")
        model = request.get("model")
        if model != self.model and model not in self.adapters:
            return _error(404, f"The model `{model}` does not exist.", "NotFoundError", "model")
        if chat and not isinstance(request.get("messages"), list):
            return _error(400, "'messages' is required", "BadRequestError", "messages")
        if not chat and "prompt" not in request:
            return _error(400, "'prompt' is required", "BadRequestError", "prompt")
        max_tokens = request.get("max_completion_tokens") or request.get("max_tokens") or _DEFAULT_MAX_TOKENS
        if not isinstance(max_tokens, int) or max_tokens < 1:
            return _error(400, "max_tokens must be at least 1", "BadRequestError", "max_tokens")
        tokens = [_WORDS[i % len(_WORDS)] for i in range(max_tokens)]
        prompt_tokens = _count_prompt_tokens(request, chat=chat)
        usage = {
            "prompt_tokens": prompt_tokens,
            "total_tokens": prompt_tokens + max_tokens,
            "completion_tokens": max_tokens,
            "prompt_tokens_details": None,
        }
        created = int(time.time())
        ident = f"{'chatcmpl' if chat else 'cmpl'}-{next(_ids):032x}"
        if request.get("stream"):
            options = request.get("stream_options") or {}
            include_usage = isinstance(options, dict) and bool(options.get("include_usage"))
            return self._stream(ident, created, model, tokens, usage if include_usage else None, chat=chat)
        text = "".join(tokens)
        if chat:
            choice: dict[str, Any] = {
                "index": 0,
                "message": {"role": "assistant", "content": text, "tool_calls": []},
                "logprobs": None,
                "finish_reason": "length",
                "stop_reason": None,
            }
        else:
            choice = {
                "index": 0,
                "text": text,
                "logprobs": None,
                "finish_reason": "length",
                "stop_reason": None,
                "prompt_logprobs": None,
            }
        return _json(
            200,
            {
                "id": ident,
                "object": "chat.completion" if chat else "text_completion",
                "created": created,
                "model": model,
                "choices": [choice],
                "usage": usage,
                "prompt_logprobs": None,
            },
        )

    def _stream(
        self,
        ident: str,
        created: int,
        model: str,
        tokens: list[str],
        usage: dict[str, Any] | None,
        *,
        chat: bool,
    ) -> Response:
        obj = "chat.completion.chunk" if chat else "text_completion"

        def chunk(choices: list[dict[str, Any]], **extra: Any) -> bytes:
            payload = {"id": ident, "object": obj, "created": created, "model": model, "choices": choices}
            return b"data: " + json.dumps({**payload, **extra}, separators=(",", ":")).encode() + b"\n\n"

        def choice(text: str, finish: str | None, role: bool = False) -> dict[str, Any]:
            if chat:
                delta = {"role": "assistant", "content": text} if role else {"content": text}
                return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish, "stop_reason": None}

        # vLLM's order: (chat) a role chunk, one chunk per token, the last one carrying finish_reason,
        # then the usage chunk with no choices when stream_options.include_usage asked for it.
        events = [chunk([choice("", None, role=True)])] if chat else []
        last = len(tokens) - 1
        events += [chunk([choice(t, "length" if i == last else None)]) for i, t in enumerate(tokens)]
        if usage is not None:
            events.append(chunk([], usage=usage))
        events.append(b"data: [DONE]\n\n")
        return Response(content_type=b"text/event-stream; charset=utf-8", events=events, stream=True)


def _parse(body: bytes) -> dict[str, Any] | None:
    try:
        value = json.loads(body)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def _count_prompt_tokens(request: dict[str, Any], *, chat: bool) -> int:
    # A word count is enough: the figures only need usage to be present and plausible.
    if chat:
        messages = request.get("messages") or []
        text = " ".join(str(m.get("content", "")) for m in messages if isinstance(m, dict))
    else:
        text = str(request.get("prompt", ""))
    return max(1, len(text.split()))


def _head(status: int, content_type: bytes, length: int | None, keep_alive: bool) -> bytes:
    framing = b"transfer-encoding: chunked" if length is None else b"content-length: %d" % length
    return b"".join(
        (
            b"HTTP/1.1 %d %s\r\n" % (status, _REASONS.get(status, b"Unknown")),
            b"server: fake-vllm\r\ncontent-type: ",
            content_type,
            b"\r\n",
            framing,
            b"\r\n",
            b"" if keep_alive else b"connection: close\r\n",
            b"\r\n",
        )
    )


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


class HttpProtocol(asyncio.Protocol):
    """One client connection: httptools parses, FakeVllm answers, responses go out in request order."""

    def __init__(self, app: FakeVllm) -> None:
        self.app = app
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.url = b""
        self.body: list[bytes] = []
        # A delayed stream is written by a task; requests behind it on the connection (pipelining)
        # wait in this queue so that responses keep their order.
        self.pending: list[tuple[bytes, bytes, bytes, bool]] = []
        self.streaming = False
        self.idle_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        self._idle()

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self._busy()

    def _idle(self) -> None:
        # Like vLLM (uvicorn, VLLM_HTTP_TIMEOUT_KEEP_ALIVE=5 s), close a connection that stays idle:
        # a client that reuses pooled connections must cope with the server closing them.
        if self.app.keep_alive_s > 0 and self.transport is not None:
            self.idle_timer = asyncio.get_running_loop().call_later(self.app.keep_alive_s, self._close_idle)

    def _busy(self) -> None:
        if self.idle_timer is not None:
            self.idle_timer.cancel()
            self.idle_timer = None

    def _close_idle(self) -> None:
        self.idle_timer = None
        if self.transport is not None and not self.streaming:
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        self._busy()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            if self.transport is not None:
                self.transport.write(_head(400, b"text/plain", 0, keep_alive=False))
                self.transport.close()

    # httptools callbacks
    def on_message_begin(self) -> None:
        self.url, self.body = b"", []

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        request = (self.parser.get_method(), self.url, b"".join(self.body), self.parser.should_keep_alive())
        if self.streaming:
            self.pending.append(request)
        else:
            self._respond(*request)

    def _respond(self, method: bytes, url: bytes, body: bytes, keep_alive: bool) -> None:
        transport = self.transport
        if transport is None:
            return
        response = self.app.handle(method, url, body)
        if not response.stream:
            # One write, one packet: the head and body go out together.
            transport.write(
                _head(response.status, response.content_type, len(response.body), keep_alive) + response.body
            )
            if not keep_alive:
                transport.close()
            else:
                self._idle()
            return
        head = _head(response.status, response.content_type, None, keep_alive)
        if self.app.token_delay_s <= 0:
            transport.write(head + b"".join(_chunk(e) for e in response.events) + b"0\r\n\r\n")
            if not keep_alive:
                transport.close()
            else:
                self._idle()
            return
        transport.write(head)
        self.streaming = True
        asyncio.get_running_loop().create_task(self._paced(response.events, keep_alive))

    async def _paced(self, events: list[bytes], keep_alive: bool) -> None:
        for i, event in enumerate(events):
            if i:
                await asyncio.sleep(self.app.token_delay_s)
            if self.transport is None:
                return
            self.transport.write(_chunk(event))
        if self.transport is None:
            return
        self.transport.write(b"0\r\n\r\n")
        if not keep_alive:
            self.transport.close()
            return
        self.streaming = False
        while self.pending and not self.streaming:
            self._respond(*self.pending.pop(0))
        if not self.streaming:
            self._idle()


async def serve(host: str, port: int, app: FakeVllm) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: HttpProtocol(app), host, port, backlog=4096, reuse_address=True)
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    print(f"fake vLLM upstream serving {app.model!r} on http://{host}:{port}", flush=True)  # noqa: T201
    async with server:
        await stop.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument("--model", default="tiny-llama", help="the base model's served name")
    parser.add_argument(
        "--token-delay-ms",
        type=float,
        default=0.0,
        help="pause between streamed chunks (default 0: the whole stream is written at once)",
    )
    parser.add_argument(
        "--keep-alive-timeout",
        type=float,
        default=5.0,
        help="close connections idle this many seconds, as vLLM does (default 5; 0: never)",
    )
    args = parser.parse_args(argv)
    app = FakeVllm(args.model, token_delay_s=args.token_delay_ms / 1000, keep_alive_s=args.keep_alive_timeout)
    try:
        import uvloop
    except ImportError:
        asyncio.run(serve(args.host, args.port, app))
    else:
        uvloop.run(serve(args.host, args.port, app))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
