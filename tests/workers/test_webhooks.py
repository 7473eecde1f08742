"""Webhook delivery against a real receiver on loopback: signatures, retries, SSRF refusal."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from redis.asyncio import Redis
from sqlalchemy import select
from standardwebhooks.webhooks import Webhook

from bulkhead import queue
from bulkhead.db import Database
from bulkhead.events import add_job_completed
from bulkhead.keys import CreatedKey, create_key
from bulkhead.models import Job, WebhookAttempt, WebhookEvent, utcnow
from bulkhead.settings import CommonSettings
from workers.runner import Deps
from workers.settings import WorkerSettings
from workers.vmhost_client import VmhostPool
from workers.webhooks import WebhookSender, deliver_webhook, next_delay

QUEUE = "bulkhead:test"


class Receiver:
    """A webhook receiver that answers from a script and records what it got."""

    def __init__(self) -> None:
        self.script: list[web.StreamResponse] = []
        self.got: list[tuple[dict[str, str], bytes]] = []

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.got.append((dict(request.headers), await request.read()))
        return self.script.pop(0) if self.script else web.Response(status=200)


@pytest.fixture
async def receiver() -> AsyncIterator[tuple[Receiver, str]]:
    rec = Receiver()
    app = web.Application()
    app.router.add_post("/hook", rec.handle)
    app.router.add_post("/elsewhere", rec.handle)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    yield rec, str(server.make_url("/hook"))
    await server.close()


def worker_settings(db_url: str, redis_url: str, **overrides: Any) -> WorkerSettings:
    base = WorkerSettings.from_env({"BULKHEAD_VMHOST_TOKEN": "unused"})
    common = CommonSettings(database_url=db_url, redis_url=redis_url, queue_name=QUEUE)
    return dataclasses.replace(base, common=common, **overrides)


async def make_ctx(db: Database, redis: Redis, settings: WorkerSettings) -> dict[str, Any]:
    sender = WebhookSender(settings.webhook_timeout_s, settings.webhook_allow_private)
    await sender.start()
    # the vmhost pool is not used by webhook delivery; it points nowhere on purpose
    deps = Deps(
        settings=settings, db=db, redis=redis, vmhosts=VmhostPool(["http://127.0.0.1:9"], "unused")
    )
    return {"deps": deps, "webhooks": sender}


Hooks = Callable[..., Awaitable[tuple[dict[str, Any], CreatedKey]]]


@pytest.fixture
async def hooks(
    db: Database, redis: Redis, redis_url: str, database_url: str
) -> AsyncIterator[Hooks]:
    """Factory: a worker context with these settings overrides, and a fresh API key."""
    senders: list[WebhookSender] = []

    async def make(**overrides: Any) -> tuple[dict[str, Any], CreatedKey]:
        ctx = await make_ctx(db, redis, worker_settings(database_url, redis_url, **overrides))
        senders.append(ctx["webhooks"])
        return ctx, await create_key(db, "hooks")

    yield make
    for sender in senders:
        await sender.close()


async def ended_job_event(db: Database, key: CreatedKey, url: str) -> WebhookEvent:
    async with db.session() as session:
        job = Job(
            id=f"job_{time.time_ns():024x}"[:28],
            api_key_id=key.key.id,
            language="python",
            code="print(1)",
            callback_url=url,
            status="completed",
            exit_code=0,
            stdout="1\n",
            termination_reason="exit",
            finished_at=utcnow(),
        )
        session.add(job)
        await session.flush()
        event = await add_job_completed(session, job)
        await session.commit()
    assert event is not None
    return event


async def attempts(db: Database, event_id: str) -> list[WebhookAttempt]:
    async with db.session() as session:
        rows = await session.execute(
            select(WebhookAttempt)
            .where(WebhookAttempt.event_id == event_id)
            .order_by(WebhookAttempt.attempt)  # type: ignore[arg-type]
        )
        return list(rows.scalars())


async def scheduled(redis: Redis) -> dict[str, float]:
    items = await redis.zrange(QUEUE, 0, -1, withscores=True)
    return {k.decode(): (score / 1000 - time.time()) for k, score in items}


async def test_signed_delivery_verifies_with_standardwebhooks(
    db: Database, redis: Redis, hooks: Hooks, receiver: Any
) -> None:
    rec, url = receiver
    ctx, key = await hooks(webhook_allow_private=True)
    event = await ended_job_event(db, key, url)
    assert await deliver_webhook(ctx, event.id, 1, False) == "delivered"
    headers, body = rec.got[0]
    payload = Webhook(key.key.webhook_secret).verify(body, headers)
    assert payload["type"] == "job.completed"
    assert payload["data"]["stdout"] == "1\n"
    assert headers["webhook-id"] == event.id
    # a repeated arq delivery of the same attempt sends nothing
    assert await deliver_webhook(ctx, event.id, 1, False) == "already_done"
    assert len(rec.got) == 1
    rows = await attempts(db, event.id)
    assert [(r.attempt, r.status_code, r.trigger) for r in rows] == [(1, 200, "auto")]


async def test_failures_retry_on_schedule_and_410_stops(
    db: Database, redis: Redis, hooks: Hooks, receiver: Any
) -> None:
    rec, url = receiver
    ctx, key = await hooks(webhook_allow_private=True, webhook_schedule_s=[0, 30, 60])
    event = await ended_job_event(db, key, url)
    rec.script = [
        web.Response(status=500),
        web.Response(status=302, headers={"Location": "/elsewhere"}),
        web.Response(status=410),
    ]
    await deliver_webhook(ctx, event.id, 1, False)
    due = await scheduled(redis)
    assert 25 < due[queue.webhook_job_id(event.id, 2)] < 35
    await deliver_webhook(ctx, event.id, 2, False)  # the redirect is not followed
    assert len(rec.got) == 2
    assert 50 < (await scheduled(redis))[queue.webhook_job_id(event.id, 3)] < 70
    await deliver_webhook(ctx, event.id, 3, False)
    async with db.session() as session:
        row = await session.get(WebhookEvent, event.id)
    assert row is not None and row.status == "failed"
    assert [r.status_code for r in await attempts(db, event.id)] == [500, 302, 410]
    # every attempt carried the same webhook-id
    assert {h["webhook-id"] for h, _ in rec.got} == {event.id}


async def test_retry_after_is_honoured(
    db: Database, redis: Redis, hooks: Hooks, receiver: Any
) -> None:
    rec, url = receiver
    ctx, key = await hooks(webhook_allow_private=True, webhook_schedule_s=[0, 1])
    event = await ended_job_event(db, key, url)
    rec.script = [web.Response(status=429, headers={"Retry-After": "120"})]
    await deliver_webhook(ctx, event.id, 1, False)
    assert 110 < (await scheduled(redis))[queue.webhook_job_id(event.id, 2)] < 130


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "[::1]", "169.254.169.254", "10.1.2.3"])
async def test_private_targets_are_refused(db: Database, hooks: Hooks, host: str) -> None:
    ctx, key = await hooks(webhook_schedule_s=[0])
    event = await ended_job_event(db, key, f"http://{host}:9/hook")
    result = await deliver_webhook(ctx, event.id, 1, False)
    assert "private" in result
    rows = await attempts(db, event.id)
    assert rows[0].status_code is None and "private" in (rows[0].error or "")


async def test_manual_redelivery_is_one_extra_attempt(
    db: Database, redis: Redis, hooks: Hooks, receiver: Any
) -> None:
    rec, url = receiver
    ctx, key = await hooks(webhook_allow_private=True)
    event = await ended_job_event(db, key, url)
    await deliver_webhook(ctx, event.id, 1, False)
    await deliver_webhook(ctx, event.id, 0, True)
    rows = await attempts(db, event.id)
    assert [(r.attempt, r.trigger) for r in rows] == [(1, "auto"), (2, "manual")]
    assert rec.got[0][0]["webhook-id"] == rec.got[1][0]["webhook-id"]
    assert await scheduled(redis) == {}


def test_next_delay_follows_the_schedule_with_jitter() -> None:
    schedule = [0, 5, 300]
    assert next_delay(schedule, 3, None) is None
    d = next_delay(schedule, 1, None)
    assert d is not None and 4.5 <= d <= 5.5
    assert next_delay(schedule, 1, 60) == 60
