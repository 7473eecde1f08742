"""Errors of the shared package.

BulkheadError            root; carries a stable snake_case ``code`` and a message
├── NotFound             the object does not exist (or belongs to another tenant)
├── Conflict             the request clashes with the object's current state
└── InvalidInput         a value the caller gave cannot be used
"""

from __future__ import annotations


class BulkheadError(Exception):
    code = "internal_error"

    def __init__(self, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code


class NotFound(BulkheadError):
    code = "not_found"


class Conflict(BulkheadError):
    code = "conflict"


class InvalidInput(BulkheadError):
    code = "invalid_request"


class TooLarge(BulkheadError):
    code = "payload_too_large"


class LimitReached(BulkheadError):
    """A plan limit refuses the request for now (HTTP 429)."""

    code = "limit_reached"
