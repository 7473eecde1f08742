"""Usage reports over the ledger, for one API key.

``report`` returns the DESIGN §2 shape: totals, the quota block for the current calendar month
(UTC) and day or month buckets for the asked range. ``to_csv`` renders the buckets.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession
from sqlmodel import col

from billing.errors import InvalidPeriod
from billing.plans import Plan
from bulkhead.db import Database
from bulkhead.models import ApiKey, UsageRecord, aware, iso

MAX_RANGE = timedelta(days=366)


@dataclass(frozen=True)
class Period:
    start: datetime
    end: datetime  # exclusive


def month_of(moment: datetime) -> Period:
    start = moment.astimezone(UTC).replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    end = (start + timedelta(days=32)).replace(day=1)
    return Period(start, end)


def parse_range(raw_from: str | None, raw_to: str | None, now: datetime) -> Period:
    """``from``/``to`` as ISO dates or datetimes (UTC); default: the current month."""
    default = month_of(now)
    start = _parse_moment(raw_from, "from") if raw_from else default.start
    end = _parse_moment(raw_to, "to") if raw_to else default.end
    if end <= start:
        raise InvalidPeriod("'to' must be after 'from'")
    if end - start > MAX_RANGE:
        raise InvalidPeriod("a usage report covers at most 366 days")
    return Period(start, end)


def _parse_moment(raw: str, name: str) -> datetime:
    try:
        value = datetime.fromisoformat(raw.replace("Z", "+00:00"))
    except ValueError as exc:
        raise InvalidPeriod(f"'{name}' must be an ISO 8601 date or datetime") from exc
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _bucket_start(moment: datetime, granularity: str) -> datetime:
    day = moment.astimezone(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    return day.replace(day=1) if granularity == "month" else day


def _empty() -> dict[str, Any]:
    return {"sandbox_seconds": 0, "jobs": 0, "sandboxes": 0, "vcpu_seconds": 0, "gib_seconds": 0.0}


def _add(acc: dict[str, Any], row: UsageRecord) -> None:
    acc["sandbox_seconds"] += row.seconds
    acc["jobs" if row.subject_type == "job" else "sandboxes"] += 1
    acc["vcpu_seconds"] += row.vcpu_seconds
    acc["gib_seconds"] = round(acc["gib_seconds"] + row.gib_seconds, 3)


def _finish(acc: dict[str, Any]) -> dict[str, Any]:
    return {**acc, "sandbox_hours": round(acc["sandbox_seconds"] / 3600, 4)}


async def _rows(db: Database, key_id: str, period: Period) -> list[UsageRecord]:
    async with db.read() as session:
        result = await session.execute(
            select(UsageRecord)
            .where(
                col(UsageRecord.api_key_id) == key_id,
                col(UsageRecord.ended_at) >= period.start,
                col(UsageRecord.ended_at) < period.end,
            )
            .order_by(col(UsageRecord.ended_at))
        )
        return list(result.scalars())


async def used_seconds(session: AsyncSession, key_id: str, period: Period) -> int:
    total = await session.scalar(
        select(func.coalesce(func.sum(col(UsageRecord.seconds)), 0)).where(
            col(UsageRecord.api_key_id) == key_id,
            col(UsageRecord.ended_at) >= period.start,
            col(UsageRecord.ended_at) < period.end,
        )
    )
    return int(total or 0)


async def quota(db: Database, key: ApiKey, plan: Plan, now: datetime) -> dict[str, Any]:
    period = month_of(now)
    async with db.read() as session:
        used_s = await used_seconds(session, key.id, period)
    included = plan.included_hours
    used_h = round(used_s / 3600, 4)
    return {
        "plan": plan.name,
        "included_hours": included,
        "used_hours": used_h,
        "remaining_hours": None if included is None else round(max(0.0, included - used_h), 4),
        "period": {"start": iso(period.start), "end": iso(period.end)},
    }


async def report(
    db: Database, key: ApiKey, plan: Plan, period: Period, granularity: str, now: datetime
) -> dict[str, Any]:
    if granularity not in ("day", "month"):
        raise InvalidPeriod("granularity must be 'day' or 'month'")
    totals = _empty()
    buckets: dict[datetime, dict[str, Any]] = {}
    for row in await _rows(db, key.id, period):
        ended = aware(row.ended_at)
        assert ended is not None
        _add(totals, row)
        _add(buckets.setdefault(_bucket_start(ended, granularity), _empty()), row)
    return {
        "object": "usage",
        "key_id": key.id,
        "from": iso(period.start),
        "to": iso(period.end),
        "granularity": granularity,
        "totals": _finish(totals),
        "quota": await quota(db, key, plan, now),
        "buckets": [
            {"start": iso(start), **_finish(values)} for start, values in sorted(buckets.items())
        ],
    }


CSV_COLUMNS = (
    "start",
    "sandbox_seconds",
    "sandbox_hours",
    "jobs",
    "sandboxes",
    "vcpu_seconds",
    "gib_seconds",
)


def to_csv(usage: dict[str, Any]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=CSV_COLUMNS, extrasaction="ignore")
    writer.writeheader()
    for bucket in usage["buckets"]:
        writer.writerow(bucket)
    return out.getvalue()


async def records(db: Database, key: ApiKey, limit: int, cursor: str | None) -> dict[str, Any]:
    """The key's ledger, one row per sandbox or job run, newest first, cursor-paginated."""
    query = select(UsageRecord).where(col(UsageRecord.api_key_id) == key.id)
    if cursor is not None:
        query = query.where(col(UsageRecord.id) < cursor)
    query = query.order_by(col(UsageRecord.id).desc()).limit(limit + 1)
    async with db.read() as session:
        rows = list((await session.execute(query)).scalars())
    more = len(rows) > limit
    rows = rows[:limit]
    return {
        "object": "list",
        "data": [
            {
                "id": r.id,
                "subject_type": r.subject_type,
                "subject_id": r.subject_id,
                "started_at": iso(r.started_at),
                "ended_at": iso(r.ended_at),
                "sandbox_seconds": r.seconds,
                "vcpus": r.vcpus,
                "memory_mb": r.memory_mb,
                "vcpu_seconds": r.vcpu_seconds,
                "gib_seconds": r.gib_seconds,
            }
            for r in rows
        ],
        "has_more": more,
        "next_cursor": rows[-1].id if more and rows else None,
    }
