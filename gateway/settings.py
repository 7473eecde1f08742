"""The gateway's settings, read once from ``BULKHEAD_*`` and passed down."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from billing.plans import Plans
from bulkhead.settings import CommonSettings, env_float, env_int, env_list, env_opt, env_str


@dataclass(frozen=True)
class GatewaySettings:
    common: CommonSettings
    host: str
    port: int
    admin_token: str | None
    max_body_bytes: int  # whole request body
    max_code_bytes: int  # code + stdin + decoded files
    max_wait_s: float  # ceiling for ?wait=
    default_timeout_s: float
    max_timeout_s: float
    plans: Plans
    vmhost_urls: list[str]  # where held-open sandboxes are created (round robin)
    vmhost_token: str | None
    sandbox_timeout_s: float  # default lifetime of a held-open sandbox
    meter_event_name: str  # Stripe meter of the usage rows this process writes

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> GatewaySettings:
        env = os.environ if env is None else env
        return cls(
            common=CommonSettings.from_env(env),
            host=env_str(env, "HOST", "127.0.0.1"),
            port=env_int(env, "PORT", 8080),
            admin_token=env_opt(env, "ADMIN_TOKEN"),
            max_body_bytes=env_int(env, "MAX_BODY_BYTES", 10 * 1024 * 1024),
            max_code_bytes=env_int(env, "MAX_CODE_BYTES", 8 * 1024 * 1024),
            max_wait_s=env_float(env, "MAX_WAIT_S", 60.0),
            default_timeout_s=env_float(env, "DEFAULT_TIMEOUT_S", 60.0),
            max_timeout_s=env_float(env, "MAX_TIMEOUT_S", 86400.0),
            plans=Plans.from_env(env),
            vmhost_urls=env_list(env, "VMHOST_URLS", ["http://127.0.0.1:8700"]),
            vmhost_token=env_opt(env, "VMHOST_TOKEN"),
            sandbox_timeout_s=env_float(env, "SANDBOX_TIMEOUT_S", 300.0),
            meter_event_name=env_str(env, "STRIPE_METER_EVENT_NAME", "bulkhead_sandbox_seconds"),
        )
