"""Typed settings shared by every deployable.

Each deployable (gateway, worker, vmhost) has one settings dataclass built once by
``from_env`` from ``BULKHEAD_*`` variables and passed down explicitly. This module holds the
parsing helpers and the pieces every deployable needs (database, Redis, data directory).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

PREFIX = "BULKHEAD_"


class SettingsError(ValueError):
    """A BULKHEAD_* variable has a value we cannot use."""


def env_str(env: Mapping[str, str], name: str, default: str) -> str:
    value = env.get(PREFIX + name)
    return default if value is None or value == "" else value


def env_opt(env: Mapping[str, str], name: str) -> str | None:
    value = env.get(PREFIX + name)
    return None if value is None or value == "" else value


def env_int(env: Mapping[str, str], name: str, default: int) -> int:
    raw = env.get(PREFIX + name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError as exc:
        raise SettingsError(f"{PREFIX}{name} must be an integer, got {raw!r}") from exc


def env_float(env: Mapping[str, str], name: str, default: float) -> float:
    raw = env.get(PREFIX + name)
    if raw is None or raw == "":
        return default
    try:
        return float(raw)
    except ValueError as exc:
        raise SettingsError(f"{PREFIX}{name} must be a number, got {raw!r}") from exc


def env_bool(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = env.get(PREFIX + name)
    if raw is None or raw == "":
        return default
    if raw.lower() in ("1", "true", "yes", "on"):
        return True
    if raw.lower() in ("0", "false", "no", "off"):
        return False
    raise SettingsError(f"{PREFIX}{name} must be a boolean (1/0), got {raw!r}")


def env_list(env: Mapping[str, str], name: str, default: list[str]) -> list[str]:
    raw = env.get(PREFIX + name)
    if raw is None or raw.strip() == "":
        return list(default)
    return [part.strip() for part in raw.split(",") if part.strip()]


def data_dir(env: Mapping[str, str]) -> Path:
    """Where local state lives (SQLite file, embedded Valkey data, generated secrets)."""
    return Path(env_str(env, "DATA_DIR", str(Path.cwd() / ".bulkhead"))).resolve()


@dataclass(frozen=True)
class CommonSettings:
    """What the gateway and the workers both need."""

    database_url: str
    redis_url: str
    queue_name: str

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> CommonSettings:
        env = os.environ if env is None else env
        default_db = f"sqlite+aiosqlite:///{data_dir(env) / 'bulkhead.db'}"
        return cls(
            database_url=normalize_database_url(env_str(env, "DATABASE_URL", default_db)),
            redis_url=env_str(env, "REDIS_URL", "redis://127.0.0.1:6379/0"),
            queue_name=env_str(env, "QUEUE_NAME", "bulkhead:queue"),
        )


def normalize_database_url(url: str) -> str:
    """Accept the URLs operators write and pick our async drivers for them."""
    if url.startswith("postgres://"):
        url = "postgresql://" + url[len("postgres://") :]
    if url.startswith("postgresql://"):
        return "postgresql+asyncpg://" + url[len("postgresql://") :]
    if url.startswith("sqlite:///"):
        return "sqlite+aiosqlite:///" + url[len("sqlite:///") :]
    if url.startswith(("postgresql+asyncpg://", "sqlite+aiosqlite://")):
        return url
    raise SettingsError(
        f"{PREFIX}DATABASE_URL must be a sqlite:/// or postgresql:// URL, got {url.split(':')[0]!r}"
    )
