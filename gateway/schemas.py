"""Request bodies of the public API: strict, unknown fields rejected.

Limits enforced here (documented in the README): at most 100 files, 100 env vars and 50
metadata entries; env names are shell identifiers; file paths are relative or under
``/home/user`` and never contain ``..``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from gateway.errors import Unprocessable

ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")
SANDBOX_HOME = "/home/user"


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class Limits(Strict):
    vcpus: int = Field(default=1, ge=1, le=8)
    memory_mb: int = Field(default=512, ge=32, le=16384)


class FileIn(Strict):
    path: str = Field(min_length=1, max_length=1024)
    content: str
    encoding: Literal["utf8", "base64"] = "utf8"

    @field_validator("path")
    @classmethod
    def _safe_path(cls, value: str) -> str:
        parts = value.split("/")
        if ".." in parts or "\x00" in value:
            raise ValueError("must not contain '..' or NUL")
        if value.startswith("/") and not (value + "/").startswith(SANDBOX_HOME + "/"):
            raise ValueError(f"absolute paths must be under {SANDBOX_HOME}")
        return value

    @model_validator(mode="after")
    def _decodable(self) -> FileIn:
        if self.encoding == "base64":
            try:
                base64.b64decode(self.content, validate=True)
            except (binascii.Error, ValueError) as exc:
                raise ValueError("content is not valid base64") from exc
        return self

    def size(self) -> int:
        if self.encoding == "base64":
            return len(self.content) * 3 // 4
        return len(self.content.encode())


class JobCreate(Strict):
    language: Literal["python", "javascript", "bash"] | None = None
    code: str | None = None
    command: list[str] | None = Field(default=None, min_length=1, max_length=1000)
    stdin: str | None = None
    env: dict[str, str] = Field(default_factory=dict, max_length=100)
    files: list[FileIn] = Field(default_factory=list, max_length=100)
    timeout_s: float | None = Field(default=None, gt=0)
    limits: Limits = Field(default_factory=Limits)
    template: str = "base"
    network: bool = False
    isolation: Literal["namespace", "microvm"] = "namespace"
    callback_url: str | None = Field(default=None, max_length=2048)
    metadata: dict[str, str] = Field(default_factory=dict, max_length=50)

    @field_validator("env")
    @classmethod
    def _env_names(cls, value: dict[str, str]) -> dict[str, str]:
        for name, item in value.items():
            if not ENV_NAME.match(name):
                raise ValueError(f"invalid environment variable name {name!r}")
            if "\x00" in item:
                raise ValueError(f"environment variable {name} contains NUL")
        return value

    @field_validator("metadata")
    @classmethod
    def _metadata(cls, value: dict[str, str]) -> dict[str, str]:
        for key, item in value.items():
            if not 1 <= len(key) <= 64 or len(item) > 512:
                raise ValueError("metadata keys are 1-64 characters, values at most 512")
        return value

    @field_validator("callback_url")
    @classmethod
    def _callback(cls, value: str | None) -> str | None:
        if value is not None and not re.match(r"^https?://[^/\s]+", value):
            raise ValueError("must be an http:// or https:// URL")
        return value

    @field_validator("command")
    @classmethod
    def _command(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and (not value[0] or any("\x00" in a for a in value)):
            raise ValueError("argv[0] must be non-empty and no argument may contain NUL")
        return value

    @model_validator(mode="after")
    def _one_program(self) -> JobCreate:
        has_code = self.language is not None or self.code is not None
        if has_code and self.command is not None:
            raise ValueError("give either language + code, or command, not both")
        if self.command is None and (self.language is None or self.code is None):
            raise ValueError("give language and code, or command")
        return self

    def payload_bytes(self) -> int:
        code = len((self.code or "").encode()) + len((self.stdin or "").encode())
        return code + sum(f.size() for f in self.files)


class SandboxCreate(Strict):
    template: str = Field(default="base", pattern=r"^[a-z0-9][a-z0-9-]{0,62}$")
    timeout_s: float | None = Field(default=None, gt=0)
    metadata: dict[str, str] = Field(default_factory=dict, max_length=50)
    env: dict[str, str] = Field(default_factory=dict, max_length=100)
    limits: Limits | None = None  # None: the template's defaults
    network: bool = False
    isolation: Literal["namespace", "microvm"] = "namespace"

    _env = field_validator("env")(JobCreate._env_names.__func__)  # type: ignore[attr-defined]
    _meta = field_validator("metadata")(JobCreate._metadata.__func__)  # type: ignore[attr-defined]


class SandboxTimeout(Strict):
    timeout_s: float = Field(gt=0)


class KeyCreate(Strict):
    name: str = Field(min_length=1, max_length=200)
    plan: str = "free"
    stripe_customer_id: str | None = None


class KeyUpdate(Strict):
    stripe_customer_id: str


class AccountWebhook(Strict):
    url: str | None = Field(max_length=2048)

    @field_validator("url")
    @classmethod
    def _http(cls, value: str | None) -> str | None:
        if value is not None and not re.match(r"^https?://[^/\s]+", value):
            raise ValueError("must be an http:// or https:// URL, or null")
        return value


def parse(model: type[Strict], raw: bytes) -> Any:
    """Decode a JSON body into ``model`` or raise a 422 saying exactly what is wrong."""
    try:
        data = json.loads(raw or b"null")
    except (ValueError, UnicodeDecodeError) as exc:
        raise Unprocessable(f"body is not valid JSON: {exc}", "invalid_json") from exc
    if not isinstance(data, dict):
        raise Unprocessable("body must be a JSON object", "invalid_json")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise Unprocessable(describe(exc)) from exc


def describe(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors()[:5]:
        where = ".".join(str(p) for p in err["loc"]) or "body"
        if err["type"] == "extra_forbidden":
            parts.append(f"unknown field '{where}'")
        else:
            parts.append(f"{where}: {err['msg']}")
    return "; ".join(parts)


def body_hash(raw: bytes) -> str:
    """Hash of a request body's meaning (key order and whitespace do not matter)."""
    canonical = json.dumps(json.loads(raw), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()
