"""Builds the FastAPI application: lifespan-owned resources, routers, error handlers."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TypedDict

from fastapi import FastAPI
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.api import admin, health, openai
from app.api.errors import install_error_handlers
from app.db.session import create_engine, create_sessionmaker
from app.settings import Settings, get_settings
from app.store.files import AdapterStore


class State(TypedDict):
    settings: Settings
    sessionmaker: async_sessionmaker[AsyncSession]
    store: AdapterStore


def create_app(settings: Settings) -> FastAPI:
    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[State]:
        engine = create_engine(settings.DATABASE_URL)
        settings.store_root.mkdir(parents=True, exist_ok=True)
        try:
            yield {
                "settings": settings,
                "sessionmaker": create_sessionmaker(engine),
                "store": AdapterStore(settings.store_root),
            }
        finally:
            await engine.dispose()

    app = FastAPI(title="LoRA Gateway", version="0.1.0", lifespan=lifespan)
    install_error_handlers(app)
    app.include_router(health.router)
    app.include_router(openai.router)
    app.include_router(admin.router)
    return app


def app_factory() -> FastAPI:
    """Entry point for `uvicorn --factory app.main:app_factory`."""
    return create_app(get_settings())
