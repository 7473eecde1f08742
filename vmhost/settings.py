"""Typed vmhost settings, read once from ``BULKHEAD_*`` variables and passed down."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from bulkhead.settings import SettingsError, env_int, env_opt, env_str
from vmhost.errors import ConfigError

DRIVERS = ("auto", "bwrap", "qemu")
MIB = 1024 * 1024


def default_image_dir(env: Mapping[str, str] | None = None) -> Path:
    """Where built template artifacts live: BULKHEAD_IMAGE_DIR, else a per-user default."""
    env = os.environ if env is None else env
    if env.get("BULKHEAD_IMAGE_DIR"):
        return Path(env["BULKHEAD_IMAGE_DIR"]).absolute()
    if os.geteuid() == 0:
        return Path("/var/lib/bulkhead/images")
    return Path.home() / ".cache" / "bulkhead" / "images"


def default_work_dir() -> Path:
    if os.geteuid() == 0:
        return Path("/var/lib/bulkhead/vmhost")
    return Path(tempfile.gettempdir()) / f"bulkhead-vmhost-{os.geteuid()}"


@dataclass(frozen=True)
class VmhostSettings:
    token: str
    driver: str
    work_dir: Path
    sandbox_uid: int
    sandbox_gid: int
    max_output_bytes: int
    max_runs: int
    default_memory_mb: int
    default_vcpus: int
    pids_max: int
    max_file_bytes: int
    tmp_size_mb: int
    nofile: int
    max_request_bytes: int
    pool_size: int  # prestarted sandboxes kept ready (default limits, no network)
    python_path: str | None
    node_path: str | None
    image_dir: Path  # built template artifacts (bwrap environments, microVM images)
    max_sandboxes: int  # held-open sandboxes on this vmhost
    command_buffer_bytes: int  # output kept per sandbox command for replay
    max_upload_bytes: int  # one file written through the files API
    qemu_pool_size: int = 1  # restored microVMs kept ready per template (BULKHEAD_QEMU_POOL)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> VmhostSettings:
        env = os.environ if env is None else env
        try:
            return cls._parse(env)
        except SettingsError as exc:
            raise ConfigError(str(exc)) from exc

    @classmethod
    def _parse(cls, env: Mapping[str, str]) -> VmhostSettings:
        token = env_opt(env, "VMHOST_TOKEN")
        if token is None:
            raise ConfigError(
                "BULKHEAD_VMHOST_TOKEN is not set: the vmhost refuses to start without the "
                "shared token the workers authenticate with"
            )
        driver = env_str(env, "SANDBOX_DRIVER", "auto").lower()
        if driver not in DRIVERS:
            raise ConfigError(f"BULKHEAD_SANDBOX_DRIVER must be one of {', '.join(DRIVERS)}")
        settings = cls(
            token=token,
            driver=driver,
            work_dir=Path(env_str(env, "VMHOST_WORK_DIR", str(default_work_dir()))).absolute(),
            sandbox_uid=env_int(env, "SANDBOX_UID", 65534),
            sandbox_gid=env_int(env, "SANDBOX_GID", 65534),
            max_output_bytes=env_int(env, "MAX_OUTPUT_BYTES", MIB),
            max_runs=env_int(env, "VMHOST_MAX_RUNS", 32),
            default_memory_mb=env_int(env, "SANDBOX_MEMORY_MB", 512),
            default_vcpus=env_int(env, "SANDBOX_VCPUS", 1),
            pids_max=env_int(env, "SANDBOX_PIDS_MAX", 256),
            max_file_bytes=env_int(env, "SANDBOX_MAX_FILE_MB", 256) * MIB,
            tmp_size_mb=env_int(env, "SANDBOX_TMP_MB", 256),
            nofile=env_int(env, "SANDBOX_NOFILE", 1024),
            max_request_bytes=env_int(env, "VMHOST_MAX_REQUEST_MB", 64) * MIB,
            pool_size=env_int(env, "SANDBOX_POOL", 2),
            python_path=env_opt(env, "SANDBOX_PYTHON"),
            node_path=env_opt(env, "SANDBOX_NODE"),
            image_dir=default_image_dir(env),
            max_sandboxes=env_int(env, "VMHOST_MAX_SANDBOXES", 64),
            command_buffer_bytes=env_int(env, "COMMAND_BUFFER_MB", 16) * MIB,
            max_upload_bytes=env_int(env, "SANDBOX_MAX_UPLOAD_MB", 100) * MIB,
            qemu_pool_size=env_int(env, "QEMU_POOL", 1),
        )
        for name in ("max_runs", "default_memory_mb", "default_vcpus", "pids_max", "nofile"):
            if getattr(settings, name) < 1:
                raise ConfigError(f"vmhost setting {name} must be at least 1")
        if settings.pool_size < 0:
            raise ConfigError("BULKHEAD_SANDBOX_POOL must be 0 (off) or more")
        if settings.qemu_pool_size < 0:
            raise ConfigError("BULKHEAD_QEMU_POOL must be 0 (off) or more")
        if settings.max_output_bytes < 0 or settings.max_file_bytes < MIB:
            raise ConfigError("output and file size limits must be positive")
        return settings
