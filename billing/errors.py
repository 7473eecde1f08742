"""Errors of the billing package.

BillingError        root, with a stable ``code``
└── InvalidPeriod   a usage report was asked for an impossible time range or granularity
"""

from __future__ import annotations

from bulkhead.errors import InvalidInput


class BillingError(InvalidInput):
    code = "billing_error"


class InvalidPeriod(BillingError):
    code = "invalid_period"
