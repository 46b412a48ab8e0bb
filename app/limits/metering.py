"""Usage for billing: requests and tokens per tenant, API key, model and hour, from the backends' own usage
reports. Summed in the process (a dict update per request, no I/O on the request path) and added to the
database every `flush_s` in one statement (an upsert that increments, so any number of replicas add up).

Durability: a gateway stopped with SIGTERM flushes before it exits; one that is killed loses at most its
last `flush_s` of usage. While the database is down the sums are kept and retried (bounded: beyond
`max_rows` distinct rows the oldest hour's are dropped, logged)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from datetime import UTC, datetime
from typing import Any

from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.db.models import UsageHour

log = logging.getLogger(__name__)

Row = tuple[uuid.UUID, uuid.UUID, str, int]  # tenant, API key, model, hour (unix hours)


class UsageMeter:
    def __init__(
        self,
        sessionmaker: async_sessionmaker[AsyncSession],
        *,
        flush_s: float = 10.0,
        max_rows: int = 200_000,
    ) -> None:
        self._sessionmaker = sessionmaker
        self.flush_s = flush_s
        self.max_rows = max_rows
        self._sums: dict[Row, list[int]] = {}
        self._lock = asyncio.Lock()

    def record(
        self, tenant: uuid.UUID, key: uuid.UUID | None, model: str, prompt_tokens: int, completion_tokens: int
    ) -> None:
        if key is None:
            return
        row = (tenant, key, model, int(time.time() // 3600))
        sums = self._sums.get(row)
        if sums is None:
            if len(self._sums) >= self.max_rows:
                self._drop_oldest()
            sums = self._sums[row] = [0, 0, 0]
        sums[0] += 1
        sums[1] += prompt_tokens
        sums[2] += completion_tokens

    def _drop_oldest(self) -> None:
        oldest = min(row[3] for row in self._sums)
        lost = [row for row in self._sums if row[3] == oldest]
        for row in lost:
            del self._sums[row]
        log.error("usage: %d rows of hour %d dropped (the database has not taken them)", len(lost), oldest)

    def pending(self) -> int:
        return len(self._sums)

    async def flush(self) -> int:
        """Adds what was summed to the database; returns the rows written. On failure the sums are kept
        (merged with what came meanwhile) and the error raised."""
        async with self._lock:
            if not self._sums:
                return 0
            batch, self._sums = self._sums, {}
            try:
                try:
                    await self._write(list(batch.items()))
                except IntegrityError:
                    # A tenant or key deleted meanwhile (its rows can go nowhere): row by row, so that
                    # every other tenant's usage is written and only the orphans are dropped.
                    await self._write_each(batch)
            except BaseException:
                for row, sums in batch.items():
                    mine = self._sums.setdefault(row, [0, 0, 0])
                    for i in range(3):
                        mine[i] += sums[i]
                raise
            return len(batch)

    async def _write(self, rows: list[tuple[Row, list[int]]]) -> None:
        async with self._sessionmaker() as session:
            await session.execute(_upsert(session), [_values(row, sums) for row, sums in rows])
            await session.commit()

    async def _write_each(self, batch: dict[Row, list[int]]) -> None:
        for row in list(batch):
            try:
                await self._write([(row, batch[row])])
            except IntegrityError:
                log.warning("usage of a deleted tenant or key dropped: %d requests", batch[row][0])
            del batch[row]  # written or dropped: not merged back if a later row fails otherwise

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.flush_s)
            try:
                await self.flush()
            except Exception:
                log.warning("usage could not be written yet (%d rows kept)", self.pending(), exc_info=True)

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self.flush()


def _values(row: Row, sums: list[int]) -> dict[str, object]:
    tenant, key, model, hour = row
    return {
        "tenant_id": tenant,
        "api_key_id": key,
        "model": model[:200],
        "hour": datetime.fromtimestamp(hour * 3600, UTC),
        "requests": sums[0],
        "prompt_tokens": sums[1],
        "completion_tokens": sums[2],
    }


def _upsert(session: AsyncSession) -> Any:
    """INSERT ... ON CONFLICT (the row) DO UPDATE SET each count = its count + the new one."""
    from sqlalchemy.dialects import postgresql, sqlite

    dialect = postgresql if session.get_bind().dialect.name == "postgresql" else sqlite
    stmt = dialect.insert(UsageHour)
    return stmt.on_conflict_do_update(
        index_elements=["tenant_id", "hour", "api_key_id", "model"],
        set_={
            name: getattr(UsageHour, name) + getattr(stmt.excluded, name)
            for name in ("requests", "prompt_tokens", "completion_tokens")
        },
    )
