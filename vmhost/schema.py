"""Validation of ``POST /v1/runs`` bodies into a RunSpec (unknown fields are rejected)."""

from __future__ import annotations

import base64
import binascii
import math
import posixpath
from typing import Any

from vmhost.drivers.base import LANGUAGES, FileSpec, RunSpec
from vmhost.errors import InvalidPath, InvalidRequest
from vmhost.settings import VmhostSettings

RUN_FIELDS = {
    "run_id", "language", "code", "command", "stdin", "env", "files", "timeout_s", "limits",
    "network", "template", "max_output_bytes", "isolation",
}  # fmt: skip
LIMIT_FIELDS = {"vcpus", "memory_mb"}
FILE_FIELDS = {"path", "content", "encoding"}
TEMPLATES = ("base",)
MAX_TIMEOUT_S = 86400
MAX_VCPUS = 64
MIN_MEMORY_MB, MAX_MEMORY_MB = 16, 256 * 1024
MAX_OUTPUT_BYTES = 64 * 1024 * 1024
HOME = "/home/user"
ISOLATIONS = ("namespace", "microvm")


def _check_keys(obj: Any, allowed: set[str], where: str) -> dict[str, Any]:
    if not isinstance(obj, dict):
        raise InvalidRequest(f"{where} must be a JSON object")
    unknown = sorted(set(obj) - allowed)
    if unknown:
        raise InvalidRequest(f"unknown field(s) in {where}: {', '.join(unknown)}")
    return obj


def _string(value: Any, name: str, nullable: bool = False, nul: bool = False) -> str | None:
    if value is None and nullable:
        return None
    if not isinstance(value, str):
        raise InvalidRequest(f"{name} must be a string{' or null' if nullable else ''}")
    if not nul and "\x00" in value:
        raise InvalidRequest(f"{name} must not contain NUL characters")
    return value


def _int(value: Any, name: str, low: int, high: int) -> int:
    if type(value) is not int or not low <= value <= high:
        raise InvalidRequest(f"{name} must be an integer between {low} and {high}")
    return value


def normalize_path(raw: Any) -> str:
    """A file path relative to the sandbox home; refuses anything escaping it."""
    path = _string(raw, "files[].path")
    assert path is not None
    if path.startswith("/"):
        if path != HOME and not path.startswith(HOME + "/"):
            raise InvalidPath(f"file path {path!r} is outside {HOME}")
        path = path[len(HOME) :]
    parts = [p for p in path.split("/") if p not in ("", ".")]
    if not parts or ".." in parts:
        raise InvalidPath(f"file path {raw!r} must name a file inside {HOME} without '..'")
    normalized = posixpath.join(*parts)
    if len(normalized) > 4096:
        raise InvalidPath("file path is too long")
    return normalized


def _files(value: Any) -> tuple[FileSpec, ...]:
    if not isinstance(value, list):
        raise InvalidRequest("files must be a list")
    files = []
    for item in value:
        entry = _check_keys(item, FILE_FIELDS, "files[]")
        path = normalize_path(entry.get("path"))
        content = _string(entry.get("content"), "files[].content", nul=True)
        assert content is not None
        encoding = entry.get("encoding", "utf8")
        if encoding == "utf8":
            data = content.encode()
        elif encoding == "base64":
            try:
                data = base64.b64decode(content, validate=True)
            except (binascii.Error, ValueError) as exc:
                raise InvalidRequest(f"files[].content for {path!r} is not base64") from exc
        else:
            raise InvalidRequest("files[].encoding must be 'utf8' or 'base64'")
        files.append(FileSpec(path, data))
    return tuple(files)


def _env(value: Any) -> dict[str, str]:
    if not isinstance(value, dict):
        raise InvalidRequest("env must be an object of strings")
    env = {}
    for key, item in value.items():
        if not key or "=" in key or "\x00" in key:
            raise InvalidRequest(f"invalid environment variable name {key!r}")
        text = _string(item, f"env[{key!r}]")
        assert text is not None
        env[key] = text
    return env


def parse_run_request(body: Any, settings: VmhostSettings) -> RunSpec:
    body = _check_keys(body, RUN_FIELDS, "the request body")
    run_id = _string(body.get("run_id"), "run_id")
    assert run_id is not None
    if not 0 < len(run_id) <= 200 or not run_id.isprintable() or "/" in run_id:
        raise InvalidRequest("run_id must be 1-200 printable characters without '/'")
    language = body.get("language")
    code = _string(body.get("code"), "code", nullable=True, nul=True)
    command = body.get("command")
    if command is not None:
        if language is not None or code is not None:
            raise InvalidRequest("send either language+code or command, not both")
        if not isinstance(command, list) or not command:
            raise InvalidRequest("command must be a non-empty list of strings")
        argv = tuple(_string(arg, "command[]") or "" for arg in command)
        if not argv[0]:
            raise InvalidRequest("command[0] must not be empty")
    else:
        argv = None
        if language not in LANGUAGES or code is None:
            raise InvalidRequest(
                f"language must be one of {', '.join(LANGUAGES)} with code, or send command"
            )
    timeout = body.get("timeout_s", 60)
    if isinstance(timeout, bool) or not isinstance(timeout, int | float):
        raise InvalidRequest("timeout_s must be a number")
    if not math.isfinite(timeout) or not 0 < timeout <= MAX_TIMEOUT_S:
        raise InvalidRequest(f"timeout_s must be > 0 and <= {MAX_TIMEOUT_S}")
    limits = _check_keys(body.get("limits") or {}, LIMIT_FIELDS, "limits")
    vcpus = _int(limits.get("vcpus", settings.default_vcpus), "limits.vcpus", 1, MAX_VCPUS)
    memory = limits.get("memory_mb", settings.default_memory_mb)
    memory_mb = _int(memory, "limits.memory_mb", MIN_MEMORY_MB, MAX_MEMORY_MB)
    network = body.get("network", False)
    if not isinstance(network, bool):
        raise InvalidRequest("network must be a boolean")
    template = _string(body.get("template", "base"), "template")
    if template not in TEMPLATES:
        raise InvalidRequest(f"unknown template {template!r} (this vmhost offers: base)")
    max_output = body.get("max_output_bytes", settings.max_output_bytes)
    max_output = _int(max_output, "max_output_bytes", 0, MAX_OUTPUT_BYTES)
    stdin = _string(body.get("stdin"), "stdin", nullable=True, nul=True)
    return RunSpec(
        run_id=run_id,
        language=None if argv is not None else language,
        code=code,
        command=argv,
        stdin=None if stdin is None else stdin.encode(),
        env=_env(body.get("env") or {}),
        files=_files(body.get("files") or []),
        timeout_s=float(timeout),
        vcpus=vcpus,
        memory_mb=memory_mb,
        network=network,
        template=template,
        max_output_bytes=max_output,
        isolation=_isolation(body.get("isolation")),
    )


def _isolation(value: Any) -> str:
    if value is None:
        return "namespace"
    if value not in ISOLATIONS:
        raise InvalidRequest(f"isolation must be one of {', '.join(ISOLATIONS)}")
    return str(value)
