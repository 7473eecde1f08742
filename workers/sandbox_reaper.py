"""The ``reap_sandboxes`` cron: every held-open sandbox ends, on time, billed once.

Each pass (every ``BULKHEAD_REAP_EVERY_S``, default 1 s; arq runs it on one worker at a
time) ends, through ``billing.sandbox_end``:

- running sandboxes past ``expires_at``: ``timeout``, or ``lifetime_exceeded`` when that
  was the 24 h (plan lifetime) ceiling;
- running sandboxes of accounts whose used plus running time reached the plan's included
  hours: ``quota_exceeded`` (billed up to the line, never past it);
- sandboxes stuck in ``starting`` (their gateway died mid-create): ``internal_error``;
- sandboxes their vmhost ended by itself (agent died, OOM, its hard deadline) or no longer
  knows (it restarted), with the vmhost's reason and times.

A vmhost that cannot be reached is skipped and tried again on the next pass; its own hard
deadline stops its sandboxes meanwhile. Every end is idempotent.
"""

from __future__ import annotations

import logging
from datetime import timedelta
from typing import Any

from sqlalchemy import or_, select
from sqlmodel import col

from billing.quota import account_state
from billing.sandbox_end import Ended, end_sandbox
from bulkhead import queue
from bulkhead.models import ApiKey, Sandbox, utc, utcnow
from bulkhead.vmhost_api import VmhostClient, VmhostDown
from workers.runner import Deps

log = logging.getLogger("bulkhead.worker.reaper")
STARTING_GRACE_S = 180.0  # longer than a cold microVM start under TCG


async def reap_sandboxes(ctx: dict[str, Any]) -> dict[str, int]:
    deps: Deps = ctx["deps"]
    client: VmhostClient = deps.vmhosts  # runs and sandbox calls share one session
    now = utcnow()
    plans = deps.settings.plans
    due: dict[str, tuple[Sandbox, str]] = {}
    async with deps.db.read() as session:
        rows = (
            await session.execute(
                select(Sandbox).where(
                    col(Sandbox.state).in_(("starting", "running")),
                    or_(
                        col(Sandbox.expires_at) <= now,
                        col(Sandbox.state) == "starting",
                        col(Sandbox.end_requested).is_not(None),
                    ),
                )
            )
        ).scalars()
        for row in rows:
            if row.state == "starting":
                if utc(row.created_at) + timedelta(seconds=STARTING_GRACE_S) < now:
                    due[row.id] = (row, "internal_error")
            elif row.end_requested:
                due[row.id] = (row, row.end_requested)
            else:
                at_ceiling = utc(row.expires_at) >= utc(row.lifetime_ends_at)
                due[row.id] = (row, "lifetime_exceeded" if at_ceiling else "timeout")
        keys = (
            await session.execute(
                select(ApiKey)
                .join(Sandbox, col(Sandbox.api_key_id) == col(ApiKey.id))
                .where(col(Sandbox.state) == "running")
                .distinct()
            )
        ).scalars()
        for key in list(keys):
            plan = plans.by_name.get(key.plan)
            if plan is None or plan.included_seconds is None:
                continue
            state = await account_state(session, key.id, now)
            if state.committed_s < plan.included_seconds:
                continue
            over = await session.execute(
                select(Sandbox).where(
                    col(Sandbox.api_key_id) == key.id, col(Sandbox.state) == "running"
                )
            )
            for row in over.scalars():
                due.setdefault(row.id, (row, "quota_exceeded"))
    counts = {"ended": 0, "vmhost_unreachable": 0, "reconciled": 0}
    for row, reason in due.values():
        await _end(ctx, deps, client, row, reason, counts)
    await _reconcile(ctx, deps, client, set(due), counts)
    return counts


async def _end(
    ctx: dict[str, Any],
    deps: Deps,
    client: VmhostClient,
    row: Sandbox,
    reason: str,
    counts: dict[str, int],
    error: str | None = None,
) -> None:
    try:
        ended = await end_sandbox(
            deps.db, client.end, row, reason, deps.settings.plans,
            deps.settings.stripe.event_name, error,
        )  # fmt: skip
    except VmhostDown as exc:
        counts["vmhost_unreachable"] += 1
        log.warning("sandbox %s: cannot end it yet: %s", row.id, exc)
        return
    counts["ended"] += 1
    await _deliver(deps, ended)


async def _deliver(deps: Deps, ended: Ended) -> None:
    for event in ended.events:
        await queue.enqueue_webhook(deps.redis, deps.settings.common.queue_name, event.id, 1)


async def _reconcile(
    ctx: dict[str, Any], deps: Deps, client: VmhostClient, handled: set[str], counts: dict[str, int]
) -> None:
    """End running rows whose vmhost ended them on its own or no longer has them."""
    async with deps.db.read() as session:
        running = list(
            (
                await session.execute(select(Sandbox).where(col(Sandbox.state) == "running"))
            ).scalars()
        )
    by_host: dict[str, list[Sandbox]] = {}
    for row in running:
        if row.id not in handled and row.vmhost_url:
            by_host.setdefault(row.vmhost_url, []).append(row)
    for url, rows in by_host.items():
        try:
            listed = {str(r.get("sandbox_id")): r for r in await client.list(url)}
        except VmhostDown:
            counts["vmhost_unreachable"] += 1
            continue
        for row in rows:
            record = listed.get(row.id)
            if record is not None and record.get("state") == "running":
                continue
            reason = (
                str(record.get("end_reason") or "internal_error") if record else "internal_error"
            )
            counts["reconciled"] += 1
            await _end(ctx, deps, client, row, reason, counts)
