"""Builds the FastAPI application: lifespan-owned resources, routers, error handlers."""

from __future__ import annotations

import asyncio
import contextlib
import gc
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, TypedDict

from fastapi import FastAPI
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app import logs
from app.api import admin, health, openai
from app.api import metrics as metrics_api
from app.api.errors import install_error_handlers
from app.api.openai.fastpath import FastPath
from app.api.openai.proxy import DataPath
from app.api.openai.spec import SECURITY_SCHEMES, document_errors
from app.backends.vllm import VllmClient
from app.db.session import create_engine, create_sessionmaker
from app.errors import log_request_ids
from app.lifecycle import Drain
from app.limits.gate import LimitGate
from app.limits.memory import MemoryLimits
from app.limits.metering import UsageMeter
from app.limits.redis_store import RedisLimits
from app.limits.state import LimitStore
from app.metrics import Metrics
from app.outages import OUTAGES
from app.promotion.routes import RoutingTable
from app.registry.cache import RegistryCache
from app.residency.instrumented import InstrumentedStore
from app.residency.memory import MemoryResidency
from app.residency.redis_store import RedisResidency
from app.residency.state import ResidencyStore
from app.routing.policy import PlacementPolicy, make_policy
from app.routing.reconcile import Reconciler
from app.routing.router import Router
from app.settings import Settings, get_settings
from app.store.files import AdapterStore
from app.traffic import MemoryTraffic, RedisTraffic, TrafficMeter


class State(TypedDict):
    settings: Settings
    sessionmaker: async_sessionmaker[AsyncSession]
    store: AdapterStore
    data_path: DataPath
    drain: Drain


def placement_policy(settings: Settings) -> PlacementPolicy:
    """The router's policy: GATEWAY_PLACEMENT_POLICY, with GATEWAY_PLACEMENT_POOL_LOADS (0: no cap)."""
    return make_policy(settings.PLACEMENT_POLICY, pool_loads=settings.PLACEMENT_POOL_LOADS or None)


def redis_client(url: str, timeout_s: float, max_connections: int = 256) -> Redis:
    """Explicit timeouts and no client-side retries (redis-py retries 3 times with backoff by default):
    a reservation script that timed out may have run, so it must not run again blindly; the router
    answers the request instead, and the next request tries afresh. The pool blocks for a free
    connection (up to the same timeout) rather than failing at once when `max_connections` are in use:
    redis-py's default pool raises "Too many connections" at 100, a 503 under any burst."""
    pool = BlockingConnectionPool.from_url(
        url,
        max_connections=max_connections,
        timeout=timeout_s,
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        retry=Retry(NoBackoff(), 0),
        retry_on_timeout=False,
        health_check_interval=0,
    )
    return Redis(connection_pool=pool, retry=Retry(NoBackoff(), 0))


def create_app(settings: Settings) -> FastPath:
    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[State]:
        engine = create_engine(settings.DATABASE_URL, timeout_s=settings.DB_TIMEOUT_S)
        settings.store_root.mkdir(parents=True, exist_ok=True)
        sessionmaker = create_sessionmaker(engine)
        client = VllmClient.create(
            connect_timeout=settings.UPSTREAM_CONNECT_TIMEOUT_S, read_timeout=settings.UPSTREAM_READ_TIMEOUT_S
        )
        cache = RegistryCache(
            sessionmaker, ttl=settings.CACHE_TTL_S, max_stale_s=settings.REGISTRY_MAX_STALE_S
        )
        assert settings.BACKEND_ADAPTER_ROOT is not None  # filled by Settings
        redis = (
            redis_client(settings.REDIS_URL, settings.REDIS_TIMEOUT_S, settings.REDIS_MAX_CONNECTIONS)
            if settings.REDIS_URL
            else None
        )
        store: ResidencyStore = (
            RedisResidency(
                redis,
                prefix=settings.REDIS_PREFIX,
                lock_ttl_s=settings.LOAD_LOCK_TTL_S,
                lease_ttl_s=settings.LEASE_TTL_S,
            )
            if redis is not None
            else MemoryResidency(lock_ttl_s=settings.LOAD_LOCK_TTL_S, lease_ttl_s=settings.LEASE_TTL_S)
        )
        metrics = Metrics(
            max_models=settings.METRICS_MAX_MODELS,
            max_tenants=settings.METRICS_MAX_TENANTS,
            tenant_label=settings.METRICS_TENANT_LABEL,
            rerank_s=settings.METRICS_RERANK_S,
        )
        metrics.watch_database(engine)
        own_connections = store if isinstance(store, RedisResidency) else None  # closed at shutdown
        store = InstrumentedStore(store, metrics, "redis" if redis is not None else "memory")
        router = Router(
            store=store,
            metrics=metrics,
            policy=placement_policy(settings),
            client=client,
            adapter_root=settings.BACKEND_ADAPTER_ROOT,
            local_store=settings.store_root
            if settings.BACKEND_ADAPTER_ROOT == str(settings.store_root)
            else None,
            wait_timeout_s=settings.PLACEMENT_WAIT_S,
            patience_s=settings.PLACEMENT_PATIENCE_S,
            max_waiters=settings.PLACEMENT_MAX_WAITERS,
            tenant_share=settings.PLACEMENT_TENANT_SHARE,
            redis_outage=settings.REDIS_OUTAGE,
        )
        routes = RoutingTable(sessionmaker, poll_s=settings.ROUTES_POLL_S)
        with contextlib.suppress(Exception):  # the database may be out at start: the poller retries
            await routes.refresh()
        traffic = TrafficMeter(
            RedisTraffic(redis, prefix=settings.REDIS_PREFIX, bucket_s=settings.TRAFFIC_BUCKET_S)
            if redis is not None
            else MemoryTraffic(bucket_s=settings.TRAFFIC_BUCKET_S),
            flush_s=settings.TRAFFIC_FLUSH_S,
            max_keys=settings.TRAFFIC_MAX_ADAPTERS,
        )
        limit_store: LimitStore = (
            RedisLimits(redis, prefix=settings.REDIS_PREFIX, lease_s=settings.LIMITS_LEASE_S)
            if redis is not None
            else MemoryLimits(lease_s=settings.LIMITS_LEASE_S)
        )
        limits = LimitGate(
            limit_store,
            fail_open=settings.LIMITS_REDIS_OUTAGE == "open",
            default_max_tokens=settings.LIMITS_DEFAULT_MAX_TOKENS,
            outage=OUTAGES.redis,
            local_share=settings.LIMITS_LOCAL_SHARE,
        )
        meter = UsageMeter(sessionmaker, flush_s=settings.USAGE_FLUSH_S)
        data_path = DataPath(
            cache=cache,
            router=router,
            max_request_bytes=settings.MAX_REQUEST_BYTES,
            routes=routes,
            traffic=traffic,
            metrics=metrics,
            request_log=logs.RequestLog(settings.LOG_REQUESTS),
            limits=limits,
            meter=meter,
        )
        reconciler = Reconciler(
            sessionmaker=sessionmaker,
            router=router,
            interval_s=settings.RECONCILE_INTERVAL_S,
            unhealthy_after=settings.UNHEALTHY_AFTER,
            pinned=cache.pinned.get,
        )
        drain = Drain(settings.DRAIN_S)
        drain.install()
        background = [
            asyncio.create_task(cache.run_usage_flusher()),
            asyncio.create_task(reconciler.run()),
            asyncio.create_task(routes.run()),
            asyncio.create_task(traffic.run()),
            asyncio.create_task(meter.run()),
        ]
        if settings.GC_FREEZE:
            # Everything built so far lives as long as the process: keep the collector from rescanning
            # it (and pausing the event loop) while requests run. Young-generation thresholds stay at
            # their default: larger ones save CPU but each collection then pauses for milliseconds,
            # which lands in the p99 latency.
            gc.collect()
            gc.freeze()
        try:
            yield {
                "settings": settings,
                "sessionmaker": sessionmaker,
                "store": AdapterStore(settings.store_root),
                "data_path": data_path,
                "drain": drain,
            }
        finally:
            for task in background:
                task.cancel()
            await asyncio.gather(*background, return_exceptions=True)
            await router.close()
            await traffic.close()
            await limits.close()
            await meter.close()
            with contextlib.suppress(Exception):
                await cache.flush_key_usage()
            with contextlib.suppress(Exception):
                await routes.leave()
            await client.close()
            if own_connections is not None:
                await own_connections.close()
            if redis is not None:
                await redis.aclose(close_connection_pool=True)  # a pool passed in is not closed by default
            await engine.dispose()

    # FastAPI's built-in OpenTelemetry hooks cost CPU on every request; metrics come from app.metrics.
    app = FastAPI(
        title="LoRA Gateway",
        version="0.1.0",
        lifespan=lifespan,
        telemetry={"tracing": False, "metrics": False, "logs": False},
    )
    install_error_handlers(app)
    _document_keys(app)
    log_request_ids()
    app.include_router(health.router)
    app.include_router(metrics_api.router)
    app.include_router(openai.router)
    app.include_router(admin.router)
    return FastPath(app)


def _document_keys(app: FastAPI) -> None:
    """The tenant key's bearer scheme, which the routes' documents refer to."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = document_errors(build())
            schema.setdefault("components", {}).setdefault("securitySchemes", {}).update(SECURITY_SCHEMES)
        return app.openapi_schema  # type: ignore[return-value]

    app.openapi = openapi  # type: ignore[method-assign]


def app_factory() -> FastPath:
    """Entry point for `uvicorn --factory app.main:app_factory` (each worker process calls it)."""
    settings = get_settings()
    logs.configure(settings.LOG_LEVEL, settings.LOG_FORMAT)
    return create_app(settings)
