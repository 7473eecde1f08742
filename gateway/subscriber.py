"""One Redis pub/sub connection per gateway process, shared by whoever needs messages.

The job waiter listens for ``bulkhead:job-done:*`` and the key cache for
``bulkhead:key-revoked``. Handlers are plain callbacks; ``on_state`` callbacks learn when the
subscription is live or lost (the key cache must not trust its entries while it is lost).
A lost connection is retried every half second.
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
        self._state: list[Callable[[bool], None]] = []
        self._task: asyncio.Task[None] | None = None

    def channel(self, name: str, handler: Handler) -> None:
        self._channels[name] = handler

    def pattern(self, pattern: str, handler: Handler) -> None:
        self._patterns[pattern] = handler

    def on_state(self, callback: Callable[[bool], None]) -> None:
        self._state.append(callback)

    async def start(self) -> None:
        self._task = asyncio.create_task(self._listen(), name="redis-subscriber")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def _set_state(self, live: bool) -> None:
        for callback in self._state:
            callback(live)

    async def _listen(self) -> None:
        while True:
            try:
                pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
                if self._channels:
                    await pubsub.subscribe(*self._channels)
                if self._patterns:
                    await pubsub.psubscribe(*self._patterns)
                self._set_state(True)
                async for message in pubsub.listen():
                    self._dispatch(message)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.warning("Redis subscription lost; resubscribing", exc_info=True)
            self._set_state(False)
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
