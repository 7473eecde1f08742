"""Errors of the billing package.

BillingError            root (an InvalidInput: bad report parameters and the like), ``code``
└── InvalidPeriod       a usage report was asked for an impossible range or granularity
QuotaExceeded           the plan's sandbox-hours for this period are used up (429)
ConcurrencyLimit        the plan's concurrent sandboxes are all in use (429)
"""

from __future__ import annotations

from bulkhead.errors import InvalidInput, LimitReached


class BillingError(InvalidInput):
    code = "billing_error"


class InvalidPeriod(BillingError):
    code = "invalid_period"


class QuotaExceeded(LimitReached):
    code = "quota_exceeded"


class ConcurrencyLimit(LimitReached):
    code = "concurrency_limit"
