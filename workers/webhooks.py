"""``deliver_webhook``: sign (Standard Webhooks) and POST one event, then schedule the next try.

Attempt ``n`` of the automatic schedule runs as arq job ``wh:<event>:<n>``, deferred by the
configured schedule (with ±10 % jitter, never earlier than a ``Retry-After``). 2xx ends the
event, 410 stops it, anything else (including redirects, which are never followed) retries
until the schedule is used up. Every attempt is a row in ``webhook_attempts``. A manual
redelivery (``POST /v1/jobs/{id}/redeliver``) is one extra attempt outside the schedule.
The event id is the ``webhook-id`` on every attempt, so receivers can drop duplicates.
"""

from __future__ import annotations

import json
import logging
import random
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any

import aiohttp
from sqlalchemy import func, select
from sqlmodel import col
from standardwebhooks.webhooks import Webhook
from yarl import URL

from bulkhead import queue
from bulkhead.ids import new_id
from bulkhead.models import ApiKey, WebhookAttempt, WebhookEvent, utcnow
from workers.errors import WebhookTargetRefused
from workers.netguard import VettedResolver, check_literal
from workers.runner import Deps

log = logging.getLogger("bulkhead.worker.webhooks")
MAX_RETRY_AFTER_S = 86400.0
USER_AGENT = "Bulkhead-Webhooks/1"


@dataclass(frozen=True)
class Outcome:
    status_code: int | None
    error: str | None
    retry_after_s: float | None
    duration_ms: int

    @property
    def delivered(self) -> bool:
        return self.status_code is not None and 200 <= self.status_code < 300

    @property
    def gone(self) -> bool:
        return self.status_code == 410


class WebhookSender:
    """One HTTP client per worker whose connections go only to vetted addresses."""

    def __init__(self, timeout_s: float, allow_private: bool) -> None:
        self.timeout_s = timeout_s
        self.allow_private = allow_private
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(
            resolver=VettedResolver(self.allow_private), use_dns_cache=False
        )
        self._session = aiohttp.ClientSession(
            connector=connector, timeout=aiohttp.ClientTimeout(total=self.timeout_s)
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def send(self, url: str, event_id: str, secret: str, body: str) -> Outcome:
        assert self._session is not None, "WebhookSender.start() was not awaited"
        started = time.monotonic()
        headers = {
            "content-type": "application/json",
            "user-agent": USER_AGENT,
            "webhook-id": event_id,
        }
        now = datetime.now(UTC)
        headers["webhook-timestamp"] = str(int(now.timestamp()))
        headers["webhook-signature"] = Webhook(secret).sign(event_id, now, body)
        try:
            check_literal(URL(url).host or "", self.allow_private)
            async with self._session.post(
                url, data=body.encode(), headers=headers, allow_redirects=False
            ) as resp:
                await resp.content.read(64 * 1024)
                retry_after = _retry_after(resp.headers.get("Retry-After"))
                error = None if 200 <= resp.status < 300 else f"HTTP {resp.status}"
                return Outcome(resp.status, error, retry_after, _ms_since(started))
        except WebhookTargetRefused as exc:
            return Outcome(None, exc.message, None, _ms_since(started))
        except (aiohttp.ClientError, TimeoutError, OSError, ValueError) as exc:
            message = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            return Outcome(None, message, None, _ms_since(started))


def _ms_since(started: float) -> int:
    return int((time.monotonic() - started) * 1000)


def _retry_after(raw: str | None) -> float | None:
    if not raw:
        return None
    try:
        return min(MAX_RETRY_AFTER_S, max(0.0, float(raw)))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(raw)
    except (TypeError, ValueError):
        return None
    return min(MAX_RETRY_AFTER_S, max(0.0, (when - datetime.now(UTC)).total_seconds()))


def next_delay(schedule: list[float], attempt: int, retry_after: float | None) -> float | None:
    """Seconds until automatic attempt ``attempt + 1``, or None when the schedule is done."""
    if attempt >= len(schedule):
        return None
    base = schedule[attempt]
    delay = base * random.uniform(0.9, 1.1)
    return max(delay, retry_after or 0.0)


async def deliver_webhook(ctx: dict[str, Any], event_id: str, attempt: int, manual: bool) -> str:
    deps: Deps = ctx["deps"]
    sender: WebhookSender = ctx["webhooks"]
    async with deps.db.read() as session:
        event = await session.get(WebhookEvent, event_id)
        if event is None:
            return "missing"
        key = await session.get(ApiKey, event.api_key_id)
        done = await session.scalar(
            select(func.count()).where(
                col(WebhookAttempt.event_id) == event_id, col(WebhookAttempt.slot) == attempt
            )
        )
    if key is None:
        return "missing"
    if not manual and (event.status != "pending" or done):
        return "already_done"  # a repeated arq delivery of the same attempt
    body = json.dumps(event.payload, separators=(",", ":"))
    outcome = await sender.send(event.url, event.id, key.webhook_secret, body)
    delay = (
        None
        if manual or outcome.delivered or outcome.gone
        else next_delay(deps.settings.webhook_schedule_s, attempt, outcome.retry_after_s)
    )
    async with deps.db.session() as session:
        row = await session.get(WebhookEvent, event_id)
        assert row is not None
        session.add(
            WebhookAttempt(
                id=new_id("wha"),
                event_id=event_id,
                subject_id=row.subject_id,
                attempt=row.attempts + 1,
                slot=None if manual else attempt,
                url=row.url,
                status_code=outcome.status_code,
                error=outcome.error,
                duration_ms=outcome.duration_ms,
                trigger="manual" if manual else "auto",
            )
        )
        row.attempts += 1
        if outcome.delivered:
            row.status, row.delivered_at, row.next_attempt_at = "delivered", utcnow(), None
        elif outcome.gone or (delay is None and not manual):
            row.status, row.next_attempt_at = "failed", None
        elif delay is not None:
            row.next_attempt_at = datetime.fromtimestamp(time.time() + delay, UTC)
        await session.commit()
    if delay is not None:
        await queue.enqueue_webhook(
            deps.redis, deps.settings.common.queue_name, event_id, attempt + 1, delay
        )
    log.info("webhook %s attempt %s → %s", event_id, attempt, outcome.status_code or outcome.error)
    return "delivered" if outcome.delivered else (outcome.error or "failed")
