"""Stripe's error shape: ``{"error": {"type", "code", "message", "param", "doc_url"}}``."""

from __future__ import annotations

from typing import Any

# Codes listed on https://docs.stripe.com/error-codes, which get a ``doc_url`` like Stripe's.
_DOCUMENTED_CODES = frozenset(
    {
        "idempotency_key_in_use",
        "lock_timeout",
        "parameter_invalid_integer",
        "parameter_invalid_empty",
        "parameter_invalid_string_empty",
        "parameter_missing",
        "parameter_unknown",
        "rate_limit",
        "resource_already_exists",
        "resource_missing",
        "string_length_exceeded",
    }
)


class StripeError(Exception):
    """An error answer; raised by handlers, rendered by the server's middleware."""

    def __init__(
        self,
        status: int,
        type_: str,
        message: str,
        *,
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.type = type_
        self.message = message
        self.code = code
        self.param = param
        self.headers = dict(headers or {})

    def body(self, request_log_url: str | None = None) -> dict[str, Any]:
        error: dict[str, Any] = {"type": self.type, "message": self.message}
        if self.code is not None:
            error["code"] = self.code
            if self.code in _DOCUMENTED_CODES:
                error["doc_url"] = "https://stripe.com/docs/error-codes/" + self.code.replace(
                    "_", "-"
                )
        if self.param is not None:
            error["param"] = self.param
        if request_log_url is not None:
            error["request_log_url"] = request_log_url
        return {"error": error}


def invalid(message: str, *, code: str | None = None, param: str | None = None) -> StripeError:
    """400 invalid_request_error."""
    return StripeError(400, "invalid_request_error", message, code=code, param=param)


def missing_param(param: str) -> StripeError:
    return invalid(f"Missing required param: {param}.", code="parameter_missing", param=param)


def unknown_param(param: str) -> StripeError:
    return invalid(f"Received unknown parameter: {param}", code="parameter_unknown", param=param)


def not_found(kind: str, object_id: str, param: str = "id") -> StripeError:
    return StripeError(
        404,
        "invalid_request_error",
        f"No such {kind}: '{object_id}'",
        code="resource_missing",
        param=param,
    )


def unrecognized_url(method: str, path: str) -> StripeError:
    return StripeError(
        404,
        "invalid_request_error",
        f"Unrecognized request URL ({method}: {path}). Please see https://stripe.com/docs "
        "or we can help at https://support.stripe.com/.",
    )


def authentication(message: str) -> StripeError:
    return StripeError(401, "invalid_request_error", message)


def api_error(message: str = "An unknown error occurred") -> StripeError:
    return StripeError(500, "api_error", message)
