"""One Redis pub/sub connection per gateway process, shared by whoever needs messages.

The job waiter listens for ``bulkhead:job-done:*``. Handlers are plain callbacks. A lost
connection is retried every half second (a waiter also re-reads the database every few
seconds, so a message lost meanwhile only costs latency).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from redis.asyncio import Redis

log = logging.getLogger("bulkhead.gateway.subscriber")
Handler = Callable[[str, bytes], None]
RETRY_S = 0.5


class Subscriber:
    def __init__(self, redis: Redis) -> None:
        self.redis = redis
        self._channels: dict[str, Handler] = {}
        self._patterns: dict[str, Handler] = {}
        self._task: asyncio.Task[None] | None = None

    def channel(self, name: str, handler: Handler) -> None:
        self._channels[name] = handler

    def pattern(self, pattern: str, handler: Handler) -> None:
        self._patterns[pattern] = handler

    async def start(self) -> None:
        self._task = asyncio.create_task(self._listen(), name="redis-subscriber")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _listen(self) -> None:
        while True:
            try:
                pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
                if self._channels:
                    await pubsub.subscribe(*self._channels)
                if self._patterns:
                    await pubsub.psubscribe(*self._patterns)
                async for message in pubsub.listen():
                    self._dispatch(message)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.warning("Redis subscription lost; resubscribing", exc_info=True)
            await asyncio.sleep(RETRY_S)

    def _dispatch(self, message: dict[str, object]) -> None:
        channel = _text(message["channel"])
        pattern = message.get("pattern")
        handler = self._patterns.get(_text(pattern)) if pattern else self._channels.get(channel)
        if handler is not None:
            data = message["data"]
            handler(channel, data if isinstance(data, bytes) else str(data).encode())


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
