"""Plan limits at admission: atomic under 50 concurrent requests, clear 429s."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from billing.ledger import record_usage
from billing.plans import Plans
from bulkhead.db import Database
from bulkhead.keys import CreatedKey, create_key
from bulkhead.models import utcnow
from gateway.app import create_app
from tests.gateway.conftest import auth, make_settings

PLANS = Plans.parse(
    {
        "free": {"included_hours": 100, "max_concurrent": 20},
        "tiny": {"included_seconds": 5},
        "narrow": {"included_hours": 1, "max_concurrent": 3},
    }
)
PY = {"language": "python", "code": "print(1)"}


@pytest.fixture
async def tclient(database_url: str, redis_url: str, redis: Any) -> AsyncIterator[TestClient]:
    app = create_app(make_settings(database_url, redis_url, plans=PLANS))
    async with TestClient(TestServer(app)) as test_client:
        yield test_client


async def burst(client: TestClient, key: CreatedKey, n: int = 50) -> list[tuple[int, Any]]:
    async def one() -> tuple[int, Any]:
        resp = await client.post("/v1/jobs", json=PY, headers=auth(key))
        return resp.status, await resp.json()

    return list(await asyncio.gather(*(one() for _ in range(n))))


async def test_concurrency_limit_never_over_admits(tclient: TestClient, db: Database) -> None:
    key = await create_key(db, "n", "narrow")
    results = await burst(tclient, key)
    assert sorted(s for s, _ in results) == [202] * 3 + [429] * 47
    refused = [b for s, b in results if s == 429]
    assert {b["error"]["code"] for b in refused} == {"concurrency_limit"}
    assert "allows 3 concurrent sandboxes" in refused[0]["error"]["message"]


async def test_hour_quota_never_over_admits(tclient: TestClient, db: Database) -> None:
    key = await create_key(db, "t", "tiny")
    end = utcnow() - timedelta(seconds=1)
    async with db.session() as session:  # 4 of the 5 included seconds are used
        await record_usage(session, api_key_id=key.key.id, subject_type="job",
                           subject_id="job_earlier", started_at=end - timedelta(seconds=4),
                           ended_at=end, vcpus=1, memory_mb=512)  # fmt: skip
        await session.commit()
    results = await burst(tclient, key)
    assert sorted(s for s, _ in results) == [202] + [429] * 49
    refused = [b for s, b in results if s == 429]
    assert {b["error"]["code"] for b in refused} == {"quota_exceeded"}
    message = refused[0]["error"]["message"]
    assert "includes 0.001389 sandbox-hours" in message and "resets at" in message
    account = await (await tclient.get("/v1/account", headers=auth(key))).json()
    assert abs(account["quota"]["included_hours"] - 5 / 3600) < 1e-9
    assert account["quota"]["remaining_hours"] == round(1 / 3600, 4)


async def test_lifetime_caps_the_timeout(tclient: TestClient, db: Database) -> None:
    key = await create_key(db, "f", "free")
    resp = await tclient.post("/v1/jobs", json={**PY, "timeout_s": 86400}, headers=auth(key))
    assert resp.status == 202
    over = await tclient.post("/v1/jobs", json={**PY, "timeout_s": 86401}, headers=auth(key))
    assert over.status == 422


async def test_account_webhook_and_usage_records(tclient: TestClient, db: Database) -> None:
    key = await create_key(db, "w", "free")
    resp = await tclient.put("/v1/account/webhook", json={"url": "https://example.com/h"},
                             headers=auth(key))  # fmt: skip
    assert resp.status == 200 and (await resp.json())["webhook_url"] == "https://example.com/h"
    bad = await tclient.put("/v1/account/webhook", json={"url": "ftp://x"}, headers=auth(key))
    assert bad.status == 422
    end = utcnow()
    async with db.session() as session:
        for i in range(3):
            await record_usage(session, api_key_id=key.key.id, subject_type="job",
                               subject_id=f"job_{i}", started_at=end - timedelta(seconds=2),
                               ended_at=end, vcpus=1, memory_mb=1024)  # fmt: skip
        await session.commit()
    page = await (await tclient.get("/v1/usage/sandboxes?limit=2", headers=auth(key))).json()
    assert len(page["data"]) == 2 and page["has_more"]
    rest = await (
        await tclient.get(f"/v1/usage/sandboxes?cursor={page['next_cursor']}", headers=auth(key))
    ).json()
    assert len(rest["data"]) == 1 and rest["data"][0]["gib_seconds"] == 2.0
    other = await create_key(db, "o", "free")
    theirs = await (await tclient.get("/v1/usage/sandboxes", headers=auth(other))).json()
    assert theirs["data"] == []
