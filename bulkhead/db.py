"""Database engine, sessions and schema migration (SQLite file or PostgreSQL).

``migrate`` is safe to run from several processes at once: it creates missing tables and
records the schema version; a newer database than this code refuses to start.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import event, select, text
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)
from sqlmodel import SQLModel

from bulkhead import models  # noqa: F401  (registers the tables)
from bulkhead.models import SchemaVersion

SCHEMA_VERSION = 3  # 3: the sandboxes table (created by create_all)
# Statements that bring a database from version N-1 to N. New tables need no entry here
# (create_all makes them); new columns of existing tables do.
MIGRATIONS: dict[int, list[str]] = {
    2: ["ALTER TABLE jobs ADD COLUMN cancel_reason VARCHAR"],
    3: ["ALTER TABLE jobs ADD COLUMN isolation VARCHAR NOT NULL DEFAULT 'namespace'"],
}


class Database:
    """Engines plus session factories; one per process, passed down explicitly.

    ``session()`` is for transactions that may write. ``read()`` is for read-only work; on
    PostgreSQL both are the same. On SQLite, writers use one connection per process that
    begins with ``BEGIN IMMEDIATE`` (so writers queue on the lock instead of failing to
    upgrade a read lock, and writers within one process queue in asyncio rather than in
    SQLite's sleeping busy handler), while readers use their own pool in autocommit mode
    (WAL readers never wait for writers; use ``read()`` for single-statement reads).
    """

    def __init__(self, url: str) -> None:
        self.url = url
        self.is_sqlite = url.startswith("sqlite")
        if self.is_sqlite:
            path = url.split("///", 1)[1] if "///" in url else ""
            if path and path != ":memory:":
                Path(path).parent.mkdir(parents=True, exist_ok=True)
            self.engine = _sqlite_engine(url, pool_size=1, immediate=True)
            self.read_engine = _sqlite_engine(url, pool_size=8, immediate=False)
        else:
            self.engine = create_async_engine(
                url, pool_size=10, max_overflow=20, pool_pre_ping=True
            )
            self.read_engine = self.engine
        self.sessions = async_sessionmaker(self.engine, expire_on_commit=False)
        self.readers = async_sessionmaker(self.read_engine, expire_on_commit=False)

    @asynccontextmanager
    async def session(self) -> AsyncIterator[AsyncSession]:
        async with self.sessions() as session:
            yield session

    @asynccontextmanager
    async def read(self) -> AsyncIterator[AsyncSession]:
        async with self.readers() as session:
            yield session

    async def migrate(self) -> int:
        """Create or upgrade the schema; return the version now in force."""
        for _ in range(20):
            try:
                async with self.engine.begin() as conn:
                    await conn.run_sync(SQLModel.metadata.create_all)
                break
            except (IntegrityError, OperationalError) as exc:  # another process raced us
                if "already exists" not in str(exc) and "locked" not in str(exc):
                    raise
        async with self.session() as session:
            row = (
                await session.execute(select(SchemaVersion).with_for_update())
            ).scalar_one_or_none()
            if row is None:
                session.add(SchemaVersion(id=1, version=SCHEMA_VERSION))
                try:
                    await session.commit()
                except IntegrityError:
                    await session.rollback()
                return SCHEMA_VERSION
            if row.version > SCHEMA_VERSION:
                raise RuntimeError(
                    f"database schema version {row.version} is newer than this Bulkhead "
                    f"({SCHEMA_VERSION}); upgrade Bulkhead"
                )
            for version in range(row.version + 1, SCHEMA_VERSION + 1):
                for statement in MIGRATIONS.get(version, []):
                    await session.execute(text(statement))
                row.version = version
            await session.commit()
            return row.version

    async def ping(self) -> None:
        async with self.engine.connect() as conn:
            await conn.exec_driver_sql("SELECT 1")

    async def close(self) -> None:
        await self.engine.dispose()
        if self.read_engine is not self.engine:
            await self.read_engine.dispose()


def _sqlite_engine(url: str, pool_size: int, immediate: bool) -> AsyncEngine:
    # Every statement is a round trip to aiosqlite's thread, so skip the ones we don't need:
    # readers run in autocommit (a WAL read is consistent per statement and needs no BEGIN),
    # and no pooled connection needs a reset ROLLBACK because sessions always end theirs.
    engine = create_async_engine(
        url,
        connect_args={"timeout": 30},
        pool_size=pool_size,
        max_overflow=0,
        pool_reset_on_return=None,
    )
    event.listen(engine.sync_engine, "connect", _sqlite_pragmas)
    if immediate:
        event.listen(engine.sync_engine, "begin", _sqlite_begin)
    return engine


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    # We emit BEGIN ourselves (below): the driver's implicit deferred BEGIN lets two
    # processes both read and then fail to upgrade to a write lock ("database is locked").
    dbapi_conn.isolation_level = None
    cursor = dbapi_conn.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()


def _sqlite_begin(conn: Any) -> None:
    """Take the write lock up front so concurrent writers queue on busy_timeout."""
    conn.exec_driver_sql("BEGIN IMMEDIATE")
