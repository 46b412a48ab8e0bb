"""What the gateway does while Postgres or Redis does not answer: which errors mean "unreachable", the
503s tenants get for them, and one log line per outage rather than one per request."""

from __future__ import annotations

import logging
import time

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError

from app.errors import ServiceUnavailable

log = logging.getLogger(__name__)

REGISTRY_RETRY_AFTER_S = 5
STATE_RETRY_AFTER_S = 1


class RegistryUnavailable(ServiceUnavailable):
    """The database did not answer and the cache holds nothing fresh enough to answer from."""

    def __init__(self) -> None:
        super().__init__(
            "the gateway's registry is unavailable; retry shortly",
            headers={"Retry-After": str(REGISTRY_RETRY_AFTER_S)},
        )


class StateUnavailable(ServiceUnavailable):
    """Redis (the fleet's placement state) did not answer: fail closed, fast."""

    def __init__(self) -> None:
        super().__init__(
            "the gateway cannot place requests right now; retry shortly",
            headers={"Retry-After": str(STATE_RETRY_AFTER_S)},
        )


# SQLSTATE classes that say the server is not there to answer: connection exception (08), operator
# intervention (57: shutting down, starting up, admin shutdown), insufficient resources (53: too many
# connections).
_UNAVAILABLE_SQLSTATE = ("08", "57", "53")


def _sqlstate(exc: BaseException) -> str | None:
    seen: BaseException | None = exc
    for _ in range(4):  # SQLAlchemy's error -> the driver adapter's -> asyncpg's
        if seen is None:
            return None
        code = getattr(seen, "sqlstate", None) or getattr(seen, "pgcode", None)
        if isinstance(code, str):
            return code
        seen = getattr(seen, "orig", None) or seen.__cause__
    return None


def db_unreachable(exc: BaseException) -> bool:
    """The database (or the pool's wait for a connection) failed, as opposed to a query being wrong.
    asyncpg's refused or timed-out connects reach us as builtins, not wrapped by SQLAlchemy; a server
    shutting down answers with SQLSTATE 57P01-57P03, wrapped as a plain DBAPIError."""
    if isinstance(exc, OperationalError | InterfaceError | PoolTimeoutError | ConnectionError | TimeoutError):
        return True
    if not isinstance(exc, DBAPIError):
        return False
    if exc.connection_invalidated:
        return True
    code = _sqlstate(exc)
    return code is not None and code[:2] in _UNAVAILABLE_SQLSTATE


def redis_unreachable(exc: BaseException) -> bool:
    return isinstance(exc, RedisConnectionError | RedisTimeoutError)


class Outages:
    """Maps a dependency's failure to the tenant's 503 and logs it once per outage; None for anything
    else (a bug: the caller's 500)."""

    def __init__(self) -> None:
        self.db, self.redis = OutageLog("the database"), OutageLog("redis")

    def answer(self, exc: BaseException) -> ServiceUnavailable | None:
        if redis_unreachable(exc):
            self.redis.failed(exc)
            return StateUnavailable()
        if db_unreachable(exc):
            self.db.failed(exc)
            return RegistryUnavailable()
        return None

    def recovered(self) -> None:
        self.db.recovered()
        self.redis.recovered()


class OutageLog:
    """A warning when a dependency starts failing and at most one per `every_s` while it goes on, with
    the number of failures in between; one line when it answers again."""

    def __init__(self, what: str, every_s: float = 30.0) -> None:
        self.what = what
        self.every_s = every_s
        self._since: float | None = None
        self._last = 0.0
        self._count = 0

    def failed(self, exc: BaseException) -> None:
        now = time.monotonic()
        self._count += 1
        if self._since is None:
            self._since = now
        if self._count == 1 or now - self._last >= self.every_s:
            log.warning(
                "%s unreachable (%s: %s); %d failures so far, for %.0f s",
                self.what,
                type(exc).__name__,
                str(exc)[:200],
                self._count,
                now - self._since,
            )
            self._last = now

    def recovered(self) -> None:
        if self._since is not None:
            log.warning(
                "%s answers again after %.1f s (%d failures)",
                self.what,
                time.monotonic() - self._since,
                self._count,
            )
            self._since, self._count = None, 0


OUTAGES = Outages()  # one per process: both ways in (FastAPI and the fast path) report to it
