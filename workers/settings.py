"""The worker's settings, read once from ``BULKHEAD_*`` and passed down."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from billing.metering import StripeSettings
from billing.plans import Plans
from bulkhead.settings import (
    CommonSettings,
    SettingsError,
    env_bool,
    env_float,
    env_int,
    env_list,
    env_opt,
    env_str,
)

# DESIGN §2: 0 s, 5 s, 5 min, 30 min, 2 h, 5 h, 10 h, 14 h, 20 h, 24 h
DEFAULT_WEBHOOK_SCHEDULE = "0,5,300,1800,7200,18000,36000,50400,72000,86400"


@dataclass(frozen=True)
class WorkerSettings:
    common: CommonSettings
    vmhost_urls: list[str]
    vmhost_token: str
    vmhost_retry_s: float  # how long a run waits for an unreachable vmhost
    max_jobs: int  # concurrent arq jobs per worker process
    job_lease_s: float  # a running job whose heartbeat is older than this is recovered
    max_attempts: int  # runs of one job before it fails with internal_error
    requeue_after_s: float  # a queued job this old is enqueued again (lost enqueue)
    max_output_bytes: int
    webhook_schedule_s: list[float]
    webhook_timeout_s: float
    webhook_allow_private: bool
    reconcile_every_s: int
    reap_every_s: int  # the held-open sandbox reaper's period
    plans: Plans
    stripe: StripeSettings

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> WorkerSettings:
        env = os.environ if env is None else env
        token = env_str(env, "VMHOST_TOKEN", "")
        if not token:
            raise SettingsError("BULKHEAD_VMHOST_TOKEN is required (the vmhost's shared token)")
        raw_schedule = env_list(env, "WEBHOOK_SCHEDULE", DEFAULT_WEBHOOK_SCHEDULE.split(","))
        try:
            schedule = [float(x) for x in raw_schedule]
        except ValueError as exc:
            raise SettingsError("BULKHEAD_WEBHOOK_SCHEDULE is a comma list of seconds") from exc
        every = env_int(env, "RECONCILE_EVERY_S", 5)
        reap_every = env_int(env, "REAP_EVERY_S", 1)
        for name, value in (("RECONCILE_EVERY_S", every), ("REAP_EVERY_S", reap_every)):
            if not 1 <= value <= 60 or 60 % value:
                raise SettingsError(f"BULKHEAD_{name} must divide 60")
        return cls(
            common=CommonSettings.from_env(env),
            vmhost_urls=env_list(env, "VMHOST_URLS", ["http://127.0.0.1:8700"]),
            vmhost_token=token,
            vmhost_retry_s=env_float(env, "VMHOST_RETRY_S", 20.0),
            max_jobs=env_int(env, "WORKER_MAX_JOBS", 16),
            job_lease_s=env_float(env, "JOB_LEASE_S", 15.0),
            max_attempts=env_int(env, "JOB_MAX_ATTEMPTS", 3),
            requeue_after_s=env_float(env, "REQUEUE_AFTER_S", 30.0),
            max_output_bytes=env_int(env, "MAX_OUTPUT_BYTES", 1024 * 1024),
            webhook_schedule_s=schedule,
            webhook_timeout_s=env_float(env, "WEBHOOK_TIMEOUT_S", 10.0),
            webhook_allow_private=env_bool(env, "WEBHOOK_ALLOW_PRIVATE", False),
            reconcile_every_s=every,
            reap_every_s=reap_every,
            plans=Plans.from_env(env),
            stripe=StripeSettings(
                api_key=env_opt(env, "STRIPE_API_KEY"),
                api_base=env_opt(env, "STRIPE_API_BASE"),
                event_name=env_str(env, "STRIPE_METER_EVENT_NAME", "bulkhead_sandbox_seconds"),
                max_network_retries=env_int(env, "STRIPE_MAX_NETWORK_RETRIES", 2),
            ),
        )
