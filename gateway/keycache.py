"""A short-lived cache of authenticated API keys that a revocation empties at once.

Looking a key up costs a database round trip per request; the cache keeps a verified key for
up to ``TTL_S`` seconds, tagged with the value of the Redis counter ``bulkhead:keys:version``
at the time it was read. Revoking a key (``bulkhead keys revoke``, the admin API) increments
that counter after the database commit, and every lookup first reads the counter (one Redis
round trip, much cheaper than the database): an entry from an older version is not used. So
a request that starts after a revocation returned is refused, on every gateway. Without
Redis the cache is bypassed.
"""

from __future__ import annotations

import hashlib
import time

from redis.asyncio import Redis
from redis.exceptions import RedisError

from bulkhead.db import Database
from bulkhead.keys import KEYS_VERSION, authenticate
from bulkhead.models import ApiKey

TTL_S = 30.0
MAX_ENTRIES = 10_000


class KeyCache:
    def __init__(self, db: Database, redis: Redis) -> None:
        self.db = db
        self.redis = redis
        self._entries: dict[str, tuple[ApiKey, bytes | None, float]] = {}

    async def authenticate(self, secret: str) -> ApiKey | None:
        try:
            version: bytes | None = await self.redis.get(KEYS_VERSION)
        except (RedisError, OSError):
            return await authenticate(self.db, secret)
        digest = hashlib.sha256(secret.encode()).hexdigest()
        now = time.monotonic()
        hit = self._entries.get(digest)
        if hit is not None and hit[1] == version and now - hit[2] < TTL_S:
            return hit[0]
        key = await authenticate(self.db, secret)
        if key is not None:
            if len(self._entries) >= MAX_ENTRIES:
                self._entries.clear()
            self._entries[digest] = (key, version, now)
        return key
