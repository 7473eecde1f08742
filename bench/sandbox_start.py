"""Sandbox start-up benchmark per driver (not a test), next to a floor measured in the same run.

    .venv/bin/python bench/sandbox_start.py [--n 30] [--cold-n 5] [--drivers bwrap,qemu]

"Ready" means: the driver handed over a sandbox (``Driver.open``) and its guest agent
answered one request (a ``stat`` round trip). Measured directly on the drivers, in-process:

- floor: a bare ``python3 -c pass`` process (fork, exec, interpreter start, exit)
- bwrap cold start (no warm pool) and warm-pool hit
- qemu cold boot (a size with no snapshot: kernel boot + init + agent), snapshot restore
  (no warm pool: QEMU start + ``-incoming`` + the agent's ``sync``), and warm-pool hit;
  plus the one-off snapshot cost and a whole ``run`` of ``true`` restored from the snapshot

Targets (issue 3): restore-to-ready p50 ≤ 300 ms under TCG, warm-pool hit p50 ≤ 20 ms.
Needs root and, for qemu, a built base image (``bulkhead image build --template base``).
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import shutil
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from datetime import datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from vmhost.drivers.base import Driver, RunSpec, SandboxSpec  # noqa: E402
from vmhost.drivers.bwrap import BwrapDriver  # noqa: E402
from vmhost.drivers.qemu import QemuDriver  # noqa: E402
from vmhost.settings import VmhostSettings  # noqa: E402

MEMORY_MB = 256
Row = tuple[str, list[float]]


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))]


class NullSink:
    async def started(self, started_at: datetime) -> None:
        return None

    async def output(self, stream: str, text: str) -> None:
        return None


def sandbox_spec(memory_mb: int = MEMORY_MB) -> SandboxSpec:
    return SandboxSpec(
        sandbox_id="bench-" + secrets.token_hex(4),
        template="base",
        env={},
        vcpus=1,
        memory_mb=memory_mb,
        network=False,
        lifetime_s=60,
    )


async def ready_ms(driver: Driver, memory_mb: int = MEMORY_MB) -> float:
    """open() a sandbox and wait for one agent round trip; then end it (not timed)."""
    started = time.perf_counter()
    sandbox = await driver.open(sandbox_spec(memory_mb))
    try:
        frame_id = sandbox.channel.new_id()
        await sandbox.channel.send({"type": "stat", "id": frame_id, "path": "/"})
        reply = await sandbox.channel.read_frame()
        assert reply["type"] == "ok" and reply["id"] == frame_id, reply
        return (time.perf_counter() - started) * 1000
    finally:
        await sandbox.cleanup()


async def floor_ms() -> float:
    started = time.perf_counter()
    proc = await asyncio.create_subprocess_exec("/usr/bin/python3", "-c", "pass")
    assert await proc.wait() == 0
    return (time.perf_counter() - started) * 1000


async def repeat(n: int, measure: Callable[[], Awaitable[float]]) -> list[float]:
    return [await measure() for _ in range(n)]


async def pool_hits(driver: Driver, n: int, ready: Callable[[], int]) -> list[float]:
    values = []
    for _ in range(n):
        for _ in range(1200):  # until the pool refilled (at most 60 s)
            if ready() >= 1:
                break
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.3)  # let the refill's start-up finish competing for the CPU
        values.append(await ready_ms(driver))
    return values


async def bench_bwrap(settings: VmhostSettings, n: int) -> list[Row]:
    rows: list[Row] = []
    cold = BwrapDriver(replace(settings, pool_size=0))
    if not cold.probe().available:
        print(f"bwrap: skipped ({cold.probe().reason})")
        return rows
    try:
        rows.append(("bwrap cold start", await repeat(n, lambda: ready_ms(cold))))
    finally:
        await cold.close()
    warm = BwrapDriver(replace(settings, pool_size=1))
    await warm.start()
    try:
        rows.append(("bwrap warm-pool hit", await pool_hits(warm, n, warm.warm_ready)))
    finally:
        await warm.close()
    return rows


async def bench_qemu(settings: VmhostSettings, n: int, cold_n: int) -> list[Row]:
    rows: list[Row] = []
    driver = QemuDriver(replace(settings, qemu_pool_size=0))
    if not driver.probe().available:
        print(f"qemu: skipped ({driver.probe().reason})")
        return rows
    accel = driver.accel
    try:
        started = time.perf_counter()
        await driver.snapshot("base", MEMORY_MB, 1)
        rows.append((f"qemu snapshot, one-off ({accel})", [(time.perf_counter() - started) * 1000]))
        cold = await repeat(cold_n, lambda: ready_ms(driver, MEMORY_MB + 64))
        rows.append((f"qemu cold boot ({accel})", cold))
        rows.append((f"qemu snapshot restore ({accel})", await repeat(n, lambda: ready_ms(driver))))

        async def run_true() -> float:
            spec = RunSpec(
                run_id="bench-" + secrets.token_hex(4), language=None, code=None,
                command=("true",), stdin=None, env={}, files=(), timeout_s=30, vcpus=1,
                memory_mb=MEMORY_MB, network=False, template="base", max_output_bytes=1024,
            )  # fmt: skip
            result = await driver.run(spec, NullSink())
            assert result.outcome.exit_code == 0, result.outcome
            return float(result.duration_ms)

        rows.append((f"qemu restore + run `true` ({accel})", await repeat(n, run_true)))
    finally:
        await driver.close()
    pooled = QemuDriver(replace(settings, qemu_pool_size=1))
    pooled.pools = {"base": pooled.pools["base"]}
    await pooled.start()
    try:
        rows.append(
            (f"qemu warm-pool hit ({accel})", await pool_hits(pooled, n, pooled.warm_ready))
        )
    finally:
        await pooled.close()
    return rows


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=30, help="samples per path (default 30)")
    parser.add_argument("--cold-n", type=int, default=5, help="qemu cold boots (default 5)")
    parser.add_argument("--drivers", default="bwrap,qemu")
    args = parser.parse_args()
    work_dir = Path("/var/lib/bulkhead") / f"bench-start-{secrets.token_hex(4)}"
    env = {
        "BULKHEAD_VMHOST_TOKEN": "bench",
        "BULKHEAD_VMHOST_WORK_DIR": str(work_dir),
        "BULKHEAD_SANDBOX_MEMORY_MB": str(MEMORY_MB),
    }
    settings = VmhostSettings.from_env(env)
    rows: list[Row] = [("floor: python3 -c pass", await repeat(args.n, floor_ms))]
    drivers = args.drivers.split(",")
    try:
        if "bwrap" in drivers:
            rows += await bench_bwrap(settings, args.n)
        if "qemu" in drivers:
            rows += await bench_qemu(settings, args.n, args.cold_n)
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
    print(
        f"\n{'sandbox ready (open + one agent round trip)':<44} {'n':>4} "
        f"{'p50 ms':>9} {'p99 ms':>9}"
    )
    for name, values in rows:
        print(f"{name:<44} {len(values):>4} {pct(values, 50):>9.1f} {pct(values, 99):>9.1f}")
    floor = pct(rows[0][1], 50)
    print(
        f"\nfloor p50 {floor:.1f} ms; targets: restore p50 <= 300 ms (TCG), warm hit p50 <= 20 ms"
    )


if __name__ == "__main__":
    asyncio.run(main())
