"""``run_job``: claim a queued job, run it on a vmhost, commit its end exactly once.

Idempotency: the claim is ``UPDATE … SET status='running' WHERE status='queued' AND
attempt=:attempt``, so a second delivery of the same arq job does nothing. The end is
``UPDATE … WHERE status='running' AND attempt=:attempt`` in one transaction with the usage
ledger row and the webhook event, so a job ends once, is billed once and announced once.
While running, a heartbeat keeps the lease fresh and picks up cancel requests; a job whose
worker died loses its lease and the reconciler runs it again under a new attempt number.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from arq.connections import ArqRedis
from sqlalchemy import update
from sqlmodel import col

from billing.charges import Run, charge_run
from bulkhead import queue, telemetry
from bulkhead.db import Database
from bulkhead.events import add_job_completed
from bulkhead.metrics import record_duration
from bulkhead.models import Job, WebhookEvent, utcnow
from workers.errors import VmhostRejected, VmhostUnavailable
from workers.limits import RunLimits, run_limits
from workers.settings import WorkerSettings
from workers.vmhost_client import VmhostPool

log = logging.getLogger("bulkhead.worker.runner")

STATUS_BY_REASON = {
    "exit": "completed",
    "timeout": "timed_out",
    "canceled": "canceled",
    "oom": "failed",
    "output_limit": "failed",
    "quota_exceeded": "failed",
    "lifetime_exceeded": "failed",
    "internal_error": "failed",
}


@dataclass
class Deps:
    """What the worker's jobs need, built once in on_startup (arq's ``ctx['deps']``)."""

    settings: WorkerSettings
    db: Database
    redis: ArqRedis
    vmhosts: VmhostPool


def _parse_time(raw: Any, default: datetime) -> datetime:
    if not isinstance(raw, str):
        return default
    return datetime.fromisoformat(raw.replace("Z", "+00:00"))


def run_spec(job: Job, run_id: str, max_output_bytes: int, timeout_s: float) -> dict[str, Any]:
    return {
        "run_id": run_id,
        "language": job.language,
        "code": job.code,
        "command": job.command,
        "stdin": job.stdin,
        "env": job.env,
        "files": job.files,
        "timeout_s": timeout_s,
        "limits": {"vcpus": job.vcpus, "memory_mb": job.memory_mb},
        "network": job.network,
        "isolation": job.isolation,
        "template": job.template,
        "max_output_bytes": max_output_bytes,
    }


async def run_job(ctx: dict[str, Any], job_id: str, attempt: int, trace: dict[str, str]) -> str:
    deps: Deps = ctx["deps"]
    span = telemetry.tracer("bulkhead.worker").start_as_current_span(
        "run_job", context=telemetry.extract(trace), attributes={"job.id": job_id}
    )
    with span:
        job = await _claim(deps.db, job_id, attempt)
        if job is None:
            return "skipped"
        return await _execute(deps, job, attempt)


async def _claim(db: Database, job_id: str, attempt: int) -> Job | None:
    now = utcnow()
    async with db.session() as session:
        claimed = await session.execute(
            update(Job)
            .where(col(Job.id) == job_id, col(Job.status) == "queued", col(Job.attempt) == attempt)
            .values(status="running", started_at=now, heartbeat_at=now)
        )
        if claimed.rowcount != 1:  # type: ignore[attr-defined]
            await session.rollback()
            return None
        job = await session.get(Job, job_id)
        await session.commit()
    return job


async def _execute(deps: Deps, job: Job, attempt: int) -> str:
    started = utcnow()
    limits = await run_limits(deps.db, deps.settings.plans, job, started)
    if limits.timeout_s <= 0:  # out of lifetime or quota before it could start
        outcome: dict[str, Any] = {"termination_reason": limits.reason_at_timeout}
        return await _finish(deps, job, attempt, outcome, started, None, limits)
    run_id = f"{job.id}-{attempt}"
    host: list[str] = []
    stop: list[str] = []  # why the run was stopped from outside, if it was
    spec = run_spec(job, run_id, deps.settings.max_output_bytes, limits.timeout_s)
    run = asyncio.create_task(deps.vmhosts.run(spec, host.append, deps.settings.vmhost_retry_s))
    beat = asyncio.create_task(_heartbeat(deps, job.id, attempt, run, host, run_id, stop))
    try:
        _url, outcome = await run
    except asyncio.CancelledError:
        if not stop:
            raise  # the worker is shutting down: leave the job to the reconciler
        outcome = {"termination_reason": "canceled", "exit_code": None}
    except (VmhostUnavailable, VmhostRejected) as exc:
        log.error("job %s: %s", job.id, exc.message)
        outcome = {
            "termination_reason": "internal_error",
            "exit_code": None,
            "error": {"code": exc.code, "message": exc.message},
        }
    finally:
        beat.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await beat
    reason = outcome.get("termination_reason")
    if reason == "canceled" and stop:
        outcome["termination_reason"] = stop[0]
    elif reason == "timeout":
        outcome["termination_reason"] = limits.reason_at_timeout
    return await _finish(deps, job, attempt, outcome, started, host[-1] if host else None, limits)


async def _heartbeat(
    deps: Deps,
    job_id: str,
    attempt: int,
    run: asyncio.Task[Any],
    host: list[str],
    run_id: str,
    stop: list[str],
) -> None:
    """Keep the lease fresh; on a stop request (cancel, quota) note why and kill the run."""
    interval = max(0.2, min(1.0, deps.settings.job_lease_s / 5))
    while True:
        await asyncio.sleep(interval)
        async with deps.db.session() as session:
            await session.execute(
                update(Job)
                .where(col(Job.id) == job_id, col(Job.attempt) == attempt)
                .values(heartbeat_at=utcnow())
            )
            job = await session.get(Job, job_id)
            await session.commit()
        if job is not None and job.cancel_requested:
            stop.append(job.cancel_reason or "canceled")
            if host:
                await deps.vmhosts.kill(host[-1], run_id)
            await asyncio.sleep(2.0)  # the vmhost's stream should end with "canceled"
            if not run.done():
                run.cancel()
            return


async def _finish(
    deps: Deps,
    job: Job,
    attempt: int,
    outcome: dict[str, Any],
    started: datetime,
    vmhost_url: str | None,
    limits: RunLimits,
) -> str:
    now = utcnow()
    reason = outcome.get("termination_reason") or "internal_error"
    started_at = _parse_time(outcome.get("started_at"), started)
    finished_at = _parse_time(outcome.get("finished_at"), now)
    error = outcome.get("error") or {}
    duration_ms = outcome.get("duration_ms")
    if duration_ms is None:
        duration_ms = int((finished_at - started_at).total_seconds() * 1000)
    values: dict[str, Any] = {
        "status": STATUS_BY_REASON.get(reason, "failed"),
        "termination_reason": reason,
        "exit_code": outcome.get("exit_code"),
        "stdout": outcome.get("stdout", ""),
        "stderr": outcome.get("stderr", ""),
        "stdout_truncated": bool(outcome.get("stdout_truncated")),
        "stderr_truncated": bool(outcome.get("stderr_truncated")),
        "error_code": error.get("code"),
        "error_message": error.get("message"),
        "started_at": started_at,
        "finished_at": finished_at,
        "duration_ms": duration_ms,
        "vmhost_url": vmhost_url,
    }
    ran = "started_at" in outcome  # a sandbox really ran: bill it
    async with deps.db.session() as session:
        ended = await session.execute(
            update(Job)
            .where(col(Job.id) == job.id, col(Job.status) == "running", col(Job.attempt) == attempt)
            .values(**values)
        )
        if ended.rowcount != 1:  # type: ignore[attr-defined]
            await session.rollback()
            log.warning("job %s attempt %s ended after losing its lease", job.id, attempt)
            return "lost_lease"
        row = await session.get(Job, job.id)
        assert row is not None
        events: list[WebhookEvent] = []
        if ran and limits.key is not None:
            run = Run(
                subject_type="job",
                subject_id=row.id,
                started_at=started_at,
                ended_at=finished_at,
                vcpus=row.vcpus,
                memory_mb=row.memory_mb,
                stopped_at_quota=reason == "quota_exceeded",
            )
            usage, events = await charge_run(
                session, limits.key, limits.plan, run, deps.settings.stripe.event_name
            )
            row.sandbox_seconds = usage.seconds
        completed = await add_job_completed(session, row)
        if completed is not None:
            events.append(completed)
        await session.commit()
    await deps.redis.publish(queue.JOB_DONE_CHANNEL + job.id, b"1")
    for event in events:
        await queue.enqueue_webhook(deps.redis, deps.settings.common.queue_name, event.id, 1)
    await record_duration(deps.redis, duration_ms / 1000)
    return values["status"]
