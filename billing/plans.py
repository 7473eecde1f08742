"""Plans come from configuration, not code: ``BULKHEAD_PLANS`` is a JSON object, or the path
of a JSON file holding one, mapping plan names to their limits::

    {"free": {"included_hours": 100, "max_lifetime_s": 86400, "max_concurrent": 20},
     "pro":  {"included_hours": null, "max_concurrent": 100, "metered": true,
              "requires_stripe_customer": true}}

Fields: ``included_hours`` or ``included_seconds`` (sandbox time per calendar month, UTC;
null = no cap), ``max_lifetime_s`` (nothing lives longer, default 86400), ``max_concurrent``
(sandboxes and jobs queued or running at once; null = no limit), ``metered`` (usage is sent
to Stripe) and ``requires_stripe_customer``. Unknown fields are rejected. Tests and operators
can define tiny plans (``"included_seconds": 5``) to exercise the edges.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bulkhead.errors import InvalidInput
from bulkhead.settings import SettingsError

DEFAULT_PLANS: dict[str, dict[str, Any]] = {
    "free": {"included_hours": 100, "max_lifetime_s": 86400, "max_concurrent": 20},
    "pro": {
        "included_hours": None,
        "max_lifetime_s": 86400,
        "max_concurrent": 100,
        "metered": True,
        "requires_stripe_customer": True,
    },
}
FIELDS = {
    "included_hours",
    "included_seconds",
    "max_lifetime_s",
    "max_concurrent",
    "metered",
    "requires_stripe_customer",
}


@dataclass(frozen=True)
class Plan:
    name: str
    included_seconds: int | None
    max_lifetime_s: int
    max_concurrent: int | None
    metered: bool
    requires_stripe_customer: bool

    @property
    def included_hours(self) -> float | None:
        return None if self.included_seconds is None else self.included_seconds / 3600


@dataclass(frozen=True)
class Plans:
    by_name: dict[str, Plan]

    def get(self, name: str) -> Plan:
        try:
            return self.by_name[name]
        except KeyError:
            raise InvalidInput(
                f"plan {name!r} is not configured (plans: {', '.join(self.names())})",
                "unknown_plan",
            ) from None

    def names(self) -> list[str]:
        return sorted(self.by_name)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Plans:
        env = os.environ if env is None else env
        raw = env.get("BULKHEAD_PLANS", "").strip()
        if not raw:
            return cls.parse(DEFAULT_PLANS)
        text = raw if raw.startswith("{") else _read(raw)
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise SettingsError(f"BULKHEAD_PLANS is not valid JSON: {exc}") from exc
        return cls.parse(data)

    @classmethod
    def parse(cls, data: Any) -> Plans:
        if not isinstance(data, dict) or not data:
            raise SettingsError("BULKHEAD_PLANS must be a non-empty JSON object of plans")
        return cls({name: _plan(name, spec) for name, spec in data.items()})


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError as exc:
        raise SettingsError(f"BULKHEAD_PLANS: cannot read {path}: {exc}") from exc


def _plan(name: str, spec: Any) -> Plan:
    if not isinstance(spec, dict):
        raise SettingsError(f"plan {name!r} must be a JSON object")
    unknown = set(spec) - FIELDS
    if unknown:
        raise SettingsError(f"plan {name!r}: unknown field(s) {', '.join(sorted(unknown))}")
    if "included_hours" in spec and "included_seconds" in spec:
        raise SettingsError(f"plan {name!r}: give included_hours or included_seconds, not both")
    included: int | None = None
    if spec.get("included_seconds") is not None:
        included = _whole(name, "included_seconds", spec["included_seconds"])
    elif spec.get("included_hours") is not None:
        hours = spec["included_hours"]
        if not isinstance(hours, int | float) or isinstance(hours, bool) or hours < 0:
            raise SettingsError(f"plan {name!r}: included_hours must be a number >= 0")
        included = int(round(hours * 3600))
    concurrent = spec.get("max_concurrent")
    return Plan(
        name=name,
        included_seconds=included,
        max_lifetime_s=_whole(name, "max_lifetime_s", spec.get("max_lifetime_s", 86400)),
        max_concurrent=None if concurrent is None else _whole(name, "max_concurrent", concurrent),
        metered=bool(spec.get("metered", False)),
        requires_stripe_customer=bool(spec.get("requires_stripe_customer", False)),
    )


def _whole(plan: str, field: str, value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise SettingsError(f"plan {plan!r}: {field} must be a whole number >= 0")
    return value
