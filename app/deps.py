"""FastAPI dependencies: DB session, adapter store, admin and tenant authentication."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import Depends, Request
from pydantic import SecretStr
from sqlalchemy.ext.asyncio import AsyncSession

from app import security
from app.errors import InvalidApiKey
from app.settings import Settings
from app.store.files import AdapterStore


async def get_session(request: Request) -> AsyncIterator[AsyncSession]:
    async with request.state.sessionmaker() as session:
        yield session


def get_settings_dep(request: Request) -> Settings:
    settings: Settings = request.state.settings
    return settings


def get_store(request: Request) -> AdapterStore:
    store: AdapterStore = request.state.store
    return store


SessionDep = Annotated[AsyncSession, Depends(get_session, scope="function")]
SettingsDep = Annotated[Settings, Depends(get_settings_dep)]
StoreDep = Annotated[AdapterStore, Depends(get_store)]


def require_bearer(request: Request, expected: SecretStr | None, refusal: str) -> None:
    """The request's bearer token must be `expected` (compared in constant time); none configured: refused."""
    token = security.bearer_token(request.headers.get("authorization"))
    if token is None or expected is None or not security.keys_equal(token, expected.get_secret_value()):
        raise InvalidApiKey(refusal)


def require_admin(request: Request) -> None:
    settings: Settings = request.state.settings
    require_bearer(
        request, settings.ADMIN_API_KEY, "a valid admin API key is required (Authorization: Bearer <admin key>)"
    )


async def invalidate_caches_after_write(request: Request) -> AsyncIterator[None]:
    """Admin writes take effect on this replica at once; other replicas follow within CACHE_TTL_S."""
    yield
    if request.method not in ("GET", "HEAD", "OPTIONS"):
        request.state.data_path.cache.invalidate_all()


AdminDep = Depends(require_admin)
AdminWriteDep = Depends(invalidate_caches_after_write, scope="function")
