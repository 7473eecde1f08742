"""The ledger and usage reports on a real database."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from billing.errors import InvalidPeriod
from billing.ledger import billable_seconds, record_usage
from billing.plans import Plans
from billing.usage import Period, parse_range, report, to_csv
from bulkhead.db import Database
from bulkhead.keys import create_key

T0 = datetime(2026, 11, 3, 10, 0, tzinfo=UTC)
FREE = Plans.from_env({}).get("free")


def test_billable_seconds_round_up_to_whole_seconds() -> None:
    assert billable_seconds(T0, T0 + timedelta(milliseconds=30)) == 1
    assert billable_seconds(T0, T0 + timedelta(seconds=2, milliseconds=1)) == 3
    assert billable_seconds(T0, T0 + timedelta(seconds=5)) == 5


async def test_one_row_per_run_and_report(db: Database) -> None:
    key = await create_key(db, "u")
    other = await create_key(db, "v")
    runs = [("job_a", T0, 2), ("job_b", T0 + timedelta(days=1), 3), ("job_c", T0, 7)]
    async with db.session() as session:
        for subject, start, secs in runs:
            owner = other.key.id if subject == "job_c" else key.key.id
            await record_usage(
                session,
                api_key_id=owner,
                subject_type="job",
                subject_id=subject,
                started_at=start,
                ended_at=start + timedelta(seconds=secs),
                vcpus=2,
                memory_mb=512,
            )
        # recording the same run again adds nothing
        await record_usage(
            session,
            api_key_id=key.key.id,
            subject_type="job",
            subject_id="job_a",
            started_at=T0,
            ended_at=T0 + timedelta(seconds=99),
            vcpus=2,
            memory_mb=512,
        )
        await session.commit()
    period = Period(datetime(2026, 11, 1, tzinfo=UTC), datetime(2026, 12, 1, tzinfo=UTC))
    usage = await report(db, key.key, FREE, period, "day", T0)
    assert usage["totals"]["sandbox_seconds"] == 5
    assert usage["totals"]["jobs"] == 2
    assert usage["totals"]["vcpu_seconds"] == 10
    assert usage["totals"]["gib_seconds"] == 2.5
    assert [b["sandbox_seconds"] for b in usage["buckets"]] == [2, 3]
    assert usage["quota"]["used_hours"] == round(5 / 3600, 4)
    monthly = await report(db, key.key, FREE, period, "month", T0)
    assert len(monthly["buckets"]) == 1
    assert to_csv(usage).splitlines()[1].startswith("2026-11-03T00:00:00Z,2,")


def test_parse_range() -> None:
    p = parse_range(None, None, T0)
    assert p.start == datetime(2026, 11, 1, tzinfo=UTC)
    assert p.end == datetime(2026, 12, 1, tzinfo=UTC)
    with pytest.raises(InvalidPeriod):
        parse_range("2026-01-01", "2028-01-01", T0)
    with pytest.raises(InvalidPeriod):
        parse_range("yesterday", None, T0)


async def test_usage_table(db: Database) -> None:
    from billing.report_table import usage_table

    key = await create_key(db, "team-a")
    async with db.session() as session:
        await record_usage(session, api_key_id=key.key.id, subject_type="job", subject_id="j1",
                           started_at=T0, ended_at=T0 + timedelta(seconds=36), vcpus=1,
                           memory_mb=512)  # fmt: skip
        await session.commit()
    table = await usage_table(db, Plans.from_env({}), None, "2026-11")
    lines = table.splitlines()
    assert lines[0] == "usage 2026-11 (UTC)"
    assert lines[2].split() == [key.key.id, "team-a", "free", "1", "0", "0.0100", "100",
                                "99.9900"]  # fmt: skip
    with pytest.raises(InvalidPeriod):
        await usage_table(db, Plans.from_env({}), None, "2026-13")
