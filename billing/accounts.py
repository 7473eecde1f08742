"""Accounts are API keys on a plan; this ties key creation to the configured plans."""

from __future__ import annotations

from billing.plans import Plans
from bulkhead.db import Database
from bulkhead.keys import CreatedKey, create_key


async def create_account_key(
    db: Database, plans: Plans, name: str, plan: str, stripe_customer_id: str | None = None
) -> CreatedKey:
    """A new key on a configured plan; metered plans need a linked Stripe customer."""
    chosen = plans.get(plan)
    return await create_key(
        db,
        name,
        chosen.name,
        stripe_customer_id=stripe_customer_id,
        requires_stripe_customer=chosen.requires_stripe_customer,
    )
