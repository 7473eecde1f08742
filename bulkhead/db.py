"""Database engine, sessions and schema migration (SQLite file or PostgreSQL).

``migrate`` is safe to run from several processes at once: it creates missing tables and
records the schema version; a newer database than this code refuses to start.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import event, select
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

SCHEMA_VERSION = 1


class Database:
    """An engine plus a session factory; one per process, passed down explicitly."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.is_sqlite = url.startswith("sqlite")
        kwargs: dict[str, Any] = {}
        if self.is_sqlite:
            path = url.split("///", 1)[1] if "///" in url else ""
            if path and path != ":memory:":
                Path(path).parent.mkdir(parents=True, exist_ok=True)
            kwargs["connect_args"] = {"timeout": 30}
        else:
            kwargs["pool_size"] = 10
            kwargs["max_overflow"] = 20
            kwargs["pool_pre_ping"] = True
        self.engine: AsyncEngine = create_async_engine(url, **kwargs)
        if self.is_sqlite:
            event.listen(self.engine.sync_engine, "connect", _sqlite_pragmas)
            event.listen(self.engine.sync_engine, "begin", _sqlite_begin)
        self.sessions = async_sessionmaker(self.engine, expire_on_commit=False)

    @asynccontextmanager
    async def session(self) -> AsyncIterator[AsyncSession]:
        async with self.sessions() as session:
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
            row = (await session.execute(select(SchemaVersion))).scalar_one_or_none()
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
            return row.version

    async def ping(self) -> None:
        async with self.engine.connect() as conn:
            await conn.exec_driver_sql("SELECT 1")

    async def close(self) -> None:
        await self.engine.dispose()


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
