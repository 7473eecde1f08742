"""run_job and reconcile_jobs against a real vmhost (bwrap) on loopback and a real database.

Also the one-trace check: a gateway request, the arq job and the vmhost call share a trace.
"""

from __future__ import annotations

import asyncio
import dataclasses
import shutil
from datetime import timedelta

import pytest
from aiohttp.test_utils import TestClient, TestServer
from arq.connections import ArqRedis
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from sqlalchemy import select, update

from bulkhead import queue
from bulkhead.db import Database
from bulkhead.keys import create_key
from bulkhead.models import Job, UsageRecord, WebhookEvent, utcnow
from gateway.app import create_app as create_gateway
from tests.gateway.conftest import make_settings
from tests.workers.conftest import TOKEN, add_job, load
from workers.reconcile import reconcile_jobs
from workers.runner import Deps, run_job
from workers.vmhost_client import VmhostPool

pytestmark = pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap not installed")


async def test_a_twice_delivered_job_runs_once(db: Database, deps: Deps) -> None:
    key = await create_key(db, "w")
    job = await add_job(db, key, language="python", code="print('ran')")
    ctx = {"deps": deps}
    results = await asyncio.gather(run_job(ctx, job.id, 1, {}), run_job(ctx, job.id, 1, {}))
    assert sorted(results) == ["completed", "skipped"]
    done = await load(db, job.id)
    assert done.stdout == "ran\n" and done.exit_code == 0 and done.sandbox_seconds == 1
    assert await run_job(ctx, job.id, 1, {}) == "skipped"  # and again after the end
    async with db.session() as session:
        ledger = list((await session.execute(select(UsageRecord))).scalars())
        events = list((await session.execute(select(WebhookEvent))).scalars())
    assert [r.subject_id for r in ledger] == [job.id]
    assert [(e.subject_id, e.type) for e in events] == [(job.id, "job.completed")]


async def test_a_lost_run_is_rerun_then_failed(db: Database, deps: Deps, redis: ArqRedis) -> None:
    key = await create_key(db, "w")
    job = await add_job(db, key, language="python", code="print(1)")
    stale = utcnow() - timedelta(seconds=30)
    async with db.session() as session:  # as if a worker claimed it and died
        await session.execute(
            update(Job).where(Job.id == job.id).values(status="running", heartbeat_at=stale)  # type: ignore[arg-type]
        )
        await session.commit()
    ctx = {"deps": deps}
    assert (await reconcile_jobs(ctx))["recovered"] == 1
    requeued = await load(db, job.id)
    assert (requeued.status, requeued.attempt) == ("queued", 2)
    assert queue.run_job_id(job.id, 2).encode() in await redis.zrange("bulkhead:test", 0, -1)
    # the dead worker's attempt is fenced out; the new attempt runs
    assert await run_job(ctx, job.id, 1, {}) == "skipped"
    assert await run_job(ctx, job.id, 2, {}) == "completed"
    # a job whose worker dies on its last attempt fails with internal_error
    other = await add_job(db, key, language="python", code="print(1)")
    async with db.session() as session:
        await session.execute(
            update(Job)
            .where(Job.id == other.id)  # type: ignore[arg-type]
            .values(status="running", heartbeat_at=stale, attempt=2)
        )
        await session.commit()
    await reconcile_jobs(ctx)
    failed = await load(db, other.id)
    assert (failed.status, failed.termination_reason, failed.error_code) == (
        "failed",
        "internal_error",
        "worker_lost",
    )


async def test_unreachable_vmhost_fails_the_job_clearly(db: Database, deps: Deps) -> None:
    key = await create_key(db, "w")
    job = await add_job(db, key, language="python", code="print(1)")
    pool = VmhostPool(["http://127.0.0.1:9"], TOKEN)
    await pool.start()
    settings = dataclasses.replace(deps.settings, vmhost_retry_s=1.0)
    ctx = {"deps": dataclasses.replace(deps, vmhosts=pool, settings=settings)}
    # no vmhost ever answers on port 9: the worker retries for 1 s, then fails the job
    assert await run_job(ctx, job.id, 1, {}) == "failed"
    await pool.close()
    failed = await load(db, job.id)
    assert failed.error_code == "vmhost_unavailable"
    assert failed.sandbox_seconds == 0  # nothing ran, nothing billed


@pytest.fixture(scope="session")
def spans() -> InMemorySpanExporter:
    """The process's tracer provider (settable once), recording spans in memory."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    return exporter


async def test_one_trace_from_gateway_to_vmhost(
    db: Database,
    deps: Deps,
    database_url: str,
    redis_url: str,
    redis: ArqRedis,
    spans: InMemorySpanExporter,
) -> None:
    spans.clear()
    key = await create_key(db, "t")
    gateway = create_gateway(make_settings(database_url, redis_url))
    async with TestClient(TestServer(gateway)) as client:
        resp = await client.post(
            "/v1/jobs",
            json={"language": "python", "code": "print(1)"},
            headers={"Authorization": f"Bearer {key.secret}"},
        )
        job_id = (await resp.json())["id"]
    # take the enqueued arq job's arguments as a worker would
    jobs = await redis.queued_jobs(queue_name="bulkhead:test")
    args = jobs[0].args
    assert args[0] == job_id and "traceparent" in args[2]
    assert await run_job({"deps": deps}, *args) == "completed"
    finished = spans.get_finished_spans()
    names = {s.name for s in finished}
    assert {"POST /v1/jobs", "run_job", "vmhost.run"} <= names, names
    assert len({s.context.trace_id for s in finished if s.context is not None}) == 1
