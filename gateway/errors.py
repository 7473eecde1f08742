"""API errors: each has an HTTP status and a stable snake_case code.

ApiError                      root: status + code + message, rendered as
│                             {"error": {"code", "message"}} by the error middleware
├── Unauthorized       401    missing, unknown or revoked API key / admin token
├── NotFoundError      404    no such object, or another tenant's
├── ConflictError      409    idempotency key reused with another body, state clash
├── PayloadTooLarge    413    body or code over the documented limit
├── Unprocessable      422    invalid JSON, unknown or invalid fields
├── TooManyRequests    429    a plan limit: quota_exceeded, concurrency_limit
└── Unavailable        503    a dependency (database, Redis) is down

Domain errors from ``bulkhead.errors`` are mapped here too (NotFound → 404, Conflict → 409,
InvalidInput → 422, LimitReached → 429), so services never speak HTTP.
"""

from __future__ import annotations

from bulkhead import errors as domain


class ApiError(Exception):
    status = 500
    code = "internal_error"

    def __init__(self, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code

    def body(self) -> dict[str, dict[str, str]]:
        return {"error": {"code": self.code, "message": self.message}}


class Unauthorized(ApiError):
    status = 401
    code = "unauthorized"


class NotFoundError(ApiError):
    status = 404
    code = "not_found"


class ConflictError(ApiError):
    status = 409
    code = "conflict"


class PayloadTooLarge(ApiError):
    status = 413
    code = "payload_too_large"


class Unprocessable(ApiError):
    status = 422
    code = "invalid_request"


class TooManyRequests(ApiError):
    status = 429
    code = "too_many_requests"


class Unavailable(ApiError):
    status = 503
    code = "unavailable"


def from_domain(exc: domain.BulkheadError) -> ApiError:
    if isinstance(exc, domain.NotFound):
        return NotFoundError(exc.message, exc.code)
    if isinstance(exc, domain.Conflict):
        return ConflictError(exc.message, exc.code)
    if isinstance(exc, domain.LimitReached):
        return TooManyRequests(exc.message, exc.code)
    if isinstance(exc, domain.InvalidInput):
        return Unprocessable(exc.message, exc.code)
    return ApiError(exc.message, exc.code)
