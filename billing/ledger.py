"""The usage ledger: one row per sandbox run, written in the transaction that ends the run.

Seconds are counted from the sandbox's real start to its real end at one-second resolution
(rounded up, at least 1). ``subject_id`` is unique, so a run is never recorded twice.
"""

from __future__ import annotations

import math
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession
from sqlmodel import col

from bulkhead.ids import new_id
from bulkhead.models import UsageRecord


def billable_seconds(started_at: datetime, ended_at: datetime) -> int:
    return max(1, math.ceil((ended_at - started_at).total_seconds()))


async def record_usage(
    session: AsyncSession,
    *,
    api_key_id: str,
    subject_type: str,
    subject_id: str,
    started_at: datetime,
    ended_at: datetime,
    vcpus: int,
    memory_mb: int,
    max_seconds: int | None = None,
) -> UsageRecord:
    """Add the ledger row for one run (or return the one already there).

    ``max_seconds`` caps the billed time of a run that was stopped at its quota line, so
    rounding up to whole seconds never bills past the plan's included time.
    """
    existing = (
        await session.execute(select(UsageRecord).where(col(UsageRecord.subject_id) == subject_id))
    ).scalar_one_or_none()
    if existing is not None:
        return existing
    seconds = billable_seconds(started_at, ended_at)
    if max_seconds is not None:
        seconds = max(1, min(seconds, max_seconds))
    row = UsageRecord(
        id=new_id("usg"),
        api_key_id=api_key_id,
        subject_type=subject_type,
        subject_id=subject_id,
        started_at=started_at,
        ended_at=ended_at,
        seconds=seconds,
        vcpus=vcpus,
        memory_mb=memory_mb,
        vcpu_seconds=seconds * vcpus,
        gib_seconds=round(seconds * memory_mb / 1024, 3),
    )
    session.add(row)
    return row
