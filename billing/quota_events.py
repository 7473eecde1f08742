"""Account events: ``quota.warning`` at 80 % and ``quota.exhausted`` at 100 % of a plan's
included hours, at most once per calendar month each (the event's subject is the account and
the month, unique per type), signed and retried like job webhooks, sent to the key's
webhook URL (``PUT /v1/account/webhook``). Written in the transaction that writes the ledger
row which crosses the line.
"""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession
from sqlmodel import col

from billing.plans import Plan
from billing.usage import Period
from bulkhead.events import envelope
from bulkhead.ids import new_id
from bulkhead.models import ApiKey, WebhookEvent, iso, utcnow

THRESHOLDS = ((0.8, "quota.warning"), (1.0, "quota.exhausted"))


async def check_thresholds(
    session: AsyncSession, key: ApiKey, plan: Plan, period: Period, before_s: int, after_s: int
) -> list[WebhookEvent]:
    """Events for every threshold that ``before_s`` → ``after_s`` crossed (once per month)."""
    if plan.included_seconds is None or key.webhook_url is None:
        return []
    included = plan.included_seconds
    events = []
    subject = f"quota:{key.id}:{period.start:%Y-%m}"
    for share, event_type in THRESHOLDS:
        line = share * included
        if not before_s < line <= after_s:
            continue
        exists = await session.scalar(
            select(col(WebhookEvent.id)).where(
                col(WebhookEvent.subject_id) == subject, col(WebhookEvent.type) == event_type
            )
        )
        if exists is not None:
            continue
        data = {
            "object": "quota",
            "key_id": key.id,
            "plan": plan.name,
            "threshold": share,
            "included_hours": plan.included_hours,
            "used_hours": round(after_s / 3600, 4),
            "period": {"start": iso(period.start), "end": iso(period.end)},
        }
        event = WebhookEvent(
            id=new_id("msg"),
            api_key_id=key.id,
            subject_id=subject,
            type=event_type,
            url=key.webhook_url,
            payload=envelope(event_type, data, iso(utcnow())),
        )
        session.add(event)
        events.append(event)
    return events
