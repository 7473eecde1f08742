"""The queue contract between the gateway and the workers (arq on Redis).

Function names and argument shapes live here so both sides agree; ids are passed, never
objects, and arq job ids are derived from natural keys so enqueueing twice is harmless.
"""

from __future__ import annotations

from typing import Any

from arq.connections import ArqRedis

RUN_JOB = "run_job"
DELIVER_WEBHOOK = "deliver_webhook"

WAKE_KEY = "bulkhead:wake"  # a list workers BLPOP on so new jobs start without polling delay
WAKE_MAX = 1000
JOB_DONE_CHANNEL = "bulkhead:job-done:"  # + job id; published after a job's end is committed


def run_job_id(job_id: str, attempt: int) -> str:
    return f"run:{job_id}:{attempt}"


def webhook_job_id(event_id: str, attempt: int) -> str:
    return f"wh:{event_id}:{attempt}"


async def enqueue_run(
    redis: ArqRedis, queue_name: str, job_id: str, attempt: int, trace: dict[str, str]
) -> None:
    job = await redis.enqueue_job(
        RUN_JOB,
        job_id,
        attempt,
        trace,
        _job_id=run_job_id(job_id, attempt),
        _queue_name=queue_name,
    )
    if job is not None:  # None: that run is already queued (a repeated enqueue is a no-op)
        await wake(redis)


async def enqueue_webhook(
    redis: ArqRedis, queue_name: str, event_id: str, attempt: int, defer_s: float = 0.0
) -> None:
    """Schedule automatic attempt number ``attempt`` (1-based) of an event."""
    kwargs: dict[str, Any] = {
        "_job_id": webhook_job_id(event_id, attempt),
        "_queue_name": queue_name,
    }
    if defer_s > 0:
        kwargs["_defer_by"] = defer_s
    await redis.enqueue_job(DELIVER_WEBHOOK, event_id, attempt, False, **kwargs)
    if defer_s <= 0:
        await wake(redis)


async def enqueue_redelivery(redis: ArqRedis, queue_name: str, event_id: str, token: str) -> None:
    """One manual attempt now; it does not start a new retry schedule."""
    await redis.enqueue_job(
        DELIVER_WEBHOOK, event_id, 0, True, _job_id=f"wh:{event_id}:{token}", _queue_name=queue_name
    )
    await wake(redis)


async def wake(redis: ArqRedis) -> None:
    async with redis.pipeline(transaction=False) as pipe:
        pipe.lpush(WAKE_KEY, b"1")
        pipe.ltrim(WAKE_KEY, 0, WAKE_MAX - 1)
        await pipe.execute()
