"""Group commit for admitted jobs: many concurrent POSTs, one database transaction.

Each admission awaits a future while one background task takes every job waiting at that
moment and, in a single transaction, locks each account involved, checks its plan (hours
quota and concurrency, ``billing.quota.admit``) and inserts the jobs that fit. SQLite has
one writer per process; a transaction per request would serialize all requests behind its
round trips. If the batch fails on a constraint (an ``Idempotency-Key`` race), its jobs are
admitted one by one so that only the offending request sees the error.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from sqlalchemy.exc import IntegrityError

from billing.plans import Plan
from billing.quota import AccountState, account_state, admit, is_limited, lock_account
from bulkhead.db import Database
from bulkhead.errors import LimitReached
from bulkhead.models import Job, utcnow

log = logging.getLogger("bulkhead.gateway.batcher")
MAX_BATCH = 256
Item = tuple[Job, Plan, "asyncio.Future[None]"]


class JobBatcher:
    def __init__(self, db: Database) -> None:
        self.db = db
        self._pending: list[Item] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="job-batcher")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for _job, _plan, fut in self._pending:
            if not fut.done():
                fut.set_exception(RuntimeError("the gateway is shutting down"))

    async def insert(self, job: Job, plan: Plan) -> None:
        """Admit and commit ``job``; raises LimitReached, or what its insert raised."""
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.append((job, plan, fut))
        self._wake.set()
        await fut

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._pending:
                batch, self._pending = self._pending[:MAX_BATCH], self._pending[MAX_BATCH:]
                await self._commit(batch)

    async def _commit(self, batch: list[Item]) -> None:
        refused: list[tuple[asyncio.Future[None], Exception]] = []
        try:
            async with self.db.session() as session:
                states: dict[str, AccountState] = {}
                now = utcnow()
                # lock accounts in one global order, so two gateways never deadlock
                for key_id in sorted({j.api_key_id for j, plan, _ in batch if is_limited(plan)}):
                    await lock_account(session, key_id)
                    states[key_id] = await account_state(session, key_id, now)
                for job, plan, fut in batch:
                    if not is_limited(plan):
                        session.add(job)
                        continue
                    state = states[job.api_key_id]
                    try:
                        admit(plan, state)
                    except LimitReached as exc:
                        refused.append((fut, exc))
                        continue
                    session.add(job)
                await session.commit()
        except IntegrityError as exc:
            if len(batch) == 1:
                self._settle(batch, exc)
                return
            for item in batch:  # find the one that clashes
                await self._commit([item])
            return
        except Exception as exc:
            log.exception("admitting %d jobs failed", len(batch))
            self._settle(batch, exc)
            return
        for fut, error in refused:
            fut.set_exception(error)
        self._settle(batch, None)

    @staticmethod
    def _settle(batch: list[Item], exc: Exception | None) -> None:
        for _job, _plan, fut in batch:
            if fut.done():
                continue
            if exc is None:
                fut.set_result(None)
            else:
                fut.set_exception(exc)
