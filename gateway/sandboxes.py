"""Held-open sandboxes: admission, creation on a vmhost, lookup, timeout changes, ending.

Creation is two steps around the vmhost call. First one transaction admits the sandbox
under the account lock (quota and concurrency, counting it at once) and inserts it as
``starting``; then a vmhost starts it and a second transaction marks it ``running`` with
the vmhost's real start time. If the vmhost fails the row ends with ``internal_error`` and
no usage; if this gateway dies in between, the reaper ends the ``starting`` row. Another
tenant's sandbox is "not found", never "forbidden".
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from arq.connections import ArqRedis
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlmodel import col

from billing.quota import account_state, admit, is_limited, lock_account
from billing.sandbox_end import Ended, end_sandbox, record_end
from bulkhead import queue
from bulkhead.db import Database
from bulkhead.errors import Conflict, InvalidInput, NotFound
from bulkhead.ids import new_id
from bulkhead.models import ApiKey, Sandbox, utc, utcnow
from bulkhead.vmhost_api import VmhostClient, VmhostDown, VmhostReply, parse_time
from gateway.errors import ApiError, Unavailable
from gateway.schemas import SandboxCreate
from gateway.settings import GatewaySettings

MAX_LIFETIME_S = 86400.0
DRIVERS = {"namespace": "bwrap", "microvm": "qemu"}


class VmhostRefused(ApiError):
    """The vmhost refused the request (4xx): its status and error are passed on."""

    def __init__(self, reply: VmhostReply) -> None:
        error = reply.error
        super().__init__(error["message"], error["code"])
        self.status = reply.status


class SandboxService:
    def __init__(
        self, settings: GatewaySettings, db: Database, redis: ArqRedis, vmhosts: VmhostClient
    ) -> None:
        self.settings = settings
        self.db = db
        self.redis = redis
        self.vmhosts = vmhosts

    # --- create ------------------------------------------------------------------
    async def create(
        self, key: ApiKey, req: SandboxCreate, idempotency_key: str | None, body_hash: str
    ) -> tuple[Sandbox, bool]:
        if not self.vmhosts.urls or self.settings.vmhost_token is None:
            raise Unavailable("no vmhost is configured (BULKHEAD_VMHOST_URLS, _TOKEN)")
        timeout_s = req.timeout_s or self.settings.sandbox_timeout_s
        if timeout_s > MAX_LIFETIME_S:
            raise InvalidInput(f"timeout_s must be at most {MAX_LIFETIME_S:g} seconds (24 h)")
        if idempotency_key is not None and not 1 <= len(idempotency_key) <= 255:
            raise InvalidInput("Idempotency-Key must be 1-255 characters")
        row = await self._admit(key, req, timeout_s, idempotency_key, body_hash)
        if row.state != "starting" or row.vmhost_url is not None:
            return row, False  # an idempotent repeat
        return await self._start(row), True

    async def _admit(
        self,
        key: ApiKey,
        req: SandboxCreate,
        timeout_s: float,
        idempotency_key: str | None,
        body_hash: str,
    ) -> Sandbox:
        plan = self.settings.plans.by_name.get(key.plan)
        async with self.db.session() as session:
            if idempotency_key is not None:
                existing = await self._by_idempotency(session, key.id, idempotency_key)
                if existing is not None:
                    if existing.request_hash != body_hash:
                        raise Conflict(
                            "this Idempotency-Key was used with a different body",
                            "idempotency_conflict",
                        )
                    return existing
            now = utcnow()
            lifetime = MAX_LIFETIME_S
            if plan is not None:
                lifetime = min(lifetime, float(plan.max_lifetime_s))
                if is_limited(plan):
                    await lock_account(session, key.id)
                    admit(plan, await account_state(session, key.id, now))
            lifetime_ends = now + timedelta(seconds=lifetime)
            row = Sandbox(
                id=new_id("sbx"),
                api_key_id=key.id,
                template=req.template,
                env=req.env,
                vcpus=req.limits.vcpus if req.limits else 0,  # 0: the template's, set at start
                memory_mb=req.limits.memory_mb if req.limits else 0,
                network=req.network,
                isolation=req.isolation,
                sandbox_metadata=req.metadata,
                timeout_s=timeout_s,
                idempotency_key=idempotency_key,
                request_hash=body_hash,
                created_at=now,
                expires_at=min(now + timedelta(seconds=timeout_s), lifetime_ends),
                lifetime_ends_at=lifetime_ends,
            )
            session.add(row)
            try:
                await session.commit()
            except IntegrityError:  # a concurrent request with the same Idempotency-Key
                await session.rollback()
                existing = await self._by_idempotency(session, key.id, idempotency_key or "")
                if existing is None or existing.request_hash != body_hash:
                    raise Conflict(
                        "this Idempotency-Key is in use", "idempotency_conflict"
                    ) from None
                return existing
            await session.refresh(row)
            return row

    @staticmethod
    async def _by_idempotency(session: Any, key_id: str, idem: str) -> Sandbox | None:
        result = await session.execute(
            select(Sandbox).where(
                col(Sandbox.api_key_id) == key_id, col(Sandbox.idempotency_key) == idem
            )
        )
        row: Sandbox | None = result.scalar_one_or_none()
        return row

    async def _start(self, row: Sandbox) -> Sandbox:
        lifetime_s = (utc(row.lifetime_ends_at) - utcnow()).total_seconds()
        body = {
            "sandbox_id": row.id,
            "template": row.template,
            "env": row.env,
            "limits": {"vcpus": row.vcpus, "memory_mb": row.memory_mb} if row.vcpus else None,
            "network": row.network,
            "lifetime_s": max(lifetime_s, 1.0),
        }
        body["isolation"] = row.isolation
        failures: list[str] = []
        code = "sandbox_unavailable"
        for url in self.vmhosts.candidates():
            try:
                reply = await self.vmhosts.call("POST", url, "/v1/sandboxes", json=body)
            except VmhostDown as exc:
                failures.append(exc.message if len(self.vmhosts.urls) == 1 else str(exc))
                code = exc.code if exc.code != "vmhost_error" else code
                continue
            if not reply.ok:
                await self._fail(row, f"{reply.error['code']}: {reply.error['message']}")
                raise VmhostRefused(reply)
            return await self._mark_running(row, url, reply.body)
        message = "; ".join(failures) or "no vmhost answered"
        await self._fail(row, f"the sandbox could not be started: {message}")
        raise Unavailable(f"the sandbox could not be started: {message}", code)

    async def _mark_running(self, row: Sandbox, url: str, info: dict[str, Any]) -> Sandbox:
        async with self.db.session() as session:
            current = await session.get(Sandbox, row.id, with_for_update=True)
            assert current is not None
            if current.state != "starting":  # the reaper ended it meanwhile: stop it there too
                await session.rollback()
                await self.vmhosts.end(url, row.id, current.termination_reason or "canceled")
                return current
            current.state = "running"
            current.vmhost_url = url
            current.driver = str(info.get("driver") or DRIVERS.get(row.isolation))
            current.started_at = parse_time(info.get("started_at")) or utcnow()
            limits = info.get("limits") or {}
            current.vcpus = int(limits.get("vcpus") or current.vcpus or 1)
            current.memory_mb = int(limits.get("memory_mb") or current.memory_mb or 512)
            await session.commit()
            await session.refresh(current)
            return current

    async def _fail(self, row: Sandbox, message: str) -> None:
        await record_end(
            self.db, row.id, "internal_error", None, utcnow(), self.settings.plans,
            self.settings.meter_event_name, message,
        )  # fmt: skip

    # --- read ----------------------------------------------------------------------
    async def get(self, key: ApiKey, sandbox_id: str) -> Sandbox:
        async with self.db.read() as session:
            row = await session.get(Sandbox, sandbox_id)
        if row is None or row.api_key_id != key.id:
            raise NotFound(f"no sandbox {sandbox_id!r}")
        return row

    async def running(self, key: ApiKey, sandbox_id: str) -> Sandbox:
        row = await self.get(key, sandbox_id)
        if row.state != "running" or row.vmhost_url is None:
            raise Conflict(
                f"sandbox {sandbox_id} is {row.state}"
                + (f" ({row.termination_reason})" if row.termination_reason else ""),
                "sandbox_not_running",
            )
        return row

    async def list(
        self,
        key: ApiKey,
        state: str | None,
        metadata: dict[str, str],
        limit: int,
        cursor: str | None,
    ) -> tuple[list[Sandbox], str | None]:
        query = select(Sandbox).where(col(Sandbox.api_key_id) == key.id)
        if state is not None:
            query = query.where(col(Sandbox.state) == state)
        if cursor is not None:
            query = query.where(col(Sandbox.id) < cursor)
        query = query.order_by(col(Sandbox.id).desc())
        found: list[Sandbox] = []
        async with self.db.read() as session:
            # metadata is a JSON column: filter in Python, reading in pages
            batch_cursor: str | None = None
            while len(found) <= limit:
                page_query = (
                    query if batch_cursor is None else query.where(col(Sandbox.id) < batch_cursor)
                )
                rows = list((await session.execute(page_query.limit(500))).scalars())
                found += [r for r in rows if _matches(r, metadata)]
                if len(rows) < 500:
                    break
                batch_cursor = rows[-1].id
        page = found[:limit]
        return page, (page[-1].id if len(found) > limit else None)

    # --- change --------------------------------------------------------------------
    async def set_timeout(self, key: ApiKey, sandbox_id: str, timeout_s: float) -> Sandbox:
        await self.running(key, sandbox_id)
        async with self.db.session() as session:
            row = await session.get(Sandbox, sandbox_id, with_for_update=True)
            assert row is not None
            if row.state != "running":
                await session.rollback()
                raise Conflict(f"sandbox {sandbox_id} is {row.state}", "sandbox_not_running")
            wanted = utcnow() + timedelta(seconds=timeout_s)
            row.expires_at = min(wanted, utc(row.lifetime_ends_at))
            row.timeout_s = timeout_s
            await session.commit()
            await session.refresh(row)
            return row

    async def delete(self, key: ApiKey, sandbox_id: str) -> Sandbox:
        row = await self.get(key, sandbox_id)
        if row.state == "ended":
            return row
        try:
            ended = await end_sandbox(
                self.db, self.vmhosts.end, row, "canceled", self.settings.plans,
                self.settings.meter_event_name,
            )  # fmt: skip
        except VmhostDown as exc:
            raise Unavailable(
                f"the sandbox's vmhost cannot be reached ({exc.message}); it is ended as soon "
                "as it can be", "vmhost_unavailable",
            ) from exc  # fmt: skip
        await self.deliver(ended)
        return ended.sandbox

    async def deliver(self, ended: Ended) -> None:
        for event in ended.events:
            await queue.enqueue_webhook(self.redis, self.settings.common.queue_name, event.id, 1)


def _matches(row: Sandbox, metadata: dict[str, str]) -> bool:
    return all(row.sandbox_metadata.get(k) == v for k, v in metadata.items())
