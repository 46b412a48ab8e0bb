"""Shared fixtures: a fresh Postgres database and a SQLite file per test session, migrated once;
each test gets an app on one of them (both, where parametrised) and leaves the tables empty."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncpg
import httpx
import pytest
from alembic import command
from asgi_lifespan import LifespanManager
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine

from app.cli import alembic_config
from app.db.base import Base
from app.db.session import create_engine
from app.main import create_app
from app.settings import Settings
from tests import leakscan

PG_ADMIN_URL = os.environ.get(
    "GATEWAY_TEST_POSTGRES_URL", "postgresql+asyncpg://postgres@127.0.0.1:5432/postgres"
)
ADMIN_KEY = "test-admin-key-0123456789abcdef"

leakscan.install()


@pytest.fixture(autouse=True)
def _no_internals_in_answers() -> Iterator[None]:
    """Every test: no error answer the gateway gave a tenant named a backend, a served name or a path
    (tests/leakscan.py). An answer read after the test ended counts for the next one."""
    yield
    found, leakscan.SCAN.found[:] = list(leakscan.SCAN.found), []
    assert not found, "internals in answers to tenants:\n" + "\n".join(found)


async def _pg_admin(sql: str) -> None:
    url = make_url(PG_ADMIN_URL)
    conn = await asyncpg.connect(
        host=url.host, port=url.port or 5432, user=url.username, password=url.password, database=url.database
    )
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


@pytest.fixture(scope="session")
async def postgres_url() -> AsyncIterator[str]:
    """A database of its own for this test session (and xdist worker), dropped at the end."""
    name = f"lgw_test_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    await _pg_admin(f'CREATE DATABASE "{name}"')
    url = make_url(PG_ADMIN_URL).set(database=name).render_as_string(hide_password=False)
    try:
        yield url
    finally:
        await _pg_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def sqlite_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    return f"sqlite+aiosqlite:///{tmp_path_factory.mktemp('sqlite') / 'gateway.db'}"


def _upgrade(url: str) -> None:
    cfg = alembic_config(url)
    cfg.attributes["configure_logger"] = False
    command.upgrade(cfg, "head")


@pytest.fixture(scope="session")
async def migrated(postgres_url: str, sqlite_url: str) -> dict[str, str]:
    import asyncio

    # alembic's env.py runs its own event loop: keep it off this one.
    for url in (postgres_url, sqlite_url):
        await asyncio.to_thread(_upgrade, url)
    return {"postgres": postgres_url, "sqlite": sqlite_url}


@pytest.fixture(params=["postgres", "sqlite"])
def db_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
async def db_url(migrated: dict[str, str], db_kind: str) -> AsyncIterator[str]:
    url = migrated[db_kind]
    yield url
    await _empty_tables(url)


async def _empty_tables(url: str) -> None:
    engine = create_engine(url)
    tables = [t.name for t in reversed(Base.metadata.sorted_tables)]
    async with engine.begin() as conn:
        if url.startswith("postgresql"):
            await conn.execute(text(f"TRUNCATE {', '.join(tables)} CASCADE"))
        else:
            for table in tables:
                await conn.execute(text(f"DELETE FROM {table}"))
    await engine.dispose()


@pytest.fixture
async def engine(db_url: str) -> AsyncIterator[AsyncEngine]:
    eng = create_engine(db_url)
    yield eng
    await eng.dispose()


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "data"


@pytest.fixture
def settings(db_url: str, data_dir: Path) -> Settings:
    return Settings(
        _env_file=None,  # type: ignore[call-arg]
        DATABASE_URL=db_url,
        DATA_DIR=data_dir,
        ADMIN_API_KEY=ADMIN_KEY,
        MAX_ADAPTER_BYTES=256 * 1024,
    )


@pytest.fixture
async def client(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    """An unauthenticated client on a fresh app."""
    app = create_app(settings)
    async with LifespanManager(app) as manager:
        # Unhandled errors must come back as the 500 envelope a real client sees, not raise here.
        transport = httpx.ASGITransport(app=manager.app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as c:
            yield c


@pytest.fixture
def admin(client: httpx.AsyncClient) -> Iterator[httpx.AsyncClient]:
    """The same app, with the admin key."""
    client.headers["Authorization"] = f"Bearer {ADMIN_KEY}"
    yield client
    client.headers.pop("Authorization", None)
