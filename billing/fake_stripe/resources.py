"""The Stripe resources the fake serves: customers, billing meters, billing meter events.

Each function validates decoded params like Stripe (unknown/missing params, types, limits)
and returns the object to answer, or raises StripeError.
"""

from __future__ import annotations

import re
import uuid
from typing import Any

from .errors import StripeError, invalid, missing_param, not_found, unknown_param
from .faults import random_id
from .state import DAY_S, MeterEventRecord, Store

MAX_PAST_S = 35 * DAY_S  # meter event timestamps: within the past 35 days...
MAX_FUTURE_S = 5 * 60  # ...or up to 5 minutes in the future
MAX_METER_VALUE = 2**63 - 1
_INTEGER = re.compile(r"-?\d+")
_WHOLE = re.compile(r"\d+")

CUSTOMER_PARAMS = frozenset(
    {"address", "description", "email", "expand", "metadata", "name", "phone", "shipping"}
)
METER_PARAMS = frozenset(
    {
        "customer_mapping",
        "default_aggregation",
        "display_name",
        "event_name",
        "event_time_window",
        "expand",
        "value_settings",
    }
)
METER_EVENT_PARAMS = frozenset({"event_name", "expand", "identifier", "payload", "timestamp"})


# -- param helpers ------------------------------------------------------------------------


def _check_known(params: dict[str, Any], allowed: frozenset[str], prefix: str = "") -> None:
    for key in params:
        if key not in allowed:
            raise unknown_param(f"{prefix}[{key}]" if prefix else key)


def _string(
    params: dict[str, Any], key: str, *, required: bool = False, max_len: int = 5000
) -> str | None:
    value = params.get(key)
    if value is None:
        if required:
            raise missing_param(key)
        return None
    if not isinstance(value, str):
        raise invalid(f"Invalid string: {value!r}", param=key)
    if required and value == "":
        raise invalid(
            f"You passed an empty string for '{key}'. We assume empty values are an attempt "
            "to unset a parameter; however '{key}' cannot be unset. You should remove "
            f"'{key}' from your request or supply a non-empty value.".replace("{key}", key),
            code="parameter_invalid_empty",
            param=key,
        )
    if len(value) > max_len:
        raise invalid(
            f"Invalid string: {value[:20]}...; must be at most {max_len} characters",
            code="string_length_exceeded",
            param=key,
        )
    return value


def _hash(params: dict[str, Any], key: str, *, required: bool = False) -> dict[str, Any] | None:
    value = params.get(key)
    if value is None or value == "":
        if required:
            raise missing_param(key)
        return None
    if not isinstance(value, dict):
        raise invalid(f"Invalid object: {key} must be a hash", param=key)
    return value


def _metadata(params: dict[str, Any]) -> dict[str, str]:
    metadata = _hash(params, "metadata") or {}
    if len(metadata) > 50:
        raise invalid("You can specify up to 50 keys in metadata.", param="metadata")
    for key, value in metadata.items():
        if not isinstance(value, str):
            raise invalid(f"Invalid metadata value for {key}: must be a string", param="metadata")
        if len(key) > 40:
            raise invalid("Metadata keys can be at most 40 characters.", param=f"metadata[{key}]")
        if len(value) > 500:
            raise invalid(
                "Metadata values can be at most 500 characters.", param=f"metadata[{key}]"
            )
    return {k: v for k, v in metadata.items() if v != ""}


# -- customers ----------------------------------------------------------------------------


def create_customer(store: Store, params: dict[str, Any]) -> dict[str, Any]:
    _check_known(params, CUSTOMER_PARAMS)
    customer_id = random_id("cus_", 14)
    customer: dict[str, Any] = {
        "id": customer_id,
        "object": "customer",
        "address": _hash(params, "address"),
        "balance": 0,
        "created": store.now(),
        "currency": None,
        "default_source": None,
        "delinquent": False,
        "description": _string(params, "description", max_len=350) or None,
        "email": _string(params, "email", max_len=512) or None,
        "invoice_prefix": customer_id[4:12].upper(),
        "livemode": False,
        "metadata": _metadata(params),
        "name": _string(params, "name", max_len=256) or None,
        "phone": _string(params, "phone", max_len=20) or None,
        "preferred_locales": [],
        "shipping": _hash(params, "shipping"),
        "tax_exempt": "none",
        "test_clock": None,
    }
    store.customers[customer_id] = customer
    return customer


def retrieve_customer(store: Store, customer_id: str) -> dict[str, Any]:
    customer = store.customers.get(customer_id)
    if customer is None:
        raise not_found("customer", customer_id)
    return customer


# -- meters -------------------------------------------------------------------------------


def create_meter(store: Store, params: dict[str, Any]) -> dict[str, Any]:
    _check_known(params, METER_PARAMS)
    display_name = _string(params, "display_name", required=True, max_len=250)
    event_name = _string(params, "event_name", required=True, max_len=100)
    aggregation = _hash(params, "default_aggregation", required=True) or {}
    _check_known(aggregation, frozenset({"formula"}), "default_aggregation")
    formula = _string(aggregation, "formula") if "formula" in aggregation else None
    if formula is None:
        raise missing_param("default_aggregation[formula]")
    if formula not in ("sum", "count", "last"):
        raise invalid(
            "Invalid default_aggregation[formula]: must be one of sum, count, or last",
            param="default_aggregation[formula]",
        )
    mapping = _hash(params, "customer_mapping") or {}
    _check_known(mapping, frozenset({"event_payload_key", "type"}), "customer_mapping")
    customer_key = mapping.get("event_payload_key", "stripe_customer_id")
    if mapping and "event_payload_key" not in mapping:
        raise missing_param("customer_mapping[event_payload_key]")
    if mapping.get("type", "by_id") != "by_id":
        raise invalid(
            "Invalid customer_mapping[type]: must be by_id", param="customer_mapping[type]"
        )
    settings = _hash(params, "value_settings") or {}
    _check_known(settings, frozenset({"event_payload_key"}), "value_settings")
    if settings and "event_payload_key" not in settings:
        raise missing_param("value_settings[event_payload_key]")
    value_key = settings.get("event_payload_key", "value")
    window = _string(params, "event_time_window")
    if window not in (None, "day", "hour"):
        raise invalid(
            "Invalid event_time_window: must be one of day or hour", param="event_time_window"
        )
    if store.meter_for_event(str(event_name)) is not None:
        raise invalid(
            f"An active meter with event_name '{event_name}' already exists.",
            code="resource_already_exists",
            param="event_name",
        )
    now = store.now()
    meter: dict[str, Any] = {
        "id": random_id("mtr_", 24),
        "object": "billing.meter",
        "created": now,
        "customer_mapping": {"event_payload_key": customer_key, "type": "by_id"},
        "default_aggregation": {"formula": formula},
        "display_name": display_name,
        "event_name": event_name,
        "event_time_window": window,
        "livemode": False,
        "status": "active",
        "status_transitions": {"deactivated_at": None},
        "updated": now,
        "value_settings": {"event_payload_key": value_key},
    }
    store.meters[meter["id"]] = meter
    return meter


def retrieve_meter(store: Store, meter_id: str) -> dict[str, Any]:
    meter = store.meters.get(meter_id)
    if meter is None:
        raise not_found("billing meter", meter_id)
    return meter


def list_meters(store: Store) -> dict[str, Any]:
    return {
        "object": "list",
        "data": list(reversed(store.meters.values())),
        "has_more": False,
        "url": "/v1/billing/meters",
    }


# -- meter events -------------------------------------------------------------------------


def _timestamp(store: Store, params: dict[str, Any]) -> int:
    raw = params.get("timestamp")
    if raw is None or raw == "":
        return store.now()
    if not isinstance(raw, str) or not _INTEGER.fullmatch(raw):
        raise invalid(
            f"Invalid integer: {raw}", code="parameter_invalid_integer", param="timestamp"
        )
    timestamp = int(raw)
    now = store.now()
    if timestamp < now - MAX_PAST_S:
        raise invalid(
            "Timestamp must be within the past 35 days: the event's timestamp "
            f"{timestamp} is too far in the past.",
            code="timestamp_too_far_in_past",
            param="timestamp",
        )
    if timestamp > now + MAX_FUTURE_S:
        raise invalid(
            "Timestamp must not be more than 5 minutes in the future: the event's timestamp "
            f"{timestamp} is in the future.",
            code="timestamp_in_future",
            param="timestamp",
        )
    return timestamp


def _meter_value(payload: dict[str, Any], value_key: str) -> int:
    param = f"payload[{value_key}]"
    raw = payload.get(value_key)
    if raw is None or raw == "":
        raise invalid(
            f"The payload must contain the value key '{value_key}' with a whole number.",
            code="meter_event_invalid_value",
            param=param,
        )
    if not isinstance(raw, str) or not _WHOLE.fullmatch(raw):
        raise invalid(
            f"Invalid meter event value '{raw}': the value must be a whole number "
            "(an integer of zero or more, as a string of digits).",
            code="meter_event_invalid_value",
            param=param,
        )
    value = int(raw)
    if value > MAX_METER_VALUE:
        raise invalid(
            f"Invalid meter event value '{raw}': too many digits.",
            code="meter_event_value_too_many_digits",
            param=param,
        )
    return value


def create_meter_event(store: Store, params: dict[str, Any]) -> dict[str, Any]:
    """Validate and record one meter event.

    With no meter configured any ``event_name`` is accepted, with the default payload keys
    ``stripe_customer_id`` and ``value``. Once a meter exists, ``event_name`` must be one of
    an active meter's, and that meter's payload keys apply (a ``count`` meter needs no value).
    """
    _check_known(params, METER_EVENT_PARAMS)
    event_name = str(_string(params, "event_name", required=True, max_len=100))
    payload = _hash(params, "payload", required=True) or {}
    for key, value in payload.items():
        if not isinstance(value, str):
            raise invalid(f"Invalid payload[{key}]: must be a string", param=f"payload[{key}]")
    identifier = _string(params, "identifier", max_len=100) or None
    timestamp = _timestamp(store, params)

    meter = store.meter_for_event(event_name)
    if meter is None and store.meters:
        raise invalid(
            f"No active meter was found for event_name '{event_name}'.",
            code="no_meter",
            param="event_name",
        )
    customer_key = meter["customer_mapping"]["event_payload_key"] if meter else "stripe_customer_id"
    value_key = meter["value_settings"]["event_payload_key"] if meter else "value"
    customer = payload.get(customer_key)
    if not customer:
        raise invalid(
            f"The payload must contain the customer key '{customer_key}'.",
            code="meter_event_no_customer_defined",
            param=f"payload[{customer_key}]",
        )
    if customer not in store.customers:
        raise invalid(
            f"No such customer: '{customer}'",
            code="meter_event_customer_not_found",
            param=f"payload[{customer_key}]",
        )
    counting = meter is not None and meter["default_aggregation"]["formula"] == "count"
    value = None if counting and value_key not in payload else _meter_value(payload, value_key)

    if identifier is not None and store.identifier_seen(identifier):
        raise duplicate_identifier(identifier)
    if identifier is None:
        identifier = str(uuid.uuid4())
    event: dict[str, Any] = {
        "object": "billing.meter_event",
        "created": store.now(),
        "event_name": event_name,
        "identifier": identifier,
        "livemode": False,
        "payload": dict(payload),
        "timestamp": timestamp,
    }
    store.remember_identifier(identifier)
    store.events.append(
        MeterEventRecord(
            event=event,
            customer=str(customer),
            value=value,
            meter_id=meter["id"] if meter else None,
            received=store.clock(),
        )
    )
    return event


def duplicate_identifier(identifier: str) -> StripeError:
    return invalid(
        f"A meter event with identifier '{identifier}' already exists: identifiers must be "
        "unique within a rolling 24 hour period.",
        code="meter_event_duplicate_identifier",
        param="identifier",
    )
