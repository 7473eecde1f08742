"""Database tables (SQLModel). The database is the source of truth for every object.

Times are stored as timezone-aware UTC datetimes. JSON-shaped request parts are JSON columns.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import JSON, Column, DateTime, Text, UniqueConstraint
from sqlmodel import Field, SQLModel

JOB_STATUSES = ("queued", "running", "completed", "timed_out", "canceled", "failed")
TERMINAL_STATUSES = frozenset({"completed", "timed_out", "canceled", "failed"})
TERMINATION_REASONS = (
    "exit",
    "timeout",
    "canceled",
    "quota_exceeded",
    "lifetime_exceeded",
    "oom",
    "output_limit",
    "internal_error",
)


def utcnow() -> datetime:
    return datetime.now(UTC)


def _ts(nullable: bool = True) -> Any:
    return Field(default=None, sa_column=Column(DateTime(timezone=True), nullable=nullable))


def iso(value: datetime | None) -> str | None:
    if value is None:
        return None
    if value.tzinfo is None:  # SQLite hands back naive datetimes
        value = value.replace(tzinfo=UTC)
    return value.astimezone(UTC).isoformat().replace("+00:00", "Z")


def utc(value: datetime) -> datetime:
    """A stored timestamp as an aware UTC datetime (SQLite returns naive ones)."""
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def aware(value: datetime | None) -> datetime | None:
    if value is None or value.tzinfo is not None:
        return value
    return value.replace(tzinfo=UTC)


class SchemaVersion(SQLModel, table=True):
    __tablename__ = "schema_version"
    id: int = Field(default=1, primary_key=True)
    version: int


class ApiKey(SQLModel, table=True):
    __tablename__ = "api_keys"
    id: str = Field(primary_key=True)
    name: str
    prefix: str = Field(index=True, unique=True)
    key_hash: str
    webhook_secret: str
    plan: str = "free"
    webhook_url: str | None = None
    stripe_customer_id: str | None = None
    created_at: datetime = Field(
        default_factory=utcnow, sa_column=Column(DateTime(timezone=True), nullable=False)
    )
    revoked_at: datetime | None = _ts()

    def public(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "prefix": self.prefix,
            "plan": self.plan,
            "webhook_url": self.webhook_url,
            "stripe_customer_id": self.stripe_customer_id,
            "created_at": iso(self.created_at),
            "revoked_at": iso(self.revoked_at),
        }


class Job(SQLModel, table=True):
    __tablename__ = "jobs"
    __table_args__ = (UniqueConstraint("api_key_id", "idempotency_key"),)

    id: str = Field(primary_key=True)
    api_key_id: str = Field(index=True)
    status: str = Field(default="queued", index=True)
    # the request
    language: str | None = None
    code: str | None = Field(default=None, sa_column=Column(Text))
    command: list[str] | None = Field(default=None, sa_column=Column(JSON))
    stdin: str | None = Field(default=None, sa_column=Column(Text))
    env: dict[str, str] = Field(default_factory=dict, sa_column=Column(JSON))
    files: list[dict[str, str]] = Field(default_factory=list, sa_column=Column(JSON))
    timeout_s: float = 60.0
    vcpus: int = 1
    memory_mb: int = 512
    template: str = "base"
    network: bool = False
    isolation: str = "namespace"  # namespace (bwrap) | microvm (qemu)
    callback_url: str | None = None
    job_metadata: dict[str, str] = Field(default_factory=dict, sa_column=Column(JSON))
    idempotency_key: str | None = None
    request_hash: str | None = None
    # the outcome
    exit_code: int | None = None
    stdout: str = Field(default="", sa_column=Column(Text, nullable=False, default=""))
    stderr: str = Field(default="", sa_column=Column(Text, nullable=False, default=""))
    stdout_truncated: bool = False
    stderr_truncated: bool = False
    termination_reason: str | None = None
    error_code: str | None = None
    error_message: str | None = None
    created_at: datetime = Field(
        default_factory=utcnow, sa_column=Column(DateTime(timezone=True), nullable=False)
    )
    started_at: datetime | None = _ts()
    finished_at: datetime | None = _ts()
    duration_ms: int | None = None
    sandbox_seconds: int = 0
    # run bookkeeping (at-least-once delivery, crash recovery, cancel)
    attempt: int = 0
    heartbeat_at: datetime | None = _ts()
    cancel_requested: bool = False
    cancel_reason: str | None = None  # termination_reason for a requested stop (else canceled)
    vmhost_url: str | None = None

    def public(self) -> dict[str, Any]:
        error = None
        if self.error_code:
            error = {"code": self.error_code, "message": self.error_message or ""}
        return {
            "id": self.id,
            "object": "job",
            "status": self.status,
            "language": self.language,
            "command": self.command,
            "template": self.template,
            "network": self.network,
            "isolation": self.isolation,
            "timeout_s": self.timeout_s,
            "limits": {"vcpus": self.vcpus, "memory_mb": self.memory_mb},
            "exit_code": self.exit_code,
            "stdout": self.stdout,
            "stderr": self.stderr,
            "stdout_truncated": self.stdout_truncated,
            "stderr_truncated": self.stderr_truncated,
            "termination_reason": self.termination_reason,
            "error": error,
            "created_at": iso(self.created_at),
            "started_at": iso(self.started_at),
            "finished_at": iso(self.finished_at),
            "duration_ms": self.duration_ms,
            "usage": {"sandbox_seconds": self.sandbox_seconds},
            "callback_url": self.callback_url,
            "metadata": self.job_metadata,
        }


SANDBOX_STATES = ("starting", "running", "ended")


class Sandbox(SQLModel, table=True):
    """A held-open sandbox. ``starting`` and ``running`` ones hold a concurrency slot.

    ``expires_at`` moves with timeout changes but never past ``lifetime_ends_at`` (24 h,
    or the plan's lifetime, from creation). ``started_at``/``ended_at`` are the vmhost's
    real start and end; the ledger row is written in the transaction that sets ``ended``.
    """

    __tablename__ = "sandboxes"
    __table_args__ = (UniqueConstraint("api_key_id", "idempotency_key"),)

    id: str = Field(primary_key=True)
    api_key_id: str = Field(index=True)
    state: str = Field(default="starting", index=True)
    template: str = "base"
    env: dict[str, str] = Field(default_factory=dict, sa_column=Column(JSON))
    vcpus: int = 1
    memory_mb: int = 512
    network: bool = False
    isolation: str = "namespace"
    sandbox_metadata: dict[str, str] = Field(default_factory=dict, sa_column=Column(JSON))
    timeout_s: float = 300.0
    idempotency_key: str | None = None
    request_hash: str | None = None
    vmhost_url: str | None = None
    driver: str | None = None
    termination_reason: str | None = None
    error_message: str | None = None
    sandbox_seconds: int = 0
    created_at: datetime = Field(
        default_factory=utcnow, sa_column=Column(DateTime(timezone=True), nullable=False)
    )
    expires_at: datetime = Field(
        sa_column=Column(DateTime(timezone=True), nullable=False, index=True)
    )
    lifetime_ends_at: datetime = Field(sa_column=Column(DateTime(timezone=True), nullable=False))
    started_at: datetime | None = _ts()
    ended_at: datetime | None = _ts()
    end_requested: str | None = None  # a requested end's reason, carried out by the reaper

    def public(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "sandbox",
            "state": self.state,
            "template": self.template,
            "isolation": self.isolation,
            "driver": self.driver,
            "network": self.network,
            "limits": {"vcpus": self.vcpus, "memory_mb": self.memory_mb},
            "env_keys": sorted(self.env),
            "metadata": self.sandbox_metadata,
            "timeout_s": self.timeout_s,
            "created_at": iso(self.created_at),
            "started_at": iso(self.started_at),
            "expires_at": iso(self.expires_at),
            "lifetime_ends_at": iso(self.lifetime_ends_at),
            "ended_at": iso(self.ended_at),
            "termination_reason": self.termination_reason,
            "error": (
                {"code": self.termination_reason or "internal_error", "message": self.error_message}
                if self.error_message
                else None
            ),
            "usage": {"sandbox_seconds": self.sandbox_seconds},
        }


class WebhookEvent(SQLModel, table=True):
    """One event to deliver (``msg_…`` is the Standard Webhooks ``webhook-id``)."""

    __tablename__ = "webhook_events"
    __table_args__ = (UniqueConstraint("subject_id", "type"),)

    id: str = Field(primary_key=True)
    api_key_id: str = Field(index=True)
    subject_id: str = Field(index=True)
    type: str
    url: str
    payload: dict[str, Any] = Field(sa_column=Column(JSON, nullable=False))
    status: str = "pending"  # pending | delivered | failed
    attempts: int = 0
    created_at: datetime = Field(
        default_factory=utcnow, sa_column=Column(DateTime(timezone=True), nullable=False)
    )
    delivered_at: datetime | None = _ts()
    next_attempt_at: datetime | None = _ts()


class WebhookAttempt(SQLModel, table=True):
    """One HTTP attempt to deliver an event; every attempt is kept."""

    __tablename__ = "webhook_attempts"
    __table_args__ = (UniqueConstraint("event_id", "slot"),)

    id: str = Field(primary_key=True)
    event_id: str = Field(index=True)
    subject_id: str = Field(index=True)
    attempt: int  # 1, 2, 3 … over all tries of the event
    slot: int | None = None  # the automatic schedule's slot; None for a manual redelivery
    url: str
    status_code: int | None = None
    error: str | None = None
    duration_ms: int = 0
    trigger: str = "auto"  # auto | manual
    created_at: datetime = Field(
        default_factory=utcnow, sa_column=Column(DateTime(timezone=True), nullable=False)
    )

    def public(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "event_id": self.event_id,
            "attempt": self.attempt,
            "url": self.url,
            "status_code": self.status_code,
            "error": self.error,
            "duration_ms": self.duration_ms,
            "trigger": self.trigger,
            "created_at": iso(self.created_at),
            "succeeded": self.status_code is not None and 200 <= self.status_code < 300,
        }


class UsageRecord(SQLModel, table=True):
    """The usage ledger: one row per sandbox run, written with the run's end."""

    __tablename__ = "usage_records"

    id: str = Field(primary_key=True)
    api_key_id: str = Field(index=True)
    subject_type: str  # job | sandbox
    subject_id: str = Field(unique=True)
    started_at: datetime = Field(sa_column=Column(DateTime(timezone=True), nullable=False))
    ended_at: datetime = Field(
        sa_column=Column(DateTime(timezone=True), nullable=False, index=True)
    )
    seconds: int
    vcpus: int
    memory_mb: int
    vcpu_seconds: int
    gib_seconds: float


class MeterOutbox(SQLModel, table=True):
    """Usage waiting to be sent to Stripe as a Billing Meter Event (one per ledger row).

    Written in the transaction that writes the ledger row; ``id`` is that row's id and is
    sent as the meter event's ``identifier``, so a resend after a crash is deduplicated.
    """

    __tablename__ = "meter_outbox"

    id: str = Field(primary_key=True)
    api_key_id: str = Field(index=True)
    stripe_customer_id: str
    event_name: str
    value: int
    timestamp: int  # unix seconds: the usage's end
    status: str = Field(default="pending", index=True)  # pending | sent | failed
    attempts: int = 0
    next_attempt_at: datetime = Field(
        default_factory=utcnow, sa_column=Column(DateTime(timezone=True), nullable=False)
    )
    last_error: str | None = None
    created_at: datetime = Field(
        default_factory=utcnow, sa_column=Column(DateTime(timezone=True), nullable=False)
    )
    sent_at: datetime | None = _ts()
