"""Wait for jobs to end without polling: one Redis pattern subscription per gateway process.

Workers publish ``bulkhead:job-done:<id>`` after they commit a job's end (the gateway's
``Subscriber`` delivers it here). A waiter registers
a future, then checks the database once (the end may already be committed), then sleeps on
the future until the message or the deadline. A lost message only costs a slow re-check.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import defaultdict
from collections.abc import Awaitable, Callable

from bulkhead.queue import JOB_DONE_CHANNEL
from gateway.subscriber import Subscriber

RECHECK_S = 2.0  # re-read the database this often in case a message was lost


class JobWaiter:
    def __init__(self, subscriber: Subscriber) -> None:
        self._waiting: dict[str, set[asyncio.Future[None]]] = defaultdict(set)
        subscriber.pattern(
            JOB_DONE_CHANNEL + "*", lambda channel, _: self._wake(channel[len(JOB_DONE_CHANNEL) :])
        )

    def _wake(self, job_id: str) -> None:
        for fut in self._waiting.pop(job_id, ()):
            if not fut.done():
                fut.set_result(None)

    async def wait(
        self, job_id: str, timeout_s: float, is_done: Callable[[], Awaitable[bool]]
    ) -> bool:
        """True once ``is_done()`` holds, False if ``timeout_s`` passes first."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while True:
            fut: asyncio.Future[None] = loop.create_future()
            self._waiting[job_id].add(fut)
            try:
                if await is_done():
                    return True
                left = deadline - loop.time()
                if left <= 0:
                    return False
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(fut, min(left, RECHECK_S))
            finally:
                waiters = self._waiting.get(job_id)
                if waiters is not None:
                    waiters.discard(fut)
                    if not waiters:
                        self._waiting.pop(job_id, None)
