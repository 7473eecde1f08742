"""``bulkhead usage``: the ledger of one month as a readable table, per key."""

from __future__ import annotations

from datetime import UTC, datetime

from billing.errors import InvalidPeriod
from billing.plans import Plans
from billing.usage import month_of, report
from bulkhead.db import Database
from bulkhead.keys import list_keys
from bulkhead.models import utcnow

HEADER = ("key", "name", "plan", "jobs", "sandboxes", "sandbox-hours", "included", "remaining")


async def usage_table(db: Database, plans: Plans, key_id: str | None, month: str | None) -> str:
    now = utcnow()
    moment = now
    if month is not None:
        try:
            moment = datetime.strptime(month, "%Y-%m").replace(tzinfo=UTC)
        except ValueError as exc:
            raise InvalidPeriod("--month is YYYY-MM") from exc
    period = month_of(moment)
    keys = [k for k in await list_keys(db) if key_id is None or k.id == key_id]
    if key_id is not None and not keys:
        raise InvalidPeriod(f"no API key {key_id}")
    rows = [HEADER]
    for key in keys:
        plan = plans.get(key.plan) if key.plan in plans.by_name else None
        usage = await report(db, key, plan or plans.get(plans.names()[0]), period, "month", moment)
        totals = usage["totals"]
        included = plan.included_hours if plan is not None else None
        used = totals["sandbox_seconds"] / 3600
        rows.append((
            key.id, key.name, key.plan, str(totals["jobs"]), str(totals["sandboxes"]),
            f"{used:.4f}",
            "unlimited" if included is None else f"{included:g}",
            "-" if included is None else f"{max(0.0, included - used):.4f}",
        ))  # fmt: skip
    widths = [max(len(r[i]) for r in rows) for i in range(len(HEADER))]
    lines = [f"usage {period.start:%Y-%m} (UTC)"]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    return "\n".join(lines)
