"""API keys: created once, shown once, stored as a SHA-256 hash, looked up by prefix.

A key is ``bk_`` + 40 random URL-safe characters. The first 12 characters are the stored
prefix (indexed); the full key is compared in constant time against the stored hash.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass

from redis.asyncio import Redis
from sqlalchemy import select
from sqlmodel import col

from bulkhead.db import Database
from bulkhead.errors import InvalidInput, NotFound
from bulkhead.ids import new_id
from bulkhead.models import ApiKey, utcnow

KEY_PREFIX = "bk_"
KEYS_VERSION = "bulkhead:keys:version"  # bumped on every revocation; gateways' caches check it
PREFIX_LEN = 12
STRIPE_CUSTOMER = re.compile(r"^cus_[A-Za-z0-9]{1,64}$")


@dataclass(frozen=True)
class CreatedKey:
    key: ApiKey
    secret: str  # the bk_… value, shown once

    def public(self) -> dict[str, object]:
        return {**self.key.public(), "key": self.secret, "webhook_secret": self.key.webhook_secret}


def hash_key(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def new_webhook_secret() -> str:
    return "whsec_" + base64.b64encode(secrets.token_bytes(24)).decode()


async def create_key(
    db: Database,
    name: str,
    plan: str = "free",
    stripe_customer_id: str | None = None,
    requires_stripe_customer: bool = False,
) -> CreatedKey:
    """Create a key on ``plan`` (the caller checks that the plan exists)."""
    name = name.strip()
    if not name or len(name) > 200:
        raise InvalidInput("name must be 1-200 characters")
    if stripe_customer_id is not None and not STRIPE_CUSTOMER.match(stripe_customer_id):
        raise InvalidInput("a Stripe customer id looks like cus_…", "invalid_stripe_customer")
    if requires_stripe_customer and stripe_customer_id is None:
        raise InvalidInput(
            f"the {plan} plan is metered: link a Stripe customer (--stripe-customer cus_…)",
            "stripe_customer_required",
        )
    secret = KEY_PREFIX + secrets.token_urlsafe(30)[:40]
    row = ApiKey(
        id=new_id("key"),
        name=name,
        prefix=secret[:PREFIX_LEN],
        key_hash=hash_key(secret),
        webhook_secret=new_webhook_secret(),
        plan=plan,
        stripe_customer_id=stripe_customer_id,
    )
    async with db.session() as session:
        session.add(row)
        await session.commit()
    return CreatedKey(key=row, secret=secret)


async def list_keys(db: Database) -> list[ApiKey]:
    async with db.read() as session:
        rows = await session.execute(select(ApiKey).order_by(col(ApiKey.created_at)))
        return list(rows.scalars())


async def set_webhook_url(db: Database, key_id: str, url: str | None) -> ApiKey:
    async with db.session() as session:
        row = await session.get(ApiKey, key_id)
        if row is None:
            raise NotFound(f"no API key {key_id}")
        row.webhook_url = url
        await session.commit()
        return row


async def link_stripe_customer(db: Database, key_id: str, customer_id: str) -> ApiKey:
    if not STRIPE_CUSTOMER.match(customer_id):
        raise InvalidInput("a Stripe customer id looks like cus_…", "invalid_stripe_customer")
    async with db.session() as session:
        row = await session.get(ApiKey, key_id)
        if row is None:
            raise NotFound(f"no API key {key_id}")
        row.stripe_customer_id = customer_id
        await session.commit()
        return row


async def revoke_key(db: Database, key_id: str) -> ApiKey:
    async with db.session() as session:
        row = await session.get(ApiKey, key_id)
        if row is None:
            raise NotFound(f"no API key {key_id}")
        if row.revoked_at is None:
            row.revoked_at = utcnow()
            await session.commit()
        return row


async def announce_revocation(redis: Redis) -> None:
    """Make every gateway's key cache re-check keys against the database (after a revoke)."""
    await redis.incr(KEYS_VERSION)


async def authenticate(db: Database, secret: str) -> ApiKey | None:
    """The live key for this secret, or None (unknown, malformed or revoked)."""
    if not secret.startswith(KEY_PREFIX) or len(secret) < PREFIX_LEN + 8 or len(secret) > 200:
        return None
    async with db.read() as session:
        row = (
            await session.execute(select(ApiKey).where(col(ApiKey.prefix) == secret[:PREFIX_LEN]))
        ).scalar_one_or_none()
    if row is None or row.revoked_at is not None:
        return None
    if not hmac.compare_digest(row.key_hash, hash_key(secret)):
        return None
    return row
