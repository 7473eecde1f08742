"""Injected failures: what they match, and the Stripe-shaped answers they send."""

from __future__ import annotations

import secrets
import string
from dataclasses import asdict, dataclass, field
from typing import Any

from .errors import StripeError, api_error, invalid

_ALPHABET = string.ascii_letters + string.digits


def random_id(prefix: str, length: int = 24) -> str:
    return prefix + "".join(secrets.choice(_ALPHABET) for _ in range(length))


@dataclass
class Fault:
    """One injected failure, answered to the next ``count`` matching ``/v1`` requests.

    ``status`` None only delays (``delay_s``) and then answers normally. With ``after_apply``
    the request is carried out (and its idempotent result saved) before the error is sent,
    like an answer lost on the way back; it fires only when the request succeeded.
    ``should_retry`` sets ``Stripe-Should-Retry`` (None: the default for ``code``: ``true``
    for ``lock_timeout``, absent otherwise); ``retry_after`` sets ``Retry-After`` seconds.
    """

    status: int | None = 500
    count: int = 1
    delay_s: float = 0.0
    path_prefix: str = "/v1/billing/meter_events"
    after_apply: bool = False
    method: str | None = None
    code: str | None = None
    should_retry: bool | None = None
    retry_after: int | None = None
    id: str = field(default_factory=lambda: random_id("fault_", 12))
    fired: int = 0

    def __post_init__(self) -> None:
        if self.status is not None and not 400 <= self.status <= 599:
            raise ValueError("status must be an HTTP error status (400-599) or None")
        if self.count < 1:
            raise ValueError("count must be at least 1")
        if self.delay_s < 0:
            raise ValueError("delay_s must not be negative")
        if not self.path_prefix.startswith("/"):
            raise ValueError("path_prefix must start with /")
        if self.after_apply and self.status is None:
            raise ValueError("after_apply needs a status")
        if self.method is not None:
            self.method = self.method.upper()
        if self.code is None and self.status == 429:
            self.code = "rate_limit"

    def matches(self, method: str, path: str) -> bool:
        return (
            self.count > 0
            and path.startswith(self.path_prefix)
            and (self.method is None or self.method == method)
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


_FAULT_FIELDS = {
    "status": (int, type(None)),
    "count": (int,),
    "delay_s": (int, float),
    "path_prefix": (str,),
    "after_apply": (bool,),
    "method": (str, type(None)),
    "code": (str, type(None)),
    "should_retry": (bool, type(None)),
    "retry_after": (int, type(None)),
}


def parse_fault_spec(spec: Any) -> dict[str, Any]:
    """Keyword arguments for ``FakeStripe.inject`` from a ``POST /_fake/faults`` JSON body."""
    if not isinstance(spec, dict):
        raise invalid("The body must be a JSON object.")
    for name, value in spec.items():
        types = _FAULT_FIELDS.get(name)
        if types is None:
            raise invalid(f"Received unknown parameter: {name}", param=name)
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            raise invalid(f"Invalid {name}: {value!r}", param=name)
    return spec


def fault_error(fault: Fault) -> StripeError:
    """The answer an injected fault sends, with Stripe's retry headers where they apply."""
    status = fault.status or 500
    headers: dict[str, str] = {}
    should_retry = fault.should_retry
    if should_retry is None and fault.code == "lock_timeout":
        should_retry = True  # Stripe marks lock timeouts retryable; plain rate limits not
    if should_retry is not None:
        headers["Stripe-Should-Retry"] = "true" if should_retry else "false"
    if fault.retry_after is not None:
        headers["Retry-After"] = str(fault.retry_after)
    if status == 429:
        if fault.code == "lock_timeout":
            message = (
                "This object cannot be accessed right now because another API request or "
                "Stripe process is currently accessing it. Please retry shortly."
            )
        else:
            message = (
                "Request rate limit exceeded. Learn more about rate limits here "
                "https://stripe.com/docs/rate-limits."
            )
        return StripeError(429, "invalid_request_error", message, code=fault.code, headers=headers)
    if status >= 500:
        error = api_error("An unknown error occurred (injected by fake Stripe: " + fault.id + ")")
        error.status, error.code, error.headers = status, fault.code, headers
        return error
    return StripeError(
        status,
        "invalid_request_error",
        f"Injected failure {fault.id}",
        code=fault.code,
        headers=headers,
    )
