"""How long one run may last: the job's own timeout, the plan's lifetime counted from the
job's creation, and, on capped plans, the sandbox-hours left this month. Whichever is
shortest becomes the sandbox's timeout, and names the termination reason if it is reached.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from billing.plans import Plan, Plans
from billing.quota import account_state
from bulkhead.db import Database
from bulkhead.models import ApiKey, Job, aware


@dataclass(frozen=True)
class RunLimits:
    timeout_s: float
    reason_at_timeout: str  # timeout | lifetime_exceeded | quota_exceeded
    key: ApiKey | None
    plan: Plan | None


async def run_limits(db: Database, plans: Plans, job: Job, now: datetime) -> RunLimits:
    async with db.read() as session:
        key = await session.get(ApiKey, job.api_key_id)
        plan = plans.by_name.get(key.plan) if key is not None else None
        state = None
        if plan is not None and plan.included_seconds is not None:
            state = await account_state(session, job.api_key_id, now)
    candidates: list[tuple[float, str]] = [(job.timeout_s, "timeout")]
    if plan is not None:
        created = aware(job.created_at)
        assert created is not None
        age = (now - created).total_seconds()
        candidates.append((plan.max_lifetime_s - age, "lifetime_exceeded"))
        if state is not None and plan.included_seconds is not None:
            # this job is running already and holds 1 s of state.held_s itself
            budget = plan.included_seconds - state.used_s - (state.held_s - 1)
            candidates.append((float(budget), "quota_exceeded"))
    timeout_s, reason = min(candidates, key=lambda c: c[0])
    return RunLimits(max(0.0, timeout_s), reason, key, plan)
