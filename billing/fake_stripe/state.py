"""In-memory state of one fake Stripe account: objects, idempotency keys, faults, request log."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from .faults import Fault

DAY_S = 86_400
IDEMPOTENCY_TTL_S = DAY_S  # Stripe keeps idempotency keys for at least 24 hours
IDENTIFIER_TTL_S = DAY_S  # meter event identifiers are unique in a rolling 24 hours


@dataclass
class IdempotencyEntry:
    method: str
    path: str
    params: dict[str, Any]
    created: float
    request_id: str
    status: int = 0  # 0 while the first request is still running
    body: bytes = b""


@dataclass
class MeterEventRecord:
    event: dict[str, Any]  # the billing.meter_event object as answered
    customer: str
    value: int | None
    meter_id: str | None
    received: float


@dataclass
class RequestRecord:
    id: str
    method: str
    path: str
    query: dict[str, Any]
    params: dict[str, Any]
    status: int
    time: float
    idempotency_key: str | None = None
    replayed: bool = False
    fault: str | None = None
    error: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Store:
    """Everything the fake remembers; ``clock`` gives Unix seconds."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock = clock
        self.reset()

    def reset(self) -> None:
        self.customers: dict[str, dict[str, Any]] = {}
        self.meters: dict[str, dict[str, Any]] = {}
        self.events: list[MeterEventRecord] = []
        self.identifiers: OrderedDict[str, float] = OrderedDict()
        self.idempotency: OrderedDict[str, IdempotencyEntry] = OrderedDict()
        self.faults: list[Fault] = []
        self.log: list[RequestRecord] = []

    def now(self) -> int:
        return int(self.clock())

    # -- rolling windows ------------------------------------------------------------------

    def _expire(self) -> None:
        now = self.clock()
        while self.identifiers:
            identifier, seen = next(iter(self.identifiers.items()))
            if seen + IDENTIFIER_TTL_S > now:
                break
            del self.identifiers[identifier]
        while self.idempotency:
            key, entry = next(iter(self.idempotency.items()))
            if entry.created + IDEMPOTENCY_TTL_S > now:
                break
            del self.idempotency[key]

    def identifier_seen(self, identifier: str) -> bool:
        self._expire()
        return identifier in self.identifiers

    def remember_identifier(self, identifier: str) -> None:
        self.identifiers[identifier] = self.clock()

    def idempotency_entry(self, key: str) -> IdempotencyEntry | None:
        self._expire()
        return self.idempotency.get(key)

    def start_idempotent(self, key: str, entry: IdempotencyEntry) -> None:
        self.idempotency[key] = entry

    def forget_idempotent(self, key: str) -> None:
        self.idempotency.pop(key, None)

    # -- faults ---------------------------------------------------------------------------

    def find_fault(self, method: str, path: str) -> Fault | None:
        for fault in self.faults:
            if fault.matches(method, path):
                return fault
        return None

    def consume_fault(self, fault: Fault) -> None:
        fault.count -= 1
        fault.fired += 1
        if fault.count <= 0 and fault in self.faults:
            self.faults.remove(fault)

    # -- meter events ---------------------------------------------------------------------

    def meter_for_event(self, event_name: str) -> dict[str, Any] | None:
        for meter in self.meters.values():
            if meter["event_name"] == event_name and meter["status"] == "active":
                return meter
        return None

    def select_events(
        self, customer: str | None = None, event_name: str | None = None
    ) -> list[MeterEventRecord]:
        return [
            record
            for record in self.events
            if (customer is None or record.customer == customer)
            and (event_name is None or record.event["event_name"] == event_name)
        ]

    def summary(self) -> list[dict[str, Any]]:
        rows: dict[tuple[str, str], dict[str, Any]] = {}
        for record in self.events:
            key = (record.customer, str(record.event["event_name"]))
            row = rows.setdefault(
                key, {"customer": key[0], "event_name": key[1], "value": 0, "count": 0}
            )
            row["value"] += record.value or 0
            row["count"] += 1
        return list(rows.values())
