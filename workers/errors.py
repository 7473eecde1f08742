"""Errors of the worker package.

WorkerError                  root, with a stable ``code``
├── VmhostUnavailable        no vmhost answered (connection refused, 5xx, broken stream)
├── VmhostRejected           a vmhost refused the run request (4xx): a bug or bad input
└── WebhookTargetRefused     the callback resolves to a private/loopback/link-local address
"""

from __future__ import annotations


class WorkerError(Exception):
    code = "internal_error"

    def __init__(self, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code


class VmhostUnavailable(WorkerError):
    code = "vmhost_unavailable"


class VmhostRejected(WorkerError):
    code = "vmhost_rejected"


class WebhookTargetRefused(WorkerError):
    code = "webhook_target_refused"
