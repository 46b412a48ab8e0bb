"""The data path: authenticate, resolve the adapter, place it, forward to vLLM, pass the answer back.

Kept lean on purpose (DESIGN.md, "Proxy overhead facts"): no FastAPI body models, one JSON parse of the
request, byte-level rewriting of responses, no database access once the registry cache is warm.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Any, TypeVar

import aiohttp
import orjson
from redis.exceptions import RedisError
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from app import security
from app.api.openai import surface
from app.backends.vllm import (
    BackendError,
    BackendUnavailable,
    UpstreamError,
    is_unknown_model,
    parse_error,
)
from app.errors import (
    GatewayError,
    InvalidApiKey,
    InvalidRequest,
    PayloadTooLarge,
    ServiceUnavailable,
    error_body,
)
from app.limits.gate import LimitGate, Ticket
from app.limits.metering import UsageMeter
from app.metrics import Metrics, RequestFacts
from app.outages import StateUnavailable
from app.promotion.routes import RoutingTable
from app.registry.cache import RegistryCache
from app.registry.snapshots import BackendView, TenantView
from app.routing.resolve import Target, resolve
from app.routing.router import Lease, Router
from app.traffic import TrafficMeter

log = logging.getLogger(__name__)
T = TypeVar("T")

IGNORED_HEADER = "X-LoRA-Gateway-Warning"
# A client leaving is noticed once its request has run this long (see Disconnect).
WATCH_AFTER_S = 0.05
IGNORED_TEXT = "lora_request.lora_path was ignored: adapters are resolved by name from the registry"
_JSON = "application/json"


class DataPath:
    """Everything a /v1 request needs, built once in the app's lifespan."""

    def __init__(
        self,
        *,
        cache: RegistryCache,
        router: Router,
        max_request_bytes: int,
        routes: RoutingTable | None = None,
        traffic: TrafficMeter | None = None,
        metrics: Metrics | None = None,
        request_log: Callable[[RequestFacts, int, float], None] | None = None,
        limits: LimitGate | None = None,
        meter: UsageMeter | None = None,
    ) -> None:
        self.limits = limits
        self.meter = meter
        self.cache = cache
        self.metrics = metrics if metrics is not None else Metrics()
        self.request_log = request_log
        self.traffic = traffic
        self.routes = routes
        self.router = router
        self.client = router.client
        self.max_request_bytes = max_request_bytes
        self.store_outage = router.store_outage

    async def authenticate(self, request: Request) -> TenantView:
        token = security.bearer_token(request.headers.get("authorization"))
        if token is None:
            raise InvalidApiKey("missing API key: send Authorization: Bearer <key>")
        if not security.looks_like_api_key(token):
            raise InvalidApiKey("incorrect or revoked API key")  # the same answer as an unknown key
        tenant = await self.cache.tenant_for_key(security.hash_api_key(token))
        if tenant is None:
            raise InvalidApiKey("incorrect or revoked API key")
        return tenant

    async def read_json(self, request: Request) -> dict[str, Any]:
        length = request.headers.get("content-length")
        if (
            length is not None
            and length.isascii()
            and length.isdigit()
            and int(length) > self.max_request_bytes
        ):
            raise PayloadTooLarge(f"request body exceeds {self.max_request_bytes} bytes")
        chunks, size = [], 0
        try:
            async for chunk in request.stream():
                size += len(chunk)
                if size > self.max_request_bytes:
                    raise PayloadTooLarge(f"request body exceeds {self.max_request_bytes} bytes")
                chunks.append(chunk)
        except ClientDisconnect as exc:
            raise ClientGone() from exc
        try:
            body = orjson.loads(b"".join(chunks))
        except orjson.JSONDecodeError as exc:
            raise InvalidRequest(f"request body is not valid JSON: {exc}") from exc
        if not isinstance(body, dict):
            raise InvalidRequest("request body must be a JSON object")
        return body

    async def handle(self, request: Request, route: str, facts: RequestFacts) -> Response:
        tenant = await self.authenticate(request)
        facts.tenant = tenant.name
        body = await self.read_json(request)
        lora_request = body.pop("lora_request", None)  # the seed's way of naming an adapter
        # Only the allowlisted fields go on; the tenant's cache salt is set (app/api/openai/surface.py).
        stream = surface.check(route, body, tenant.id)
        target = await resolve(self.cache, tenant, body.get("model"), lora_request)
        facts.model = target.public_name
        # A promoted adapter goes to its dedicated deployment (decided once, here, for the whole request),
        # unless that deployment is failing its health checks: then the LoRA path serves it.
        named = target.adapter  # its limits count whether its LoRA or its dedicated deployment serves it
        adapter_id = named.id if named is not None else None
        promoted = self.routes.get(adapter_id) if self.routes is not None and adapter_id is not None else None
        if promoted is not None and str(promoted.backend.id) not in self.router.unhealthy:
            target = replace(target, served_name=promoted.served_name, adapter=None)
        else:
            promoted = None
        client_wants_usage = client_wants_continuous = False
        if stream:
            opts = body.get("stream_options")
            client_wants_usage = bool(opts and opts.get("include_usage"))
            client_wants_continuous = bool(opts and opts.get("continuous_usage_stats"))
        # The tenant's caps (400 beyond them) and its reservation under its rates (429 beyond them).
        ticket = self.limits.prepare(tenant, body, named) if self.limits is not None else None
        admission: asyncio.Future[None] | None = None
        try:
            if ticket is not None:
                # Under way while placement starts: the hot path's touch rides beside it, and the router
                # loads and evicts nothing for a request until it is admitted.
                admission = self.limits.admit_soon(ticket)  # type: ignore[union-attr]
            return await self._forward(
                request, route, body, stream, tenant, target, adapter_id, promoted, facts, ticket,
                admission, client_wants_usage, client_wants_continuous,
            )  # fmt: skip
        except BaseException:
            if admission is not None:
                if not admission.done():
                    admission.cancel()  # the store gives back what it took for a caller that left
                elif not admission.cancelled():
                    admission.exception()  # retrieved: a refusal nobody awaited is no error to log
            if ticket is not None:
                self.limits.settle(ticket, 0)  # type: ignore[union-attr]  # nothing was served: all back
            raise

    async def _forward(
        self,
        request: Request,
        route: str,
        body: dict[str, Any],
        stream: bool,
        tenant: TenantView,
        target: Target,
        adapter_id: uuid.UUID | None,
        promoted: Any,
        facts: RequestFacts,
        ticket: Ticket | None,
        admission: asyncio.Future[None] | None,
        client_wants_usage: bool,
        client_wants_continuous: bool,
    ) -> Response:
        strip_usage = False
        if stream:
            # Usage is always asked for upstream, per chunk too: a stream cut short (the client left, the
            # backend died) is charged and metered what the backend had reported by its last chunk. What
            # the client did not ask for is taken out again (the final chunk dropped, per-chunk usage
            # removed from the chunks).
            body["stream_options"] = {
                **(body.get("stream_options") or {}), "include_usage": True, "continuous_usage_stats": True,
            }  # fmt: skip
            strip_usage = not client_wants_continuous
        body["model"] = target.served_name
        payload = orjson.dumps(body)
        headers = {IGNORED_HEADER: IGNORED_TEXT} if target.ignored_lora_path else {}

        backends = (
            (promoted.backend,)
            if promoted is not None
            else await self.cache.shared_backends(target.base_model.id)
        )
        if not backends:
            if admission is not None:
                await admission  # over its limits, a request learns that first
                facts.limit_headers = ticket.headers if ticket is not None else None
            raise ServiceUnavailable(
                f"no backend serves base model '{target.base_model.name}' right now",
                headers={"Retry-After": "5"},
            )
        watch = Disconnect(request.receive)  # the body is read: from here on, receive() only reports leaving
        started = time.monotonic()
        try:
            upstream, lease = await watch.run(
                self._send(backends, tenant, target, route, payload, facts, admission)
            )
        except (RedisError, TimeoutError) as exc:
            watch.close()
            # The residency store (Redis) is unreachable or slow: nothing was forwarded; retryable.
            # Fail closed, at once; one log line per outage (the process's OUTAGES.redis), not per request.
            self.store_outage.failed(exc)
            raise StateUnavailable() from exc
        except BaseException:
            watch.close()
            raise
        finally:
            if ticket is not None and ticket.admitted:
                facts.limit_headers = ticket.headers  # an error after admission still tells them
        if ticket is not None:
            headers.update(ticket.headers)
        done = _Releaser(self.router, lease, self.traffic, adapter_id, promoted is not None, started, facts)
        done.settle = self._settler(tenant, facts, ticket)
        rewrite = _Rewriter(target)
        content_type = upstream.headers.get("Content-Type", _JSON)
        if stream and content_type.startswith("text/event-stream"):
            return SseProxy(upstream, rewrite, target, client_wants_usage, headers, done, watch, strip_usage)
        return BufferedProxy(upstream, rewrite, target, content_type, headers, done, watch)

    def _settler(
        self, tenant: TenantView, facts: RequestFacts, ticket: Ticket | None
    ) -> Callable[[], None] | None:
        """What the response's end does with its usage: the reservation settled, the usage metered."""
        limits, meter = self.limits, self.meter
        if meter is None and ticket is None:
            return None

        def settle() -> None:
            if ticket is not None and limits is not None:
                limits.settle(ticket, facts.prompt_tokens + facts.completion_tokens)
            if meter is not None:
                meter.record(tenant.id, tenant.key_id, facts.model, facts.prompt_tokens, facts.completion_tokens)

        return settle

    async def _send(
        self,
        backends: tuple[BackendView, ...],
        tenant: TenantView,
        target: Target,
        route: str,
        payload: bytes,
        facts: RequestFacts,
        admission: asyncio.Future[None] | None = None,
    ) -> tuple[aiohttp.ClientResponse, Lease]:
        pinned = await self.cache.pinned.get(target.base_model.id) if target.adapter else frozenset()
        avoid: frozenset[str] = frozenset()
        # One placement wait for the request, however many attempts it takes.
        deadline = time.monotonic() + self.router.wait_timeout_s
        # At most one retry of each kind, in either order (so at most three attempts): on another
        # backend after one failed before answering, and after a backend forgot the adapter.
        elsewhere = replaced = False
        while True:
            waited = time.monotonic()
            try:
                lease = await self.router.route(
                    backends,
                    target.adapter,
                    pinned=pinned,
                    tenant_cap=tenant.max_adapters_per_backend,
                    avoid=avoid,
                    deadline=deadline,
                    admission=admission,
                )
                admission = None  # granted: a retry does not wait for it again
            except BaseException as exc:
                self._placed(facts, waited, type(exc).__name__)
                raise
            self._placed(facts, waited, "placed")
            facts.backend = lease.backend.name
            facts.upstream_started = time.monotonic()
            try:
                resp = await self.client.post(
                    lease.backend.url + route,
                    payload,
                    backend=lease.backend.name,
                    token=lease.backend.api_key,
                )
                if resp.status == 200:
                    if self.router.unhealthy:
                        self.router.answered(lease.backend)
                    return resp, lease
                body = await resp.read()
                resp.release()
            except BackendUnavailable as exc:
                await asyncio.shield(self.router.release(lease))
                if not exc.never_reached:
                    raise
                # It refused the connection (down, restarting): nothing was processed, so send the
                # request elsewhere once and keep traffic off that backend until it answers again.
                await self.router.mark_down(lease.backend)
                if elsewhere or len(backends) == 1:
                    raise
                elsewhere = True
                continue
            except BaseException:
                await asyncio.shield(self.router.release(lease))
                raise
            err = parse_error(resp.status, body)
            if err.status >= 500 and not elsewhere and len(backends) > 1:
                # The engine failed (dying, crashed) before answering anything: once, on another backend.
                log.warning("backend %s answered %s; retrying elsewhere", lease.backend.name, err.status)
                await self.router.release(lease)
                self.router.suspect(lease.backend)
                avoid = frozenset({str(lease.backend.id)})
                elsewhere = True
                continue
            if target.adapter is not None and is_unknown_model(err):
                # The backend lost the adapter (restart, manual unload): place it again and retry once;
                # nothing has been sent to the client yet. The adapter exists (it was resolved), so a
                # backend that forgets it again is the fleet's fault, never a 404 for the tenant.
                log.info("backend %s forgot %s; placing it again", lease.backend.name, target.served_name)
                await self.router.lost(lease)
                if not replaced:
                    replaced = True
                    continue
                raise ServiceUnavailable(
                    f"adapter '{target.public_name}' could not be kept loaded on a backend; retry shortly",
                    headers={"Retry-After": "1"},
                )
            await self.router.release(lease)
            raise _client_error(err, target)

    def _placed(self, facts: RequestFacts, since: float, outcome: str) -> None:
        seconds = time.monotonic() - since
        facts.placement_s += seconds
        self.metrics.placed(seconds, outcome)


class _Releaser:
    """Gives the request's lease back exactly once, when the response is over (however it ends), and
    adds the request to the traffic the promotion advice reads (in-process sums: no I/O here)."""

    __slots__ = ("adapter", "choices", "dedicated", "facts", "lease", "router", "settle", "started", "traffic")

    def __init__(
        self,
        router: Router,
        lease: Lease,
        traffic: TrafficMeter | None,
        adapter: uuid.UUID | None,
        dedicated: bool,
        started: float,
        facts: RequestFacts,
    ) -> None:
        self.router, self.lease, self.traffic = router, lease, traffic
        self.adapter, self.dedicated, self.started = adapter, dedicated, started
        self.facts = facts
        self.settle: Callable[[], None] | None = None  # the limits' settlement and the metering
        self.choices: dict[int, int] | None = None  # per-chunk usage: each choice's completion so far

    def used(self, usage: dict[str, Any] | None) -> None:
        """The backend's usage report for this request (a stream's last one counts)."""
        if usage:
            prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
            self.facts.prompt_tokens = prompt if isinstance(prompt, int) and prompt > 0 else 0
            self.facts.completion_tokens = completion if isinstance(completion, int) and completion > 0 else 0

    def used_so_far(self, usage: dict[str, Any], choices: list[Any]) -> None:
        """A chunk's own usage (continuous usage stats): the prompt, and its choice's completion so far
        (vLLM counts each choice apart); the final report, when it comes, replaces the sum."""
        prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
        index = choices[0].get("index", 0) if isinstance(choices[0], dict) else 0
        if not isinstance(completion, int) or not isinstance(index, int):
            return
        if self.choices is None:
            self.choices = {}
        self.choices[index] = max(completion, self.choices.get(index, 0))
        self.facts.prompt_tokens = prompt if isinstance(prompt, int) and prompt > 0 else 0
        self.facts.completion_tokens = sum(self.choices.values())

    def __call__(self) -> None:
        self.router.release_nowait(self.lease)
        if self.settle is not None:
            self.settle()
        facts = self.facts
        if facts.upstream_ended is None:
            facts.upstream_ended = time.monotonic()
        if self.traffic is not None:
            self.traffic.record(
                self.adapter,
                seconds=time.monotonic() - self.started,
                dedicated=self.dedicated,
                prompt_tokens=facts.prompt_tokens,
                completion_tokens=facts.completion_tokens,
            )


class Disconnect:
    """Watches one request for its client leaving (one task for the request's whole life, once the body
    is read). While `run` awaits something, leaving cancels it: vLLM then aborts the generation, because
    the gateway drops the upstream connection. `on_gone`, when set, is called instead.

    The watcher starts only once the request has taken WATCH_AFTER_S: most of a fast request's cost would
    otherwise be this task, and a generation worth aborting runs far longer than that."""

    __slots__ = ("gone", "on_gone", "timer", "watcher")

    def __init__(self, receive: Receive) -> None:
        self.gone = False
        self.on_gone: Callable[[], object] | None = None
        self.watcher: asyncio.Future[None] | None = None
        self.timer: asyncio.TimerHandle | None = asyncio.get_running_loop().call_later(
            WATCH_AFTER_S, self._start, receive
        )

    def _start(self, receive: Receive) -> None:
        self.timer = None
        self.watcher = asyncio.ensure_future(self._watch(receive))

    async def _watch(self, receive: Receive) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        self.gone = True
        if self.on_gone is not None:
            self.on_gone()

    async def run(self, work: Awaitable[T]) -> T:
        """Awaits work in this task; raises ClientGone (and cancels the work) if the client leaves first."""
        task = asyncio.current_task()
        assert task is not None
        if self.gone:
            if asyncio.iscoroutine(work):
                work.close()
            raise ClientGone()
        self.on_gone = task.cancel
        try:
            return await work
        except asyncio.CancelledError:
            if not self.gone:
                raise  # cancelled from outside (shutdown): not ours to swallow
            task.uncancel()
            raise ClientGone() from None
        finally:
            self.on_gone = None

    def close(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
        if self.watcher is not None:
            self.watcher.cancel()


class ClientGone(Exception):
    """The client disconnected before the answer was ready."""


def _client_error(err: UpstreamError, target: Target) -> GatewayError:
    if err.status in (401, 403):
        # The backend refused the gateway's own token: an operator's mistake, never the tenant's key.
        log.error("a backend refused the gateway's token (%s): check the backend's api_key", err.status)
        return BackendError(
            "the model backend refused this request; the operator has been told",
            status_code=502,
            type_="server_error",
            param=None,
        )
    if err.status >= 500:
        log.warning("backend error %s: %s", err.status, err.message)
        return BackendError(
            "the model backend failed to answer this request",
            status_code=502,
            type_="server_error",
            param=None,
        )
    # 4xx: the request itself is wrong (e.g. too many tokens); say why, in the tenant's names.
    message = err.message.replace(target.served_name, target.public_name)
    return BackendError(message, status_code=err.status, type_="invalid_request_error", param=err.param)


class _Rewriter:
    """Puts the tenant's name back where the backend wrote the internal one."""

    __slots__ = ("new", "old")

    def __init__(self, target: Target) -> None:
        self.old = orjson.dumps(target.served_name)
        self.new = orjson.dumps(target.public_name)

    def __call__(self, data: bytes) -> bytes:
        return data.replace(self.old, self.new) if self.old != self.new else data


def _headers(content_type: bytes, extra: dict[str, str]) -> list[tuple[bytes, bytes]]:
    return [(b"content-type", content_type), *((k.lower().encode(), v.encode()) for k, v in extra.items())]


class BufferedProxy(Response):
    def __init__(
        self,
        upstream: aiohttp.ClientResponse,
        rewrite: _Rewriter,
        target: Target,
        content_type: str,
        headers: dict[str, str],
        done: _Releaser,
        watch: Disconnect,
    ) -> None:
        self.upstream, self.rewrite, self.target, self.done = upstream, rewrite, target, done
        self.watch = watch
        self.status_code = 200
        self.background = None
        self.raw_headers = _headers(content_type.encode(), headers)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # The lease is given back once the client has its answer: the residency round trip is not on
        # the response's path.
        try:
            await self._respond(send)
        finally:
            self.watch.close()
            self.done()

    async def _respond(self, send: Send) -> None:
        try:
            data = await self.watch.run(self.upstream.read())
        except (TimeoutError, aiohttp.ClientError) as exc:
            self.upstream.close()
            err = BackendUnavailable(f"the backend connection failed ({type(exc).__name__})")
            self.done.facts.error_type = err.code or err.type
            body = orjson.dumps(error_body(err.message, err.type, None, err.code))
            await _send_whole(send, 502, body, [(b"content-type", b"application/json")])
            return
        except ClientGone:
            self.upstream.close()
            return
        self.upstream.release()
        self.done.facts.upstream_ended = time.monotonic()
        data = self.rewrite(data)
        self.done.used(_usage_from_body(data))
        await _send_whole(send, 200, data, [*self.raw_headers, (b"content-length", str(len(data)).encode())])


async def _send_whole(send: Send, status: int, body: bytes, headers: list[tuple[bytes, bytes]]) -> None:
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _usage_from_body(data: bytes) -> dict[str, Any] | None:
    try:
        usage = orjson.loads(data).get("usage")
    except (orjson.JSONDecodeError, AttributeError):
        return None
    return usage if isinstance(usage, dict) else None


_DONE = b"data: [DONE]\n\n"


def _own_error(event: bytes) -> bytes:
    """vLLM's error event (its engine failed mid-stream) told in our words: its message can name
    internals and reaches the operator's log instead."""
    try:
        obj = orjson.loads(event[6:])
    except orjson.JSONDecodeError:
        return event
    if not isinstance(obj, dict) or not isinstance(obj.get("error"), dict):
        return event
    log.warning("backend error while streaming: %s", str(obj["error"].get("message"))[:300])
    err = error_body(
        "the model backend failed while generating; retry", "server_error", None, "backend_error"
    )
    return b"data: " + orjson.dumps(err)


class SseProxy(Response):
    """Passes SSE events through as they arrive: the tenant's model name put back, the usage chunk
    captured (and dropped if the client did not ask for it), a backend failure ended with an error event."""

    def __init__(
        self,
        upstream: aiohttp.ClientResponse,
        rewrite: _Rewriter,
        target: Target,
        client_wants_usage: bool,
        headers: dict[str, str],
        done: _Releaser,
        watch: Disconnect,
        strip_usage: bool = False,
    ) -> None:
        self.upstream, self.rewrite, self.target, self.done = upstream, rewrite, target, done
        self.watch = watch
        self.client_wants_usage = client_wants_usage
        self.strip_usage = strip_usage  # per-chunk usage the gateway asked for, not the client
        self.status_code = 200
        self.background = None
        self.raw_headers = [*_headers(b"text/event-stream", headers), (b"cache-control", b"no-cache")]
        self.errored = False  # an error event was passed on: a break after it adds no second one

    def _events(self, block: bytes) -> bytes:
        """Rewrites a run of complete events."""
        block = self.rewrite(block)
        if b'"usage":{' not in block and b'"error":' not in block:
            return block
        out = []
        for event in block.split(b"\n\n"):
            if not event:
                continue
            if b'"error":' in event and event.startswith(b"data: {"):
                own = _own_error(event)
                if own is not event:  # vLLM's error event, not text that happens to contain "error":
                    self.errored = True
                    self.done.facts.error_type = "backend_error"
                event = own
            elif b'"usage":{' in event and event.startswith(b"data: {"):
                try:
                    obj = orjson.loads(event[6:])
                except orjson.JSONDecodeError:
                    obj = None
                if isinstance(obj, dict) and isinstance(obj.get("usage"), dict):
                    choices = obj.get("choices")
                    if not choices:  # the final report
                        self.done.used(obj["usage"])
                        if not self.client_wants_usage:
                            continue
                    elif isinstance(choices, list):
                        self.done.used_so_far(obj["usage"], choices)
                        if self.strip_usage:
                            del obj["usage"]
                            event = b"data: " + orjson.dumps(obj)
            out.append(event + b"\n\n")
        return b"".join(out)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # A client that leaves closes the upstream connection, which makes vLLM abort the generation.
        self.watch.on_gone = self.upstream.close
        if self.watch.gone:
            self.upstream.close()
        clean = ended = False
        facts = self.done.facts
        try:
            # Inside the try: a client gone before the first byte still gets its lease and its
            # reservation given back (the finally).
            await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
            buffer = b""
            try:
                async for chunk in self.upstream.content.iter_any():
                    buffer += chunk
                    cut = buffer.rfind(b"\n\n")
                    if cut < 0:
                        continue
                    block, buffer = buffer[: cut + 2], buffer[cut + 2 :]
                    out = self._events(block)
                    if out:
                        if facts.first_token is None:
                            facts.first_token = time.monotonic()
                        ended = ended or _DONE in out
                        await send({"type": "http.response.body", "body": out, "more_body": True})
                clean = True
                facts.upstream_ended = time.monotonic()
            except (TimeoutError, aiohttp.ClientError) as exc:
                if self.watch.gone:
                    return  # the client left; nothing more to say to it
                log.warning("stream from backend broke: %s", type(exc).__name__)
                facts.error_type = "backend_error"
                # One error event and one [DONE] per stream: what vLLM already sent is not repeated.
                tail = b"" if ended else _DONE
                if not ended and not self.errored:
                    err = error_body(
                        "the model backend stopped while streaming", "server_error", None, "backend_error"
                    )
                    tail = b"data: " + orjson.dumps(err) + b"\n\n" + _DONE
                if tail:
                    await send({"type": "http.response.body", "body": tail, "more_body": True})
            if clean and buffer.strip():  # after a break it is a partial event: dropped
                await send(
                    {"type": "http.response.body", "body": self._events(buffer + b"\n\n"), "more_body": True}
                )
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except OSError:
            pass  # the client's socket went away mid-send
        finally:
            self.watch.on_gone = None
            self.watch.close()
            if clean:
                self.upstream.release()
            else:
                self.upstream.close()
            self.done()
