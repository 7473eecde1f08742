"""A short-lived cache of authenticated API keys, emptied at once on revocation.

Looking a key up costs a database round trip per request; the cache keeps a verified key for
``TTL_S`` seconds. Revocation reaches every gateway through the Redis channel
``bulkhead:key-revoked`` (published by ``bulkhead keys revoke`` and the admin API); a
gateway evicts the key as soon as the message arrives. A revocation that lands while a
lookup is in flight bumps the generation, so that lookup's result is not cached.
If the subscription is down, the cache is bypassed until it is back.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time

from redis.asyncio import Redis

from bulkhead.db import Database
from bulkhead.keys import REVOKED_CHANNEL, authenticate
from bulkhead.models import ApiKey

log = logging.getLogger("bulkhead.gateway.keycache")
TTL_S = 30.0
MAX_ENTRIES = 10_000


class KeyCache:
    def __init__(self, db: Database, redis: Redis) -> None:
        self.db = db
        self.redis = redis
        self._entries: dict[str, tuple[ApiKey, float]] = {}
        self._generation = 0
        self._live = False  # subscribed: only then is caching safe
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self._listen(), name="key-revocations")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _listen(self) -> None:
        while True:
            try:
                pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
                await pubsub.subscribe(REVOKED_CHANNEL)
                self._live = True
                async for message in pubsub.listen():
                    self._revoke(message["data"])
            except asyncio.CancelledError:
                raise
            except Exception:
                log.warning("key revocation subscription lost; resubscribing", exc_info=True)
            self._live = False
            self._entries.clear()
            self._generation += 1
            await asyncio.sleep(0.5)

    def _revoke(self, key_id: bytes | str) -> None:
        if isinstance(key_id, bytes):
            key_id = key_id.decode()
        self._generation += 1
        for digest, (key, _) in list(self._entries.items()):
            if key.id == key_id:
                del self._entries[digest]

    async def authenticate(self, secret: str) -> ApiKey | None:
        digest = hashlib.sha256(secret.encode()).hexdigest()
        hit = self._entries.get(digest)
        now = time.monotonic()
        if hit is not None and self._live and now - hit[1] < TTL_S:
            return hit[0]
        generation = self._generation
        key = await authenticate(self.db, secret)
        if key is not None and self._live and generation == self._generation:
            if len(self._entries) >= MAX_ENTRIES:
                self._entries.clear()
            self._entries[digest] = (key, now)
        return key
