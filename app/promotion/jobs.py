"""Jobs as rows of the registry database, claimed by workers with a renewable lease.

Why not a job library: the queue must work on the embedded default (SQLite, no Redis) and in production
(Postgres, Redis); a crashed worker's job must be taken over, and a running one never run twice. huey
(SQLite and Redis) drops a task whose worker dies mid-run and cannot interrupt running work; procrastinate
and pgqueuer are Postgres-only; rq, arq, dramatiq and SAQ need Redis or RabbitMQ. A job's state must also
change in the same transaction as the deployment and routing rows it moves. So the row is the queue entry:
one conditional UPDATE claims it (works the same on both databases), the lease is renewed while the
worker lives, and a lease that ran out means the worker is gone.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from app.db.models import Job, JobState

PROMOTE = "promote"
DEMOTE = "demote"
ACTIVE_STATES = (JobState.QUEUED, JobState.RUNNING)


def now() -> datetime:
    return datetime.now(UTC)


async def enqueue(session: AsyncSession, *, kind: str, adapter_id: uuid.UUID | None, params: dict[str, Any]) -> Job:
    job = Job(kind=kind, adapter_id=adapter_id, params=params, state=JobState.QUEUED, steps=[], updated_at=now())
    session.add(job)
    await session.flush()
    return job


async def claim(session: AsyncSession, *, owner: str, lease_s: float) -> Job | None:
    """The oldest job that is queued, or running under an expired lease (its worker died): claimed for
    `owner` until now + lease_s. None when there is nothing to do. Commits."""
    t = now()
    claimable = or_(
        Job.state == JobState.QUEUED,
        (Job.state == JobState.RUNNING) & (Job.lease_until < t),
    )
    candidates = await session.scalars(select(Job.id).where(claimable).order_by(Job.created_at).limit(8))
    for job_id in list(candidates):
        # Compare-and-set on the row: of two workers claiming at once, one updates it, the other sees 0 rows.
        won = await session.execute(
            update(Job)
            .where(Job.id == job_id, claimable)
            .values(
                state=JobState.RUNNING,
                lease_owner=owner,
                lease_until=t + timedelta(seconds=lease_s),
                attempts=Job.attempts + 1,
                updated_at=t,
            )
        )
        await session.commit()
        if won.rowcount == 1:  # type: ignore[attr-defined]
            job = await session.get(Job, job_id, populate_existing=True)
            return job
    return None


async def renew(
    session: AsyncSession, *, job_id: uuid.UUID, owner: str, lease_s: float, changes: dict[str, Any]
) -> tuple[bool, bool]:
    """Extends the lease (writing `changes` too) if `owner` still holds it. Returns (still held, cancel
    requested). Commits."""
    t = now()
    held = await session.execute(
        update(Job)
        .where(Job.id == job_id, Job.lease_owner == owner, Job.state == JobState.RUNNING)
        .values(lease_until=t + timedelta(seconds=lease_s), updated_at=t, **changes)
    )
    await session.commit()
    cancel = bool(await session.scalar(select(Job.cancel_requested).where(Job.id == job_id)))
    return held.rowcount == 1, cancel  # type: ignore[attr-defined]


async def finish(
    session: AsyncSession,
    *,
    job_id: uuid.UUID,
    owner: str,
    state: JobState,
    changes: dict[str, Any],
) -> bool:
    """Ends the job (if `owner` still holds it) and gives the lease up. Commits; False if it was lost."""
    t = now()
    done = await session.execute(
        update(Job)
        .where(Job.id == job_id, Job.lease_owner == owner)
        .values(state=state, lease_owner=None, lease_until=None, updated_at=t, finished_at=t, **changes)
    )
    await session.commit()
    return bool(done.rowcount == 1)  # type: ignore[attr-defined]


async def request_cancel(session: AsyncSession, job: Job) -> Job:
    """A queued job is cancelled at once; a running one when its worker next renews its lease."""
    t = now()
    if job.state == JobState.QUEUED:
        await session.execute(
            update(Job)
            .where(Job.id == job.id, Job.state == JobState.QUEUED)
            .values(state=JobState.CANCELLED, cancel_requested=True, updated_at=t, finished_at=t)
        )
    if job.state in ACTIVE_STATES:
        await session.execute(update(Job).where(Job.id == job.id).values(cancel_requested=True, updated_at=t))
    await session.commit()
    await session.refresh(job)
    return job
