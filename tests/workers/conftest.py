"""Worker fixtures: a real vmhost (bwrap) on loopback and the worker's dependencies."""

from __future__ import annotations

import dataclasses
import shutil
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web
from arq.connections import ArqRedis

from bulkhead.db import Database
from bulkhead.keys import CreatedKey
from bulkhead.models import Job, utcnow
from tests.workers.test_webhooks import worker_settings
from vmhost.app import create_app as create_vmhost
from vmhost.settings import VmhostSettings
from workers.runner import Deps
from workers.settings import WorkerSettings
from workers.vmhost_client import VmhostPool

TOKEN = "test-vmhost-token"


@pytest.fixture
async def vmhost_url() -> AsyncIterator[str]:
    if shutil.which("bwrap") is None:
        pytest.skip("bubblewrap is not installed")
    settings = VmhostSettings.from_env({"BULKHEAD_VMHOST_TOKEN": TOKEN})
    runner = web.AppRunner(create_vmhost(settings), handler_cancellation=True)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    yield f"http://127.0.0.1:{port}"
    await runner.cleanup()


@pytest.fixture
async def deps(
    db: Database, redis: ArqRedis, database_url: str, redis_url: str, vmhost_url: str
) -> AsyncIterator[Deps]:
    settings: WorkerSettings = dataclasses.replace(
        worker_settings(database_url, redis_url),
        vmhost_urls=[vmhost_url],
        vmhost_token=TOKEN,
        job_lease_s=2.0,
        max_attempts=2,
    )
    pool = VmhostPool(settings.vmhost_urls, settings.vmhost_token)
    await pool.start()
    yield Deps(settings=settings, db=db, redis=redis, vmhosts=pool)
    await pool.close()


async def add_job(db: Database, key: CreatedKey, **fields: Any) -> Job:
    job = Job(
        id=f"job_{utcnow().timestamp():.6f}".replace(".", ""),
        api_key_id=key.key.id,
        attempt=1,
        callback_url="https://example.invalid/hook",
        **fields,
    )
    async with db.session() as session:
        session.add(job)
        await session.commit()
    return job


async def load(db: Database, job_id: str) -> Job:
    async with db.session() as session:
        job = await session.get(Job, job_id)
    assert job is not None
    return job
