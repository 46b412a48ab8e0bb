"""Migrations apply, roll back and re-apply cleanly on both Postgres and SQLite."""

from __future__ import annotations

import asyncio
import uuid

import pytest
from alembic import command
from sqlalchemy import inspect
from sqlalchemy.engine import make_url

from app.cli import alembic_config
from app.db.base import Base
from app.db.session import create_engine
from tests.conftest import PG_ADMIN_URL, _pg_admin


async def _tables(url: str) -> set[str]:
    engine = create_engine(url)
    async with engine.connect() as conn:
        names = await conn.run_sync(lambda c: set(inspect(c).get_table_names()))
    await engine.dispose()
    return names - {"alembic_version"}


def _run(url: str, action: str, revision: str) -> None:
    cfg = alembic_config(url)
    cfg.attributes["configure_logger"] = False
    getattr(command, action)(cfg, revision)


@pytest.fixture(params=["postgres", "sqlite"])
async def empty_db(request: pytest.FixtureRequest, tmp_path):  # type: ignore[no-untyped-def]
    if request.param == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path / 'm.db'}"
        return
    name = f"lgw_mig_{uuid.uuid4().hex[:10]}"
    await _pg_admin(f'CREATE DATABASE "{name}"')
    yield make_url(PG_ADMIN_URL).set(database=name).render_as_string(hide_password=False)
    await _pg_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


async def test_upgrade_downgrade_upgrade(empty_db: str) -> None:
    expected = set(Base.metadata.tables)

    await asyncio.to_thread(_run, empty_db, "upgrade", "head")
    assert await _tables(empty_db) == expected

    await asyncio.to_thread(_run, empty_db, "downgrade", "base")
    assert await _tables(empty_db) == set()

    await asyncio.to_thread(_run, empty_db, "upgrade", "head")
    assert await _tables(empty_db) == expected


async def test_models_match_migrations(empty_db: str) -> None:
    """Autogenerate finds nothing to add: the ORM models and the migration history agree."""
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    await asyncio.to_thread(_run, empty_db, "upgrade", "head")
    engine = create_engine(empty_db)
    async with engine.connect() as conn:
        diff = await conn.run_sync(
            lambda c: compare_metadata(
                MigrationContext.configure(c, opts={"compare_type": True}), Base.metadata
            )
        )
    await engine.dispose()
    assert diff == []
