"""Ending a held-open sandbox: ask its vmhost, then record the end and its usage at once.

``end_sandbox`` is what the gateway's ``DELETE`` and the workers' reaper both call. The
vmhost ends the sandbox (idempotently) and answers with its real start and end; then one
transaction marks the row ``ended``, writes the ledger row (``charge_run``: one row per
sandbox, keyed by the sandbox id, so a repeated end never bills twice), queues the Stripe
meter event and any quota events. If the vmhost cannot be reached nothing is written and
the caller tries again later; if the vmhost no longer knows the sandbox (it restarted), the
end is recorded at the time the control plane found out.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlmodel import col

from billing.charges import Run, charge_run
from billing.plans import Plans
from bulkhead.db import Database
from bulkhead.models import TERMINATION_REASONS, ApiKey, Sandbox, WebhookEvent, aware, utcnow
from bulkhead.vmhost_api import parse_time

log = logging.getLogger("bulkhead.billing.sandboxes")
EndCall = Callable[[str, str, str], Awaitable[dict[str, Any] | None]]


@dataclass(frozen=True)
class Ended:
    sandbox: Sandbox
    events: list[WebhookEvent]  # quota events to enqueue for delivery


async def end_sandbox(
    db: Database,
    call_end: EndCall,
    sandbox: Sandbox,
    reason: str,
    plans: Plans,
    meter_event_name: str,
    error: str | None = None,
) -> Ended:
    """End ``sandbox`` with ``reason`` (raises the client's error if its vmhost is down)."""
    reason = reason if reason in TERMINATION_REASONS else "internal_error"
    record: dict[str, Any] | None = None
    if sandbox.state != "ended" and sandbox.vmhost_url:
        record = await call_end(sandbox.vmhost_url, sandbox.id, reason)
    now = utcnow()
    record_times = record or {}
    started = parse_time(record_times.get("started_at")) or aware(sandbox.started_at)
    ended = parse_time(record_times.get("ended_at")) or now
    if record is not None and record.get("end_reason") not in (None, "canceled", reason):
        # it ended by itself first (oom, its hard deadline, the vmhost shutting down)
        own = str(record["end_reason"])
        reason = own if own in TERMINATION_REASONS else "internal_error"
    if record is None and sandbox.vmhost_url and sandbox.state == "running" and error is None:
        error = "the vmhost no longer had this sandbox (it restarted or lost it)"
    return await record_end(db, sandbox.id, reason, started, ended, plans, meter_event_name, error)


async def record_end(
    db: Database,
    sandbox_id: str,
    reason: str,
    started_at: datetime | None,
    ended_at: datetime,
    plans: Plans,
    meter_event_name: str,
    error: str | None = None,
) -> Ended:
    async with db.session() as session:
        row = (
            await session.execute(
                select(Sandbox).where(col(Sandbox.id) == sandbox_id).with_for_update()
            )
        ).scalar_one()
        if row.state == "ended":  # someone else recorded it first
            await session.rollback()
            return Ended(row, [])
        row.state = "ended"
        row.termination_reason = reason
        row.ended_at = ended_at
        row.error_message = error
        events: list[WebhookEvent] = []
        if started_at is not None:
            row.started_at = started_at
            key = await session.get(ApiKey, row.api_key_id)
            assert key is not None
            run = Run(
                subject_type="sandbox",
                subject_id=row.id,
                started_at=started_at,
                ended_at=max(ended_at, started_at),
                vcpus=row.vcpus,
                memory_mb=row.memory_mb,
                stopped_at_quota=reason == "quota_exceeded",
            )
            usage, events = await charge_run(
                session, key, plans.by_name.get(key.plan), run, meter_event_name
            )
            row.sandbox_seconds = usage.seconds
        await session.commit()
        await session.refresh(row)
    log.info("sandbox %s ended: %s (%s s)", sandbox_id, reason, row.sandbox_seconds)
    return Ended(row, events)
