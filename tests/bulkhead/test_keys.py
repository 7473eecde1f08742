"""API keys on a real database: hashed at rest, prefix lookup, revocation."""

from __future__ import annotations

from sqlalchemy import select

from bulkhead.db import Database
from bulkhead.ids import new_id
from bulkhead.keys import authenticate, create_key, hash_key, list_keys, revoke_key
from bulkhead.models import ApiKey


async def test_key_is_stored_hashed_and_authenticates(db: Database) -> None:
    created = await create_key(db, "alice", "pro")
    assert created.secret.startswith("bk_") and len(created.secret) == 43
    async with db.session() as session:
        row = (await session.execute(select(ApiKey))).scalar_one()
    assert row.key_hash == hash_key(created.secret)
    assert created.secret not in (row.key_hash, row.prefix, row.name)
    found = await authenticate(db, created.secret)
    assert found is not None and found.id == created.key.id and found.plan == "pro"
    # same prefix, wrong rest
    wrong = created.secret[:-1] + ("A" if created.secret[-1] != "A" else "B")
    assert await authenticate(db, wrong) is None
    assert await authenticate(db, "not-a-key") is None


async def test_revoke_and_list(db: Database) -> None:
    a = await create_key(db, "a")
    b = await create_key(db, "b")
    await revoke_key(db, a.key.id)
    assert await authenticate(db, a.secret) is None
    assert await authenticate(db, b.secret) is not None
    rows = await list_keys(db)
    assert [(r.name, r.revoked_at is not None) for r in rows] == [("a", True), ("b", False)]


def test_ids_sort_by_time_and_validate() -> None:
    first, second = new_id("job"), new_id("job")
    assert first.startswith("job_") and len(first) == len("job_") + 24
    assert first[:16] <= second[:16]


async def test_a_version_1_database_is_migrated(database_url: str) -> None:
    """A database made by the first release gains the new columns on start."""
    from sqlalchemy import text

    from bulkhead.db import SCHEMA_VERSION

    old = Database(database_url)
    await old.migrate()
    async with old.session() as session:
        await session.execute(text("ALTER TABLE jobs DROP COLUMN cancel_reason"))
        await session.execute(text("ALTER TABLE jobs DROP COLUMN isolation"))  # version 3
        await session.execute(text("UPDATE schema_version SET version = 1"))
        await session.commit()
    await old.close()
    db = Database(database_url)
    assert await db.migrate() == SCHEMA_VERSION
    async with db.read() as session:
        await session.execute(text("SELECT cancel_reason, isolation FROM jobs"))
    assert await db.migrate() == SCHEMA_VERSION  # idempotent
    await db.close()
