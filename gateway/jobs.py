"""Job admission and queries for the gateway. Knows nothing of HTTP.

Admission writes the job row first (the database is the source of truth) and then enqueues
``run_job``; if the enqueue is lost, the workers' reconcile cron enqueues it again.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from arq.connections import ArqRedis
from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError
from sqlmodel import col

from bulkhead import queue, telemetry
from bulkhead.db import Database
from bulkhead.errors import Conflict, InvalidInput, NotFound, TooLarge
from bulkhead.events import add_job_completed
from bulkhead.ids import new_id
from bulkhead.models import TERMINAL_STATUSES, ApiKey, Job, WebhookAttempt, WebhookEvent, utcnow
from gateway.batcher import JobBatcher
from gateway.schemas import JobCreate
from gateway.settings import GatewaySettings
from gateway.waiter import JobWaiter

log = logging.getLogger("bulkhead.gateway.jobs")
TEMPLATES = ("base",)
CANCEL_WAIT_S = 10.0


@dataclass(frozen=True)
class Page:
    data: list[dict[str, Any]]
    has_more: bool
    next_cursor: str | None

    def public(self) -> dict[str, Any]:
        return {
            "object": "list",
            "data": self.data,
            "has_more": self.has_more,
            "next_cursor": self.next_cursor,
        }


class JobService:
    def __init__(
        self,
        settings: GatewaySettings,
        db: Database,
        redis: ArqRedis,
        waiter: JobWaiter,
        batcher: JobBatcher,
    ) -> None:
        self.batcher = batcher
        self.settings = settings
        self.db = db
        self.redis = redis
        self.waiter = waiter

    async def create(
        self, key: ApiKey, req: JobCreate, idempotency_key: str | None, request_hash: str
    ) -> tuple[Job, bool]:
        """Admit a job; returns (job, created). Same idempotency key + body → same job."""
        plan = self.settings.plans.get(key.plan)
        if req.template not in TEMPLATES:
            raise InvalidInput(f"unknown template {req.template!r}", "template_not_found")
        timeout_s = req.timeout_s if req.timeout_s is not None else self.settings.default_timeout_s
        if timeout_s > self.settings.max_timeout_s:
            raise InvalidInput(f"timeout_s must be at most {self.settings.max_timeout_s:g}")
        if timeout_s > plan.max_lifetime_s:
            raise InvalidInput(
                f"timeout_s must be at most {plan.max_lifetime_s} on the {plan.name} plan "
                "(its sandbox lifetime)"
            )
        if req.payload_bytes() > self.settings.max_code_bytes:
            raise TooLarge(
                f"code, stdin and files add up to more than {self.settings.max_code_bytes} bytes"
            )
        if idempotency_key is not None:
            if not 1 <= len(idempotency_key) <= 255:
                raise InvalidInput("Idempotency-Key must be 1-255 characters")
            found = await self._by_idempotency_key(key.id, idempotency_key, request_hash)
            if found is not None:
                return found, False
        job = Job(
            id=new_id("job"),
            api_key_id=key.id,
            language=req.language,
            code=req.code,
            command=req.command,
            stdin=req.stdin,
            env=req.env,
            files=[f.model_dump() for f in req.files],
            timeout_s=timeout_s,
            vcpus=req.limits.vcpus,
            memory_mb=req.limits.memory_mb,
            template=req.template,
            network=req.network,
            isolation=req.isolation,
            callback_url=req.callback_url,
            job_metadata=req.metadata,
            idempotency_key=idempotency_key,
            request_hash=request_hash if idempotency_key else None,
            attempt=1,
        )
        try:
            await self.batcher.insert(job, plan)
        except IntegrityError:
            if idempotency_key is None:
                raise
            found = await self._by_idempotency_key(key.id, idempotency_key, request_hash)
            if found is None:
                raise
            return found, False
        try:
            await queue.enqueue_run(
                self.redis, self.settings.common.queue_name, job.id, 1, telemetry.inject()
            )
        except Exception:  # the reconcile cron re-enqueues queued jobs
            log.exception("enqueue of %s failed; the reconciler will retry it", job.id)
        return job, True

    async def _by_idempotency_key(self, key_id: str, idem: str, request_hash: str) -> Job | None:
        async with self.db.read() as session:
            found = (
                await session.execute(
                    select(Job).where(
                        col(Job.api_key_id) == key_id, col(Job.idempotency_key) == idem
                    )
                )
            ).scalar_one_or_none()
        if found is not None and found.request_hash != request_hash:
            raise Conflict(
                "this Idempotency-Key was used with a different request body",
                "idempotency_conflict",
            )
        return found

    async def get(self, key: ApiKey, job_id: str) -> Job:
        async with self.db.read() as session:
            job = await session.get(Job, job_id)
        if job is None or job.api_key_id != key.id:
            raise NotFound(f"no job {job_id}")
        return job

    async def wait(self, key: ApiKey, job: Job, wait_s: float) -> Job:
        """The job once it ends, or as it is after ``wait_s`` seconds."""
        if job.status in TERMINAL_STATUSES or wait_s <= 0:
            return job
        await self.waiter.wait(job.id, wait_s, lambda: self._is_done(job.id))
        return await self.get(key, job.id)

    async def _is_done(self, job_id: str) -> bool:
        async with self.db.read() as session:
            status = (
                await session.execute(select(col(Job.status)).where(col(Job.id) == job_id))
            ).scalar()
        return status in TERMINAL_STATUSES

    async def page(self, key: ApiKey, status: str | None, limit: int, cursor: str | None) -> Page:
        query = select(Job).where(col(Job.api_key_id) == key.id)
        if status is not None:
            query = query.where(col(Job.status) == status)
        if cursor is not None:
            query = query.where(col(Job.id) < cursor)
        query = query.order_by(col(Job.id).desc()).limit(limit + 1)
        async with self.db.read() as session:
            rows = list((await session.execute(query)).scalars())
        more = len(rows) > limit
        rows = rows[:limit]
        return Page([r.public() for r in rows], more, rows[-1].id if more and rows else None)

    async def cancel(self, key: ApiKey, job_id: str) -> Job:
        job = await self.get(key, job_id)
        if job.status in TERMINAL_STATUSES:
            raise Conflict(f"job {job_id} already ended ({job.status})", "job_already_finished")
        now = utcnow()
        async with self.db.session() as session:
            ended = await session.execute(
                update(Job)
                .where(col(Job.id) == job_id, col(Job.status) == "queued")
                .values(status="canceled", termination_reason="canceled", finished_at=now)
            )
            if ended.rowcount == 1:  # type: ignore[attr-defined]
                row = await session.get(Job, job_id)
                assert row is not None
                event = await add_job_completed(session, row)
                await session.commit()
                await self._after_end(job_id, event)
                return await self.get(key, job_id)
            await session.execute(
                update(Job).where(col(Job.id) == job_id).values(cancel_requested=True)
            )
            await session.commit()
        # a worker runs it: it sees cancel_requested within its heartbeat and kills the sandbox
        await self.waiter.wait(job_id, CANCEL_WAIT_S, lambda: self._is_done(job_id))
        return await self.get(key, job_id)

    async def _after_end(self, job_id: str, event: WebhookEvent | None) -> None:
        await self.redis.publish(queue.JOB_DONE_CHANNEL + job_id, b"1")
        if event is not None:
            await queue.enqueue_webhook(self.redis, self.settings.common.queue_name, event.id, 1)

    async def deliveries(self, key: ApiKey, job_id: str) -> list[dict[str, Any]]:
        await self.get(key, job_id)
        async with self.db.read() as session:
            rows = await session.execute(
                select(WebhookAttempt)
                .where(col(WebhookAttempt.subject_id) == job_id)
                .order_by(col(WebhookAttempt.created_at))
            )
            return [r.public() for r in rows.scalars()]

    async def redeliver(self, key: ApiKey, job_id: str) -> WebhookEvent:
        job = await self.get(key, job_id)
        async with self.db.read() as session:
            event = (
                await session.execute(
                    select(WebhookEvent).where(col(WebhookEvent.subject_id) == job.id)
                )
            ).scalar_one_or_none()
        if event is None:
            raise NotFound(f"job {job_id} has no webhook event (no callback_url, or not ended)")
        await queue.enqueue_redelivery(
            self.redis, self.settings.common.queue_name, event.id, new_id("rd")
        )
        return event

    async def counts_by_status(self) -> dict[str, int]:
        async with self.db.read() as session:
            rows = await session.execute(
                select(col(Job.status), func.count()).group_by(col(Job.status))
            )
            return {status: int(n) for status, n in rows.all()}
