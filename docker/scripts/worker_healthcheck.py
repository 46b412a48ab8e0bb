"""HEALTHCHECK of the promotion worker's image (docker/Dockerfile.worker). The worker has no port; it
is healthy when all of these hold:

1. a `lora-gateway worker` process runs in this container (not a zombie, not stopped);
2. the database answers (SELECT 1 within GATEWAY_DB_TIMEOUT_S): the worker takes its jobs from there;
3. no running job held by that process has an expired lease: the worker renews its leases every third
   of GATEWAY_JOB_LEASE_S from its event loop, so an expired one means the loop is stuck (a blocking
   call) or the heartbeat died, and another worker is free to take the job over.

Exit status 0 when healthy, else 1 with the reasons on stderr (`docker inspect` shows them).
"""

from __future__ import annotations

import asyncio
import sys
from datetime import UTC, datetime
from pathlib import Path


def _say(line: str, *, err: bool = False) -> None:
    stream = sys.stderr if err else sys.stdout
    stream.write(line + "\n")
    stream.flush()


def worker_pids(proc: Path = Path("/proc")) -> list[int]:
    """Processes whose command line is `... lora-gateway worker` and that are neither zombies nor stopped."""
    pids = []
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue  # gone meanwhile, or not ours to read
        names = [a.decode(errors="replace") for a in argv]
        launched = any(
            Path(a).name == "lora-gateway" and i + 1 < len(names) and names[i + 1] == "worker"
            for i, a in enumerate(names)
        )
        if launched and state not in ("Z", "T", "X"):
            pids.append(int(entry.name))
    return pids


async def database_problems(url: str, pids: list[int], timeout_s: float) -> list[str]:
    from sqlalchemy import or_, select, text

    from app.db.models import Job, JobState
    from app.db.session import create_engine

    engine = create_engine(url, timeout_s=timeout_s)
    try:
        async with engine.connect() as conn:
            await asyncio.wait_for(conn.execute(text("SELECT 1")), timeout_s)
            if not pids:
                return []
            # The worker's lease owner is f"worker-{pid}-{random}" (app/promotion/worker.py).
            owned = or_(*(Job.lease_owner.like(f"worker-{pid}-%") for pid in pids))
            stmt = select(Job.id, Job.lease_owner, Job.lease_until).where(
                Job.state == JobState.RUNNING, owned, Job.lease_until < datetime.now(UTC)
            )
            stale = (await asyncio.wait_for(conn.execute(stmt), timeout_s)).all()
    except Exception as exc:  # noqa: BLE001 - any failure to reach the database is the answer
        return [f"database does not answer: {type(exc).__name__}: {exc}"[:300]]
    finally:
        await engine.dispose()
    return [
        f"job {job_id} held by {owner}: lease expired at {until:%H:%M:%S} UTC"
        for job_id, owner, until in stale
    ]


def problems(proc: Path = Path("/proc")) -> list[str]:
    from app.settings import Settings

    settings = Settings()
    pids = worker_pids(proc)
    found = [] if pids else ["no `lora-gateway worker` process runs"]
    return found + asyncio.run(database_problems(settings.DATABASE_URL, pids, settings.DB_TIMEOUT_S))


def main() -> int:
    found = problems()
    for line in found:
        _say(f"unhealthy: {line}", err=True)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
