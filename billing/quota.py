"""Quota accounting: what an account has used this period and what it holds right now.

Admission is atomic: ``lock_account`` serializes admissions of one account (``SELECT … FOR
UPDATE`` on its key row in PostgreSQL; SQLite transactions here already hold the database's
write lock), and within that transaction ``admit`` counts every queued or running job as
holding at least one second and one concurrency slot (so does every starting or running
held-open sandbox), so concurrent requests at the edge of
a quota or a concurrency limit never over-admit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession
from sqlmodel import col

from billing.errors import ConcurrencyLimit, QuotaExceeded
from billing.plans import Plan
from billing.usage import Period, month_of, used_seconds
from bulkhead.models import ApiKey, Job, Sandbox, aware, iso


@dataclass
class AccountState:
    period: Period
    used_s: int  # ledger seconds this period
    in_flight: int  # jobs queued or running, sandboxes starting or running
    held_s: int  # seconds in-flight work holds: elapsed so far, at least 1 each

    @property
    def committed_s(self) -> int:
        return self.used_s + self.held_s


async def lock_account(session: AsyncSession, key_id: str) -> None:
    await session.execute(select(col(ApiKey.id)).where(col(ApiKey.id) == key_id).with_for_update())


async def account_state(session: AsyncSession, key_id: str, now: datetime) -> AccountState:
    period = month_of(now)
    queued = await session.scalar(
        select(func.count()).where(col(Job.api_key_id) == key_id, col(Job.status) == "queued")
    )
    running = (
        await session.execute(
            select(col(Job.started_at)).where(
                col(Job.api_key_id) == key_id, col(Job.status) == "running"
            )
        )
    ).scalars()
    held = int(queued or 0)  # a queued job holds one second
    count = held
    open_sandboxes = (
        await session.execute(
            select(col(Sandbox.started_at), col(Sandbox.created_at)).where(
                col(Sandbox.api_key_id) == key_id,
                col(Sandbox.state).in_(("starting", "running")),
            )
        )
    ).all()
    starts = [*running, *(started or created for started, created in open_sandboxes)]
    for started_at in starts:
        started = aware(started_at)
        elapsed = (now - started).total_seconds() if started is not None else 0.0
        held += max(1, math.ceil(elapsed))
        count += 1
    return AccountState(period, await used_seconds(session, key_id, period), count, held)


def is_limited(plan: Plan) -> bool:
    return plan.included_seconds is not None or plan.max_concurrent is not None


def admit(plan: Plan, state: AccountState) -> None:
    """Raise if one more sandbox would break the plan; else count it in ``state``."""
    if plan.max_concurrent is not None and state.in_flight >= plan.max_concurrent:
        raise ConcurrencyLimit(
            f"the {plan.name} plan allows {plan.max_concurrent} concurrent sandboxes and "
            f"{state.in_flight} are queued or running; try again when one ends"
        )
    if plan.included_seconds is not None and state.committed_s >= plan.included_seconds:
        raise QuotaExceeded(
            f"the {plan.name} plan includes {_hours(plan.included_seconds)} sandbox-hours per "
            f"month and {_hours(state.committed_s)} are used or held by running sandboxes; "
            f"it resets at {iso(state.period.end)}"
        )
    state.in_flight += 1
    state.held_s += 1


def _hours(seconds: int) -> str:
    return f"{seconds / 3600:.4g}"
