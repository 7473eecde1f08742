"""Stripe metering: the meter-event outbox and its flush (Billing Meter Events, official SDK).

Exactly-once in effect:
- the outbox row is written in the transaction that writes the ledger row (``add_to_outbox``),
  so usage is never lost and never queued twice;
- ``flush_outbox`` sends each pending row with ``identifier`` = the ledger row's id and
  ``timestamp`` = the usage's end, then marks it sent. A crash between Stripe accepting the
  event and the row being marked leaves it pending; the resend carries the same identifier,
  Stripe answers that it already has it, and the row is marked sent without billing twice;
- 429, 5xx and connection errors back off exponentially (``BACKOFF_S``) and retry; other
  4xx (an unknown customer, say) mark the row ``failed`` with Stripe's message for an
  operator; a bad API key stops the flush without touching any row.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import stripe
from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession
from sqlmodel import col

from billing.plans import Plan
from bulkhead.db import Database
from bulkhead.models import ApiKey, MeterOutbox, UsageRecord, aware, utcnow

log = logging.getLogger("bulkhead.billing.metering")
BATCH = 100
BACKOFF_S = (5, 15, 60, 300, 900, 1800, 3600)


@dataclass(frozen=True)
class StripeSettings:
    api_key: str | None
    api_base: str | None  # e.g. the fake Stripe server in tests; None = api.stripe.com
    event_name: str
    max_network_retries: int


def add_to_outbox(
    session: AsyncSession, usage: UsageRecord, key: ApiKey, plan: Plan, event_name: str
) -> MeterOutbox | None:
    """Queue ``usage`` for Stripe if the key's plan is metered and has a customer."""
    if not plan.metered or key.stripe_customer_id is None:
        return None
    ended = aware(usage.ended_at)
    assert ended is not None
    row = MeterOutbox(
        id=usage.id,
        api_key_id=key.id,
        stripe_customer_id=key.stripe_customer_id,
        event_name=event_name,
        value=usage.seconds,
        timestamp=int(ended.timestamp()),
    )
    session.add(row)
    return row


class MeterSender:
    """Sends one meter event through the official SDK (synchronous; run in a thread)."""

    def __init__(self, settings: StripeSettings) -> None:
        if settings.api_key is None:
            raise ValueError("no Stripe API key")
        base = (
            {"api": settings.api_base, "meter_events": settings.api_base}
            if settings.api_base
            else None
        )
        self.client = stripe.StripeClient(
            settings.api_key,
            base_addresses=base,  # type: ignore[arg-type]
            max_network_retries=settings.max_network_retries,
        )

    def send(self, row: MeterOutbox) -> None:
        self.client.v1.billing.meter_events.create(
            params={
                "event_name": row.event_name,
                "identifier": row.id,
                "timestamp": row.timestamp,
                "payload": {"stripe_customer_id": row.stripe_customer_id, "value": str(row.value)},
            }
        )


def _already_recorded(exc: stripe.InvalidRequestError) -> bool:
    """Stripe's answer to a resent identifier: it has the event already."""
    text = f"{exc.code or ''} {exc.user_message or ''} {exc}".lower()
    return "identifier" in text and ("duplicate" in text or "already" in text)


async def flush_outbox(db: Database, sender: MeterSender) -> dict[str, int]:
    now = utcnow()
    async with db.read() as session:
        rows = list(
            (
                await session.execute(
                    select(MeterOutbox)
                    .where(col(MeterOutbox.status) == "pending")
                    .where(col(MeterOutbox.next_attempt_at) <= now)
                    .order_by(col(MeterOutbox.created_at))
                    .limit(BATCH)
                )
            ).scalars()
        )
    counts = {"sent": 0, "retry": 0, "failed": 0}
    for row in rows:
        try:
            await asyncio.to_thread(sender.send, row)
        except stripe.AuthenticationError as exc:
            log.error("Stripe refused the API key; metering is paused: %s", exc)
            break
        except stripe.InvalidRequestError as exc:
            if _already_recorded(exc):
                await _mark(db, row.id, status="sent", sent_at=utcnow(), last_error=None)
                counts["sent"] += 1
            else:
                log.error("Stripe rejected meter event %s: %s", row.id, exc)
                await _mark(db, row.id, status="failed", last_error=str(exc)[:1000])
                counts["failed"] += 1
        except (stripe.RateLimitError, stripe.APIError, stripe.APIConnectionError) as exc:
            delay = BACKOFF_S[min(row.attempts, len(BACKOFF_S) - 1)]
            await _mark(
                db, row.id, attempts=row.attempts + 1, last_error=str(exc)[:1000],
                next_attempt_at=utcnow() + timedelta(seconds=delay),
            )  # fmt: skip
            counts["retry"] += 1
            if isinstance(exc, stripe.RateLimitError):
                break  # slow down: the rest waits for the next flush
        else:
            await _mark(db, row.id, status="sent", sent_at=utcnow(), last_error=None)
            counts["sent"] += 1
    return counts


async def _mark(db: Database, row_id: str, **values: Any) -> None:
    async with db.session() as session:
        await session.execute(
            update(MeterOutbox).where(col(MeterOutbox.id) == row_id).values(**values)
        )
        await session.commit()
