"""What billing does when a sandbox run ends, inside the transaction that ends it.

One call writes the ledger row, queues the Stripe meter event for metered plans and adds
``quota.warning`` / ``quota.exhausted`` events when this run crossed 80 % / 100 % of the
plan's included hours. The account row is locked first, so concurrent ends of one account's
runs see each other's usage (PostgreSQL; SQLite transactions here hold the write lock).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy.ext.asyncio import AsyncSession

from billing.ledger import record_usage
from billing.metering import add_to_outbox
from billing.plans import Plan
from billing.quota import lock_account
from billing.quota_events import check_thresholds
from billing.usage import month_of, used_seconds
from bulkhead.models import ApiKey, UsageRecord, WebhookEvent


@dataclass(frozen=True)
class Run:
    subject_type: str  # job | sandbox
    subject_id: str
    started_at: datetime
    ended_at: datetime
    vcpus: int
    memory_mb: int
    stopped_at_quota: bool = False  # ended with quota_exceeded: bill at most what was left


async def charge_run(
    session: AsyncSession, key: ApiKey, plan: Plan | None, run: Run, meter_event_name: str
) -> tuple[UsageRecord, list[WebhookEvent]]:
    await lock_account(session, key.id)
    period = month_of(run.ended_at)
    before = await used_seconds(session, key.id, period)
    cap = None
    if run.stopped_at_quota and plan is not None and plan.included_seconds is not None:
        cap = max(1, plan.included_seconds - before)  # rounding up never bills past the line
    usage = await record_usage(
        session,
        api_key_id=key.id,
        subject_type=run.subject_type,
        subject_id=run.subject_id,
        started_at=run.started_at,
        ended_at=run.ended_at,
        vcpus=run.vcpus,
        memory_mb=run.memory_mb,
        max_seconds=cap,
    )
    if plan is None:
        return usage, []
    add_to_outbox(session, usage, key, plan, meter_event_name)
    events = await check_thresholds(session, key, plan, period, before, before + usage.seconds)
    return usage, events
