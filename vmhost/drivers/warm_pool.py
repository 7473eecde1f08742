"""A pool of prestarted sandboxes, so a run skips sandbox start-up on its critical path.

A prestarted sandbox is a sandbox whose process is running and whose guest agent has said
``hello``, with an empty private home and its own cgroup, waiting for its one ``exec``. Each
is handed to exactly one run (``take`` pops it) and never returns to the pool; the pool is
refilled in the background once the run that took one has ended (so prestarting does not
compete with that run for the CPU). A sandbox that died while waiting is discarded, never
handed out.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Generic, Protocol, TypeVar

log = logging.getLogger("vmhost.pool")
RETRY_S = 2.0


class Poolable(Protocol):
    def alive(self) -> bool: ...


T = TypeVar("T", bound=Poolable)


class WarmPool(Generic[T]):
    def __init__(
        self,
        size: int,
        make: Callable[[], Awaitable[T]],
        discard: Callable[[T], Awaitable[None]],
    ) -> None:
        self.size = size
        self._make = make
        self._discard = discard
        self._ready: list[T] = []
        self._filler: asyncio.Task[None] | None = None
        self._closed = False
        self.taken = 0  # how many runs a prestarted sandbox served

    @property
    def ready(self) -> int:
        return len(self._ready)

    def start(self) -> None:
        """Begin (or resume) filling the pool in the background."""
        if self.size > 0 and not self._closed and (self._filler is None or self._filler.done()):
            self._filler = asyncio.create_task(self._fill(), name="warm-pool-fill")

    def start_later(self, delay_s: float) -> None:
        """Refill after ``delay_s``: a sandbox just handed out gets the CPU for its first
        commands instead of competing with a prestart (forks block the event loop)."""
        asyncio.get_running_loop().call_later(delay_s, self.start)

    def take(self) -> T | None:
        """A live prestarted sandbox, or None when the pool is empty."""
        item: T | None = None
        while self._ready:
            candidate = self._ready.pop(0)
            if candidate.alive():
                item = candidate
                self.taken += 1
                break
            asyncio.ensure_future(self._discard(candidate))
        return item

    async def _fill(self) -> None:
        while not self._closed and len(self._ready) < self.size:
            try:
                item = await self._make()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.warning("prestarting a sandbox failed; retrying in %ss", RETRY_S, exc_info=True)
                await asyncio.sleep(RETRY_S)
                continue
            if self._closed:
                await self._discard(item)
                return
            self._ready.append(item)

    async def close(self) -> None:
        self._closed = True
        if self._filler is not None:
            self._filler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._filler
        items, self._ready = self._ready, []
        await asyncio.gather(*(self._discard(i) for i in items), return_exceptions=True)
