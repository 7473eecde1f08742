"""Every error the vmhost raises, as one tree.

Each error carries a stable snake_case ``code`` (what clients and the worker match on) and a
human ``message``. HTTP handlers turn them into ``{"error": {"code", "message"}}``.

    VmhostError                      base; code "internal_error", HTTP 500
    ├── ConfigError                  bad settings or no usable driver at startup ("invalid_config")
    ├── ImageError                   a microVM image cannot be built or found ("image_error")
    ├── RequestError                 the HTTP request cannot be served as sent
    │   ├── Unauthorized             401 "unauthorized"
    │   ├── InvalidRequest           422 "invalid_request" (bad JSON, unknown/mistyped fields)
    │   ├── InvalidPath              422 "invalid_path" (a file escapes /home/user)
    │   ├── NotFound                 404 "not_found"
    │   ├── RunExists                409 "run_exists"
    │   └── Busy                     503 "busy" (BULKHEAD_VMHOST_MAX_RUNS reached)
    └── RunError                     a run could not be carried out; reported in the final
        │                            result line with termination_reason "internal_error"
        ├── LanguageUnavailable      "language_unavailable" (interpreter missing)
        ├── NetworkUnavailable       "network_unavailable" (network requested, no slirp4netns)
        ├── NetworkUnsupported       "network_unsupported" (network requested from a driver
        │                            without networking: qemu)
        ├── SandboxError             "sandbox_error" (the sandbox could not be set up)
        └── ProtocolError            "protocol_error" / "agent_exited" (guest misbehaved or died)
"""

from __future__ import annotations


class VmhostError(Exception):
    code = "internal_error"
    http_status = 500

    def __init__(self, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code

    def to_dict(self) -> dict[str, str]:
        return {"code": self.code, "message": self.message}


class ConfigError(VmhostError):
    code = "invalid_config"


class ImageError(VmhostError):
    code = "image_error"


class RequestError(VmhostError):
    http_status = 400
    code = "bad_request"


class Unauthorized(RequestError):
    http_status = 401
    code = "unauthorized"


class InvalidRequest(RequestError):
    http_status = 422
    code = "invalid_request"


class InvalidPath(InvalidRequest):
    code = "invalid_path"


class NotFound(RequestError):
    http_status = 404
    code = "not_found"


class RunExists(RequestError):
    http_status = 409
    code = "run_exists"


class Busy(RequestError):
    http_status = 503
    code = "busy"


class RunError(VmhostError):
    code = "internal_error"


class LanguageUnavailable(RunError):
    code = "language_unavailable"


class NetworkUnavailable(RunError):
    code = "network_unavailable"


class NetworkUnsupported(RunError):
    code = "network_unsupported"


class SandboxError(RunError):
    code = "sandbox_error"
    http_status = 503  # the vmhost cannot provide the sandbox now (e.g. template_not_built)


class ProtocolError(RunError):
    code = "protocol_error"
