"""The job-duration histogram, kept in Redis so every worker adds to one series.

Workers call ``record_duration``; the gateway renders it with ``render_histogram`` in the
Prometheus text format at ``GET /metrics``.
"""

from __future__ import annotations

from redis.asyncio import Redis

DURATION_KEY = "bulkhead:metrics:job_duration_seconds"
BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 3600.0)


async def record_duration(redis: Redis, seconds: float) -> None:
    async with redis.pipeline(transaction=True) as pipe:
        for bound in BUCKETS:
            if seconds <= bound:
                pipe.hincrby(DURATION_KEY, f"le:{bound:g}", 1)
        pipe.hincrby(DURATION_KEY, "le:+Inf", 1)
        pipe.hincrby(DURATION_KEY, "count", 1)
        pipe.hincrbyfloat(DURATION_KEY, "sum", seconds)
        await pipe.execute()


def render_histogram(name: str, help_text: str, raw: dict[bytes, bytes]) -> list[str]:
    values = {k.decode(): v.decode() for k, v in raw.items()}
    lines = [f"# HELP {name} {help_text}", f"# TYPE {name} histogram"]
    for bound in [f"{b:g}" for b in BUCKETS] + ["+Inf"]:
        lines.append(f'{name}_bucket{{le="{bound}"}} {int(values.get("le:" + bound, 0))}')
    lines.append(f"{name}_sum {float(values.get('sum', 0)):.6f}")
    lines.append(f"{name}_count {int(values.get('count', 0))}")
    return lines
