"""Validation of the held-open sandbox request bodies (unknown fields are rejected).

The gateway forwards the public bodies of commands, files and code requests unchanged, so
these checks are the API's checks: the messages name the public fields.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from vmhost.drivers.base import SandboxSpec
from vmhost.errors import ConfigError, InvalidRequest
from vmhost.schema import (
    MAX_MEMORY_MB,
    MAX_VCPUS,
    MIN_MEMORY_MB,
    _check_keys,
    _int,
    _isolation,
    _string,
)
from vmhost.settings import VmhostSettings
from vmhost.templates import load_template

SANDBOX_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
MAX_LIFETIME_S = 86400 + 60
MAX_CODE_BYTES = 8 * 1024 * 1024
MAX_COMMAND_TIMEOUT_S = 86400.0


def parse_json(raw: bytes) -> Any:
    if not raw:
        return {}
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidRequest(f"the body is not valid JSON: {exc}") from exc


def _env(value: Any, name: str) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, str) and k and "=" not in k and "\x00" not in k + v
        for k, v in value.items()
    ):
        raise InvalidRequest(f"{name} must map variable names to strings")
    return dict(value)


def _bool(value: Any, name: str, default: bool) -> bool:
    if value is None:
        return default
    if not isinstance(value, bool):
        raise InvalidRequest(f"{name} must be true or false")
    return value


def _timeout(value: Any, name: str, high: float) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= high:
        raise InvalidRequest(f"{name} must be a number of seconds from 0 to {high:g}")
    return float(value)


def parse_sandbox(body: Any, settings: VmhostSettings) -> SandboxSpec:
    fields = {"sandbox_id", "template", "env", "limits", "network", "lifetime_s", "isolation"}
    body = _check_keys(body, fields, "the sandbox")
    sandbox_id = _string(body.get("sandbox_id"), "sandbox_id")
    if sandbox_id is None or not SANDBOX_ID.match(sandbox_id):
        raise InvalidRequest("sandbox_id must be 1-64 letters, digits, '_' or '-'")
    limits = _check_keys(body.get("limits") or {}, {"vcpus", "memory_mb"}, "limits")
    lifetime = _timeout(body.get("lifetime_s"), "lifetime_s", MAX_LIFETIME_S)
    name = _string(body.get("template", "base"), "template") or "base"
    try:
        template = load_template(name)  # its vcpus and memory are the defaults
    except ConfigError as exc:
        raise InvalidRequest(exc.message, "unknown_template") from None
    return SandboxSpec(
        sandbox_id=sandbox_id,
        template=name,
        env=_env(body.get("env"), "env"),
        vcpus=_int(limits.get("vcpus", template.vcpus), "limits.vcpus", 1, MAX_VCPUS),
        memory_mb=_int(
            limits.get("memory_mb", template.memory_mb),
            "limits.memory_mb",
            MIN_MEMORY_MB,
            MAX_MEMORY_MB,
        ),
        network=_bool(body.get("network"), "network", False),
        lifetime_s=lifetime if lifetime else 86400.0,
        isolation=_isolation(body.get("isolation")),
    )


@dataclass(frozen=True)
class CommandRequest:
    cmd: str
    cwd: str | None
    env: dict[str, str]
    stdin: bytes | None
    timeout_s: float | None
    background: bool


def parse_command(body: Any) -> CommandRequest:
    fields = {"cmd", "cwd", "env", "stdin", "timeout_s", "background"}
    body = _check_keys(body, fields, "the command")
    cmd = _string(body.get("cmd"), "cmd")
    if not cmd:
        raise InvalidRequest("cmd must be a non-empty shell command line")
    stdin = _string(body.get("stdin"), "stdin", nullable=True, nul=True)
    return CommandRequest(
        cmd=cmd,
        cwd=_string(body.get("cwd"), "cwd", nullable=True),
        env=_env(body.get("env"), "env"),
        stdin=stdin.encode() if stdin else None,
        timeout_s=_timeout(body.get("timeout_s"), "timeout_s", MAX_COMMAND_TIMEOUT_S),
        background=_bool(body.get("background"), "background", False),
    )


def parse_stdin(body: Any) -> tuple[bytes, bool]:
    body = _check_keys(body, {"data", "eof"}, "the stdin request")
    data = _string(body.get("data", ""), "data", nullable=True, nul=True) or ""
    return data.encode(), _bool(body.get("eof"), "eof", False)


def parse_code(body: Any) -> tuple[str, str | None, str | None, float]:
    body = _check_keys(body, {"code", "language", "context_id", "timeout_s"}, "the code request")
    code = _string(body.get("code"), "code", nul=True)
    assert code is not None
    if len(code.encode()) > MAX_CODE_BYTES:
        raise InvalidRequest(f"code is larger than {MAX_CODE_BYTES} bytes", "code_too_large")
    language = _string(body.get("language"), "language", nullable=True)
    context_id = _string(body.get("context_id"), "context_id", nullable=True)
    if language is not None and context_id is not None:
        raise InvalidRequest("give either language or context_id, not both")
    timeout = _timeout(body.get("timeout_s"), "timeout_s", MAX_COMMAND_TIMEOUT_S)
    return code, language, context_id, timeout or 300.0


def parse_context(body: Any) -> tuple[str, str | None]:
    body = _check_keys(body, {"language", "cwd"}, "the context")
    language = _string(body.get("language", "python"), "language") or "python"
    return language, _string(body.get("cwd"), "cwd", nullable=True)


def parse_path_body(body: Any, fields: tuple[str, ...]) -> list[str]:
    body = _check_keys(body, set(fields), "the request")
    values = []
    for name in fields:
        value = _string(body.get(name), name)
        if not value:
            raise InvalidRequest(f"{name} is required")
        values.append(value)
    return values
