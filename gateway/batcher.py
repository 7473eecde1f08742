"""Group commit for admitted jobs: many concurrent POSTs, one database transaction.

Each admission awaits a future while one background task inserts every job waiting at that
moment in a single transaction (SQLite has one writer per process; a transaction per request
would serialize all requests behind its round trips). If the batch fails on a constraint
(an ``Idempotency-Key`` race), its jobs are inserted one by one so that only the offending
request sees the error.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from sqlalchemy.exc import IntegrityError

from bulkhead.db import Database
from bulkhead.models import Job

log = logging.getLogger("bulkhead.gateway.batcher")
MAX_BATCH = 256


class JobBatcher:
    def __init__(self, db: Database) -> None:
        self.db = db
        self._pending: list[tuple[Job, asyncio.Future[None]]] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="job-batcher")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for _job, fut in self._pending:
            if not fut.done():
                fut.set_exception(RuntimeError("the gateway is shutting down"))

    async def insert(self, job: Job) -> None:
        """Commit ``job``; raises what its own insert raised (e.g. IntegrityError)."""
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.append((job, fut))
        self._wake.set()
        await fut

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._pending:
                batch, self._pending = self._pending[:MAX_BATCH], self._pending[MAX_BATCH:]
                await self._commit(batch)

    async def _commit(self, batch: list[tuple[Job, asyncio.Future[None]]]) -> None:
        try:
            async with self.db.session() as session:
                session.add_all([job for job, _ in batch])
                await session.commit()
        except IntegrityError as exc:
            if len(batch) == 1:
                self._settle(batch, exc)
                return
            for item in batch:  # find the one that clashes
                await self._commit([item])
            return
        except Exception as exc:
            log.exception("inserting %d jobs failed", len(batch))
            self._settle(batch, exc)
            return
        self._settle(batch, None)

    @staticmethod
    def _settle(batch: list[tuple[Job, asyncio.Future[None]]], exc: Exception | None) -> None:
        for _job, fut in batch:
            if fut.done():
                continue
            if exc is None:
                fut.set_result(None)
            else:
                fut.set_exception(exc)
