"""Talks to vLLM backends: proxies OpenAI requests and drives the runtime LoRA API (load, unload, list).

aiohttp, not httpx, carries the hot path: httpx's connection pool costs about half a millisecond per
request under concurrency (DESIGN.md, "Proxy overhead facts"; encode/httpx#3215).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson

from app.errors import GatewayError, ServiceUnavailable

log = logging.getLogger(__name__)


class BackendError(GatewayError):
    """The backend answered with an error the gateway cannot fix; passed on in the OpenAI envelope."""

    def __init__(self, message: str, *, status_code: int, type_: str, param: str | None) -> None:
        super().__init__(message, param=param)
        self.status_code = status_code
        self.type = type_
        self.code = None


# The server closed a kept-alive connection just as it was reused: nothing was answered, and vLLM had
# not read the request (an idle connection's close), so sending it again on a new connection is safe.
_REUSE_RACE = (aiohttp.ServerDisconnectedError, ConnectionResetError, aiohttp.ClientOSError)
# The connection was never opened (refused, no route, or the connect timed out): nothing was sent, so
# the request may go elsewhere at once. A connect timeout is a backend that is not there (a pod being
# replaced, a dropped SYN), not a slow one.
_NEVER_REACHED = (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError)


class BackendUnavailable(ServiceUnavailable):
    def __init__(self, message: str, *, retry_after: int = 2, never_reached: bool = False) -> None:
        super().__init__(message, headers={"Retry-After": str(retry_after)})
        # True when the connection could not even be opened: the request is safe to send elsewhere.
        self.never_reached = never_reached


def _unreachable(backend: str, exc: BaseException, *, never_reached: bool = False) -> BackendUnavailable:
    """The tenant's answer names no backend (its name, its URL): the log line does, for the operator."""
    log.info("backend %s unreachable: %s", backend, type(exc).__name__)
    return BackendUnavailable("the model server is unreachable; retry", never_reached=never_reached)


class AdapterMissing(Exception):
    """The backend does not know the adapter it was asked for (it restarted, or it was unloaded)."""


@dataclass(frozen=True, slots=True)
class UpstreamError:
    status: int
    message: str
    type: str
    param: str | None


def parse_error(status: int, body: bytes) -> UpstreamError:
    """vLLM's error body: {"error": {...}} now, a flat object in older releases, text for some routes."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return UpstreamError(
            status, body.decode(errors="replace")[:500] or f"backend returned {status}", "", None
        )
    err = data.get("error", data) if isinstance(data, dict) else {}
    if not isinstance(err, dict):
        err = {"message": str(err)}
    param = err.get("param")
    return UpstreamError(
        status,
        str(err.get("message") or f"backend returned {status}"),
        str(err.get("type") or ""),
        param if isinstance(param, str) else None,
    )


def is_unknown_model(err: UpstreamError) -> bool:
    # vLLM answers 404 with param "model" for a model/adapter it does not have loaded.
    return err.status == 404 and err.param == "model"


_JSON_HEADERS = {"Content-Type": "application/json"}


def _headers(token: str | None, base: dict[str, str] | None) -> dict[str, str] | None:
    """The backend's bearer token on every call (vLLM's --api-key guards all of /v1)."""
    if not token:
        return base
    return {**(base or {}), "Authorization": f"Bearer {token}"}


class VllmClient:
    def __init__(
        self, session: aiohttp.ClientSession, *, control_timeout: float = 120.0, connect_timeout: float = 5.0
    ) -> None:
        self.session = session
        self._control_timeout = aiohttp.ClientTimeout(total=control_timeout, connect=connect_timeout)

    @classmethod
    def create(cls, *, connect_timeout: float = 5.0, read_timeout: float = 600.0) -> VllmClient:
        # vLLM (uvicorn) closes idle connections after 5 s; dropping ours sooner means a request never
        # goes out on a connection the server is closing at that very moment.
        # Idle connections are dropped after 2 s, well before vLLM's server drops them (uvicorn's 5 s,
        # VLLM_HTTP_TIMEOUT_KEEP_ALIVE): with a 1 s margin a busy event loop reused connections the
        # server had just closed (503s under CPU contention).
        connector = aiohttp.TCPConnector(limit=0, limit_per_host=0, keepalive_timeout=2, ttl_dns_cache=300)
        timeout = aiohttp.ClientTimeout(total=None, connect=connect_timeout, sock_read=read_timeout)
        # auto_decompress off: bytes pass through untouched. No cookie jar: a backend's cookies must never
        # ride along on other tenants' requests (and keeping none saves work on every response).
        session = aiohttp.ClientSession(
            connector=connector,
            timeout=timeout,
            auto_decompress=False,
            cookie_jar=aiohttp.DummyCookieJar(),
            json_serialize=lambda o: orjson.dumps(o).decode(),
        )
        return cls(session, connect_timeout=connect_timeout)

    async def close(self) -> None:
        await self.session.close()

    async def post(
        self, url: str, body: bytes, *, backend: str, token: str | None = None
    ) -> aiohttp.ClientResponse:
        """Sends a JSON request; the caller reads (and releases) the response. A kept-alive connection
        that the server closed as it was being reused (no response began) is retried once on a new one."""
        for attempt in (1, 2):
            try:
                return await self.session.post(url, data=body, headers=_headers(token, _JSON_HEADERS))
            except _NEVER_REACHED as exc:
                raise _unreachable(backend, exc, never_reached=True) from exc
            except _REUSE_RACE as exc:
                if attempt == 2:
                    raise _unreachable(backend, exc) from exc
            except (TimeoutError, aiohttp.ClientConnectionError, OSError) as exc:
                raise _unreachable(backend, exc) from exc
        raise AssertionError("unreachable")

    async def _control(
        self,
        method: str,
        url: str,
        *,
        backend: str,
        token: str | None,
        json: Any = None,
        timeout_s: float | None = None,
    ) -> tuple[int, bytes]:
        timeout = self._control_timeout
        if timeout_s is not None:
            # A call with a budget (a load inside a request's wait, under a lock with a TTL) ends by it.
            timeout = aiohttp.ClientTimeout(
                total=timeout_s, connect=min(timeout.connect or timeout_s, timeout_s)
            )
        try:
            async with self.session.request(
                method, url, json=json, timeout=timeout, headers=_headers(token, None)
            ) as resp:
                return resp.status, await resp.read()
        except _NEVER_REACHED as exc:
            raise _unreachable(backend, exc, never_reached=True) from exc
        except (TimeoutError, aiohttp.ClientConnectionError, OSError) as exc:
            raise _unreachable(backend, exc) from exc

    async def load_adapter(
        self,
        base_url: str,
        name: str,
        path: str,
        *,
        backend: str,
        token: str | None = None,
        timeout_s: float | None = None,
    ) -> None:
        status, body = await self._control(
            "POST",
            f"{base_url}/v1/load_lora_adapter",
            backend=backend,
            token=token,
            json={"lora_name": name, "lora_path": path},
            timeout_s=timeout_s,
        )
        if status == 200:
            return
        err = parse_error(status, body)
        if status == 400 and any(
            m.get("id") == name for m in await self.list_models(base_url, backend=backend, token=token)
        ):
            # vLLM refuses a duplicate name with 400: loaded meanwhile (another replica, or our state was
            # lost). The backend's own list decides, not the wording of its message.
            return
        log.warning("loading adapter %s on %s failed: %s %s", name, backend, status, err.message)
        # vLLM's message names paths and its own internals: it goes to the log above, never to a tenant.
        raise BackendError(
            "the model server could not load the adapter; retry, or tell the operator if it persists",
            status_code=502,
            type_="server_error",
            param=None,
        )

    async def unload_adapter(
        self,
        base_url: str,
        name: str,
        *,
        backend: str,
        token: str | None = None,
        timeout_s: float | None = None,
    ) -> bool:
        status, _ = await self._control(
            "POST",
            f"{base_url}/v1/unload_lora_adapter",
            backend=backend,
            token=token,
            json={"lora_name": name},
            timeout_s=timeout_s,
        )
        return status == 200

    async def list_models(
        self, base_url: str, *, backend: str, token: str | None = None
    ) -> list[dict[str, Any]]:
        status, body = await self._control("GET", f"{base_url}/v1/models", backend=backend, token=token)
        if status in (401, 403):
            log.error(
                "backend %s refuses the gateway's token (%s): set its api_key to its --api-key",
                backend,
                status,
            )
        if status != 200:
            log.info("backend %s answered %s to /v1/models", backend, status)
            raise BackendUnavailable("the model server is not ready; retry")
        data = orjson.loads(body).get("data", [])
        return [m for m in data if isinstance(m, dict)]
