"""The real gateway app on loopback, over real Redis and a real database."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from bulkhead.db import Database
from bulkhead.keys import CreatedKey, create_key
from bulkhead.settings import CommonSettings
from gateway.app import create_app
from gateway.settings import GatewaySettings


def make_settings(database_url: str, redis_url: str, **overrides: Any) -> GatewaySettings:
    common = CommonSettings(
        database_url=database_url, redis_url=redis_url, queue_name="bulkhead:test"
    )
    base = GatewaySettings.from_env({})
    return dataclasses.replace(base, common=common, admin_token="admin-secret", **overrides)


@pytest.fixture
async def client(database_url: str, redis_url: str, redis: Any) -> AsyncIterator[TestClient]:
    app = create_app(make_settings(database_url, redis_url))
    async with TestClient(TestServer(app)) as test_client:
        yield test_client


@pytest.fixture
async def key_factory(database_url: str, client: TestClient) -> AsyncIterator[Any]:
    db = Database(database_url)

    async def make(name: str = "tenant", plan: str = "free") -> CreatedKey:
        return await create_key(db, name, plan)

    yield make
    await db.close()


def auth(created: CreatedKey) -> dict[str, str]:
    return {"Authorization": f"Bearer {created.secret}"}
