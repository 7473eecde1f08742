"""Billing crons: stop running jobs of accounts past their quota, send usage to Stripe.

``enforce_quotas``: a single job is stopped at its quota line by its own timeout (see
``workers/limits.py``); this catches the case of several runs of one account together
crossing it. Their stop is requested like a cancel, with ``cancel_reason='quota_exceeded'``.

``flush_usage``: sends the meter-event outbox through the Stripe SDK (``billing.metering``).
Without ``BULKHEAD_STRIPE_API_KEY`` it logs once that metering is off; the outbox keeps the
usage until a key is configured.
"""

from __future__ import annotations

import logging
from typing import Any

from sqlalchemy import select, update
from sqlmodel import col

from billing.metering import MeterSender, flush_outbox
from billing.quota import account_state
from bulkhead.models import ApiKey, Job, utcnow
from workers.runner import Deps

log = logging.getLogger("bulkhead.worker.billing")


async def enforce_quotas(ctx: dict[str, Any]) -> dict[str, int]:
    deps: Deps = ctx["deps"]
    now = utcnow()
    async with deps.db.read() as session:
        keys = (
            await session.execute(
                select(ApiKey)
                .join(Job, col(Job.api_key_id) == col(ApiKey.id))
                .where(col(Job.status) == "running", col(Job.cancel_requested).is_(False))
                .distinct()
            )
        ).scalars()
        over = []
        for key in list(keys):
            plan = deps.settings.plans.by_name.get(key.plan)
            if plan is None or plan.included_seconds is None:
                continue
            state = await account_state(session, key.id, now)
            if state.committed_s >= plan.included_seconds:
                over.append(key.id)
    stopped = 0
    for key_id in over:
        async with deps.db.session() as session:
            result = await session.execute(
                update(Job)
                .where(col(Job.api_key_id) == key_id, col(Job.status) == "running")
                .values(cancel_requested=True, cancel_reason="quota_exceeded")
            )
            await session.commit()
        stopped += result.rowcount  # type: ignore[attr-defined]
        log.info("account %s is past its quota: stopping its running jobs", key_id)
    return {"accounts_over_quota": len(over), "jobs_stopped": stopped}


async def flush_usage(ctx: dict[str, Any]) -> dict[str, int]:
    deps: Deps = ctx["deps"]
    sender: MeterSender | None = ctx.get("meter_sender")
    if sender is None:
        if not ctx.get("metering_off_logged"):
            log.warning("metering to Stripe is off: BULKHEAD_STRIPE_API_KEY is not set")
            ctx["metering_off_logged"] = True
        return {}
    return await flush_outbox(deps.db, sender)
