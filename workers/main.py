"""The worker process: an arq worker that starts jobs as soon as they are enqueued.

arq polls its queue every ``poll_delay`` (0.5 s by default), which would add up to half a
second to every job. ``WakeableWorker`` instead blocks on a Redis list (``BLPOP``) that
``bulkhead.queue`` pushes to with every enqueue, and polls immediately when woken. When every
slot (``BULKHEAD_WORKER_MAX_JOBS``) is busy it waits for a job to end instead, and polls the
moment one does. The poll delay remains only as the fallback for deferred jobs (webhook
retries) and crons.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from arq import cron
from arq.connections import RedisSettings, create_pool
from arq.worker import Worker, func
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError

from billing.metering import MeterSender
from bulkhead import queue, telemetry
from bulkhead.db import Database
from workers.billing_crons import enforce_quotas, flush_usage
from workers.reconcile import reconcile_jobs
from workers.runner import Deps, run_job
from workers.sandbox_reaper import reap_sandboxes
from workers.settings import WorkerSettings
from workers.vmhost_client import VmhostPool
from workers.webhooks import WebhookSender, deliver_webhook

log = logging.getLogger("bulkhead.worker")
POLL_FALLBACK_S = 0.5
MAX_JOB_S = 86400 + 600  # arq's own timeout: above the longest sandbox lifetime


class WakeableWorker(Worker):
    """arq's Worker with its poll sleep replaced by a wake-up list (see module doc)."""

    def __init__(self, *args: Any, redis_url: str, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._redis_url = redis_url
        self._slot_freed = asyncio.Event()

    async def start_jobs(self, job_ids: list[bytes]) -> None:
        # arq lists jobs still running here among the queued ones and spends three Redis
        # round trips per id to find that out; skip the ones this worker is running.
        running = self.tasks
        await super().start_jobs([j for j in job_ids if j.decode() not in running])

    def _release_sem_dec_counter_on_complete(self) -> None:
        super()._release_sem_dec_counter_on_complete()
        self._slot_freed.set()  # a job ended: look for the next one now, not at the next poll

    async def main(self) -> None:
        if self._pool is None:
            self._pool = await create_pool(
                self.redis_settings,
                job_deserializer=self.job_deserializer,
                job_serializer=self.job_serializer,
                default_queue_name=self.queue_name,
                expires_extra_ms=self.expires_extra_ms,
            )
        self.ctx["redis"] = self._pool
        if self.on_startup:
            await self.on_startup(self.ctx)
        wake = Redis.from_url(self._redis_url)
        try:
            while True:
                self._slot_freed.clear()
                await self._poll_iteration()
                if self.job_counter >= self.max_jobs:
                    # every slot is busy: the next pick-up happens when one frees
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._slot_freed.wait(), POLL_FALLBACK_S)
                    continue
                try:
                    await wake.blpop([queue.WAKE_KEY], timeout=POLL_FALLBACK_S)
                except (RedisConnectionError, OSError):
                    await asyncio.sleep(POLL_FALLBACK_S)
        finally:
            await wake.aclose()


def build_worker(settings: WorkerSettings) -> WakeableWorker:
    async def startup(ctx: dict[str, Any]) -> None:
        db = Database(settings.common.database_url)
        await db.migrate()
        vmhosts = VmhostPool(settings.vmhost_urls, settings.vmhost_token)
        await vmhosts.start()
        sender = WebhookSender(settings.webhook_timeout_s, settings.webhook_allow_private)
        await sender.start()
        ctx["deps"] = Deps(settings=settings, db=db, redis=ctx["redis"], vmhosts=vmhosts)
        ctx["webhooks"] = sender
        if settings.stripe.api_key is not None:
            ctx["meter_sender"] = MeterSender(settings.stripe)
        log.info("worker ready: vmhosts %s", ", ".join(settings.vmhost_urls))

    async def shutdown(ctx: dict[str, Any]) -> None:
        deps: Deps | None = ctx.get("deps")
        if deps is not None:
            await deps.vmhosts.close()
            await deps.db.close()
        sender: WebhookSender | None = ctx.get("webhooks")
        if sender is not None:
            await sender.close()

    every = settings.reconcile_every_s
    worker = WakeableWorker(
        functions=[
            func(run_job, name=queue.RUN_JOB, timeout=MAX_JOB_S, max_tries=1000),
            func(deliver_webhook, name=queue.DELIVER_WEBHOOK, timeout=60, max_tries=5),
        ],
        cron_jobs=[
            cron(fn, second=set(range(0, 60, every)), unique=True, timeout=300, run_at_startup=True)
            for fn in (reconcile_jobs, enforce_quotas, flush_usage)
        ]
        + [
            cron(
                reap_sandboxes,
                second=set(range(0, 60, settings.reap_every_s)),
                unique=True,
                timeout=300,
                run_at_startup=True,
            )
        ],
        redis_settings=RedisSettings.from_dsn(settings.common.redis_url),
        queue_name=settings.common.queue_name,
        max_jobs=settings.max_jobs,
        poll_delay=POLL_FALLBACK_S,
        keep_result=60,
        on_startup=startup,
        on_shutdown=shutdown,
        handle_signals=True,
        redis_url=settings.common.redis_url,
    )
    return worker


def run(settings: WorkerSettings) -> None:
    provider = telemetry.setup_tracing("worker")
    build_worker(settings).run()
    if provider is not None:
        provider.shutdown()
