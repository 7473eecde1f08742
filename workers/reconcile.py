"""``reconcile_jobs`` cron: no job is left ``running`` or ``queued`` forever.

- A running job whose heartbeat is older than the lease lost its worker (crash, kill -9):
  it is queued again under the next attempt number, or, after ``max_attempts`` runs, failed
  with ``internal_error``. The attempt number fences the dead worker out: if it comes back,
  its claim and its end both miss.
- A queued job older than ``requeue_after_s`` may have lost its enqueue (gateway crash
  between commit and enqueue, Redis flush): it is enqueued again; arq's job id makes a
  duplicate enqueue a no-op.
"""

from __future__ import annotations

import logging
from datetime import timedelta
from typing import Any

from sqlalchemy import select, update
from sqlmodel import col

from bulkhead import queue
from bulkhead.events import add_job_completed
from bulkhead.models import Job, utcnow
from workers.runner import Deps

log = logging.getLogger("bulkhead.worker.reconcile")
BATCH = 100


async def reconcile_jobs(ctx: dict[str, Any]) -> dict[str, int]:
    deps: Deps = ctx["deps"]
    recovered = await _recover_lost_runs(deps)
    requeued = await _requeue_stale(deps)
    return {"recovered": recovered, "requeued": requeued}


async def _recover_lost_runs(deps: Deps) -> int:
    now = utcnow()
    cutoff = now - timedelta(seconds=deps.settings.job_lease_s)
    async with deps.db.read() as session:
        stale = list(
            (
                await session.execute(
                    select(col(Job.id), col(Job.attempt))
                    .where(col(Job.status) == "running", col(Job.heartbeat_at) < cutoff)
                    .limit(BATCH)
                )
            ).all()
        )
    count = 0
    for job_id, attempt in stale:
        if attempt >= deps.settings.max_attempts:
            await _fail(deps, job_id, attempt)
            count += 1
            continue
        async with deps.db.session() as session:
            moved = await session.execute(
                update(Job)
                .where(
                    col(Job.id) == job_id, col(Job.status) == "running", col(Job.attempt) == attempt
                )
                .values(status="queued", attempt=attempt + 1, heartbeat_at=None)
            )
            await session.commit()
        if moved.rowcount == 1:  # type: ignore[attr-defined]
            log.warning("job %s lost its worker; attempt %s", job_id, attempt + 1)
            await queue.enqueue_run(
                deps.redis, deps.settings.common.queue_name, job_id, attempt + 1, {}
            )
            count += 1
    return count


async def _fail(deps: Deps, job_id: str, attempt: int) -> None:
    now = utcnow()
    async with deps.db.session() as session:
        ended = await session.execute(
            update(Job)
            .where(col(Job.id) == job_id, col(Job.status) == "running", col(Job.attempt) == attempt)
            .values(
                status="failed",
                termination_reason="internal_error",
                error_code="worker_lost",
                error_message=f"the job's worker died {attempt} times; giving up",
                finished_at=now,
            )
        )
        if ended.rowcount != 1:  # type: ignore[attr-defined]
            await session.rollback()
            return
        row = await session.get(Job, job_id)
        assert row is not None
        event = await add_job_completed(session, row)
        await session.commit()
    log.error("job %s failed: its worker died %s times", job_id, attempt)
    await deps.redis.publish(queue.JOB_DONE_CHANNEL + job_id, b"1")
    if event is not None:
        await queue.enqueue_webhook(deps.redis, deps.settings.common.queue_name, event.id, 1)


async def _requeue_stale(deps: Deps) -> int:
    cutoff = utcnow() - timedelta(seconds=deps.settings.requeue_after_s)
    async with deps.db.read() as session:
        rows = (
            await session.execute(
                select(col(Job.id), col(Job.attempt))
                .where(col(Job.status) == "queued", col(Job.created_at) < cutoff)
                .limit(BATCH)
            )
        ).all()
    for job_id, attempt in rows:
        await queue.enqueue_run(deps.redis, deps.settings.common.queue_name, job_id, attempt, {})
    return len(rows)
