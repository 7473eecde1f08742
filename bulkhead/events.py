"""Webhook events, written in the same transaction as the state change they announce.

One event per (subject, type): the unique constraint makes a second attempt to announce the
same end a no-op, so a job has exactly one ``job.completed`` event id however often it ends.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession
from sqlmodel import col

from bulkhead.ids import new_id
from bulkhead.models import ApiKey, Job, WebhookEvent

JOB_COMPLETED = "job.completed"


async def add_job_completed(session: AsyncSession, job: Job) -> WebhookEvent | None:
    """Queue the ``job.completed`` event for ``job`` (already ended) if it has a target."""
    url = job.callback_url
    if url is None:
        key = await session.get(ApiKey, job.api_key_id)
        url = key.webhook_url if key is not None else None
    if url is None:
        return None
    existing = (
        await session.execute(
            select(WebhookEvent).where(
                col(WebhookEvent.subject_id) == job.id, col(WebhookEvent.type) == JOB_COMPLETED
            )
        )
    ).scalar_one_or_none()
    if existing is not None:
        return existing
    event = WebhookEvent(
        id=new_id("msg"),
        api_key_id=job.api_key_id,
        subject_id=job.id,
        type=JOB_COMPLETED,
        url=url,
        payload=envelope(JOB_COMPLETED, job.public()),
    )
    session.add(event)
    return event


def envelope(
    event_type: str, data: dict[str, Any], timestamp: str | None = None
) -> dict[str, Any]:
    return {"type": event_type, "timestamp": timestamp or data.get("finished_at"), "data": data}
