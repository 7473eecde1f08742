"""A short-lived cache of authenticated API keys, emptied at once on revocation.

Looking a key up costs a database round trip per request; the cache keeps a verified key for
``TTL_S`` seconds. Revocation reaches every gateway through the Redis channel
``bulkhead:key-revoked`` (published by ``bulkhead keys revoke`` and the admin API); a
gateway evicts the key as soon as the message arrives. A revocation that lands while a
lookup is in flight bumps the generation, so that lookup's result is not cached.
If the subscription is down, the cache is bypassed until it is back.
"""

from __future__ import annotations

import hashlib
import time

from bulkhead.db import Database
from bulkhead.keys import REVOKED_CHANNEL, authenticate
from bulkhead.models import ApiKey
from gateway.subscriber import Subscriber

TTL_S = 30.0
MAX_ENTRIES = 10_000


class KeyCache:
    def __init__(self, db: Database, subscriber: Subscriber) -> None:
        self.db = db
        self._entries: dict[str, tuple[ApiKey, float]] = {}
        self._generation = 0
        self._live = False  # subscribed: only then is caching safe
        subscriber.channel(REVOKED_CHANNEL, lambda _, key_id: self._revoke(key_id))
        subscriber.on_state(self._set_live)

    def _set_live(self, live: bool) -> None:
        self._live = live
        if not live:
            self._entries.clear()
            self._generation += 1

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
