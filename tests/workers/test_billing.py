"""Billing in the worker, on real sandboxes: quota line, lifetime, quota events, and Stripe
metering through the official SDK against the fake Stripe server (exactly once per ledger
row, through injected 429/500s and a crash between sending and recording)."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import func, select, update
from sqlmodel import col

from billing.charges import Run, charge_run
from billing.fake_stripe import FakeStripe
from billing.metering import MeterSender, StripeSettings, flush_outbox
from billing.plans import Plans
from bulkhead.db import Database
from bulkhead.keys import create_key, set_webhook_url
from bulkhead.models import ApiKey, Job, MeterOutbox, UsageRecord, WebhookEvent, utcnow
from tests.workers.conftest import add_job, load
from workers.billing_crons import enforce_quotas
from workers.runner import Deps, run_job

PLANS = Plans.parse(
    {
        "free": {"included_hours": 100},
        "tiny": {"included_seconds": 3},
        "eight": {"included_seconds": 8},
        "short": {"included_hours": 1, "max_lifetime_s": 2},
        "pro": {"included_hours": None, "metered": True, "requires_stripe_customer": True},
    }
)
SLEEP = {"language": "python", "code": "import time; time.sleep(30)", "timeout_s": 60}


@pytest.fixture
def billing_deps(deps: Deps) -> Deps:
    return dataclasses.replace(deps, settings=dataclasses.replace(deps.settings, plans=PLANS))


async def ledger(db: Database, key_id: str) -> list[UsageRecord]:
    async with db.read() as session:
        rows = await session.execute(
            select(UsageRecord).where(col(UsageRecord.api_key_id) == key_id)
        )
        return list(rows.scalars())


async def test_a_run_stops_at_the_quota_line(db: Database, billing_deps: Deps) -> None:
    key = await create_key(db, "t", "tiny")
    job = await add_job(db, key, **SLEEP)
    assert await run_job({"deps": billing_deps}, job.id, 1, {}) == "failed"
    done = await load(db, job.id)
    assert done.termination_reason == "quota_exceeded"
    assert done.duration_ms is not None and 2500 <= done.duration_ms <= 10000
    assert [r.seconds for r in await ledger(db, key.key.id)] == [3]  # never past the line
    # the next job cannot run at all
    again = await add_job(db, key, language="python", code="print(1)")
    await run_job({"deps": billing_deps}, again.id, 1, {})
    refused = await load(db, again.id)
    assert refused.termination_reason == "quota_exceeded" and refused.sandbox_seconds == 0


async def test_nothing_lives_past_the_plan_lifetime(db: Database, billing_deps: Deps) -> None:
    key = await create_key(db, "s", "short")
    job = await add_job(db, key, **SLEEP)
    await run_job({"deps": billing_deps}, job.id, 1, {})
    assert (await load(db, job.id)).termination_reason == "lifetime_exceeded"
    # a job queued for longer than the lifetime never starts
    old = await add_job(db, key, language="python", code="print(1)")
    async with db.session() as session:
        await session.execute(
            update(Job).where(col(Job.id) == old.id)
            .values(created_at=utcnow() - timedelta(seconds=5))
        )  # fmt: skip
        await session.commit()
    await run_job({"deps": billing_deps}, old.id, 1, {})
    stale = await load(db, old.id)
    assert (stale.termination_reason, stale.stdout, stale.sandbox_seconds) == (
        "lifetime_exceeded", "", 0)  # fmt: skip


async def test_the_cron_stops_runs_that_cross_the_line_together(
    db: Database, billing_deps: Deps
) -> None:
    """Alone, the runs would stop at 8 s and 7.5 s; together they cross 8 s at about 4.75 s."""
    key = await create_key(db, "eight", "eight")
    first, second = await add_job(db, key, **SLEEP), await add_job(db, key, **SLEEP)
    ctx = {"deps": billing_deps}
    runs = [asyncio.create_task(run_job(ctx, first.id, 1, {}))]
    await asyncio.sleep(1.5)
    runs.append(asyncio.create_task(run_job(ctx, second.id, 1, {})))
    stopped = 0
    for _ in range(60):
        await asyncio.sleep(0.25)
        stopped += (await enforce_quotas(ctx))["jobs_stopped"]
        if stopped:
            break
    assert stopped >= 1
    await asyncio.gather(*runs)
    done = [await load(db, j.id) for j in (first, second)]
    assert {j.termination_reason for j in done} == {"quota_exceeded"}
    assert sum(r.seconds for r in await ledger(db, key.key.id)) == 8  # exactly the line


async def test_quota_events_are_sent_once_per_period(db: Database) -> None:
    key = await create_key(db, "q", "tiny")
    await set_webhook_url(db, key.key.id, "https://example.com/hooks")
    plan = PLANS.get("tiny")
    end = utcnow()
    for i, seconds in enumerate((2, 1, 1)):  # 2 s = 67 %, 3 s = 100 %, 4 s = 133 %
        async with db.session() as session:
            row = await session.get(ApiKey, key.key.id)
            assert row is not None
            run = Run("job", f"job_{i}", end - timedelta(seconds=seconds), end, 1, 512)
            await charge_run(session, row, plan, run, "bulkhead_sandbox_seconds")
            await session.commit()
    async with db.read() as session:
        events = list((await session.execute(select(WebhookEvent))).scalars())
    assert sorted(e.type for e in events) == ["quota.exhausted", "quota.warning"]
    exhausted = next(e for e in events if e.type == "quota.exhausted")
    assert exhausted.payload["data"]["used_hours"] == round(3 / 3600, 4)
    assert exhausted.url == "https://example.com/hooks"


@pytest.fixture
async def stripe_fake() -> AsyncIterator[tuple[FakeStripe, str]]:
    fake = FakeStripe()
    url = await fake.start()
    yield fake, url
    await fake.close()


def sender_for(fake: FakeStripe, url: str, retries: int = 0) -> MeterSender:
    return MeterSender(StripeSettings(fake.secret_key, url, "bulkhead_sandbox_seconds", retries))


async def pro_key_with_usage(db: Database, fake: FakeStripe, runs: int) -> tuple[Any, int]:
    customer = fake.create_customer(email="pro@example.com")["id"]
    key = await create_key(db, "p", "pro", stripe_customer_id=customer)
    plan = PLANS.get("pro")
    end = utcnow()
    total = 0
    for i in range(runs):
        async with db.session() as session:
            row = await session.get(ApiKey, key.key.id)
            assert row is not None
            run = Run("job", f"job_p{i}", end - timedelta(seconds=i + 1.5), end, 1, 512)
            usage, _ = await charge_run(session, row, plan, run, "bulkhead_sandbox_seconds")
            total += usage.seconds
            await session.commit()
    return customer, total


async def pending(db: Database) -> int:
    async with db.read() as session:
        count = await session.scalar(
            select(func.count()).where(col(MeterOutbox.status) == "pending")
        )
    return int(count or 0)


async def test_metered_usage_reaches_stripe_exactly_once(
    db: Database, stripe_fake: tuple[FakeStripe, str]
) -> None:
    fake, url = stripe_fake
    customer, total = await pro_key_with_usage(db, fake, 6)
    sender = sender_for(fake, url)
    # a crash between Stripe accepting an event and us marking it sent: send one by hand
    async with db.read() as session:
        row = (
            await session.execute(
                select(MeterOutbox).order_by(col(MeterOutbox.created_at)).limit(1)
            )
        ).scalar_one()
    await asyncio.to_thread(sender.send, row)
    # Stripe rate-limits, then fails after recording an event (the answer is lost)
    fake.inject(status=429, count=1)
    assert (await flush_outbox(db, sender))["retry"] == 1
    fake.inject(status=500, count=1, after_apply=True)
    async with db.session() as session:  # retry now instead of after the backoff
        await session.execute(update(MeterOutbox).values(next_attempt_at=utcnow()))
        await session.commit()
    await flush_outbox(db, sender)
    async with db.session() as session:
        await session.execute(update(MeterOutbox).values(next_attempt_at=utcnow()))
        await session.commit()
    for _ in range(5):
        await flush_outbox(db, sender)
        if await pending(db) == 0:
            break
    assert await pending(db) == 0
    assert fake.totals() == {(customer, "bulkhead_sandbox_seconds"): total}
    identifiers = sorted(e["identifier"] for e in fake.meter_events)
    async with db.read() as session:
        ledger_ids = sorted((await session.execute(select(col(UsageRecord.id)))).scalars())
    assert identifiers == ledger_ids  # one meter event per ledger row


async def test_a_free_plan_is_not_metered_and_a_bad_key_pauses(
    db: Database, stripe_fake: tuple[FakeStripe, str]
) -> None:
    fake, url = stripe_fake
    free = await create_key(db, "f", "free")
    async with db.session() as session:
        row = await session.get(ApiKey, free.key.id)
        assert row is not None
        run = Run("job", "job_f", utcnow() - timedelta(seconds=2), utcnow(), 1, 512)
        await charge_run(session, row, PLANS.get("free"), run, "bulkhead_sandbox_seconds")
        await session.commit()
    assert await pending(db) == 0
    await pro_key_with_usage(db, fake, 2)
    wrong = MeterSender(StripeSettings("sk_test_wrong", url, "bulkhead_sandbox_seconds", 0))
    assert await flush_outbox(db, wrong) == {"sent": 0, "retry": 0, "failed": 0}
    assert await pending(db) == 2
