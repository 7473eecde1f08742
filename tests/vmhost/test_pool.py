"""The warm pool: prestarted sandboxes serve default-limit runs, once each, and leave nothing."""

from __future__ import annotations

import asyncio

from tests.vmhost.conftest import Vmhost
from vmhost.drivers.bwrap import Prestarted
from vmhost.drivers.warm_pool import WarmPool

POOLED = {"limits": {"vcpus": 1, "memory_mb": 512}}


def pool(host: Vmhost) -> WarmPool[Prestarted]:
    assert host.driver.pool is not None
    return host.driver.pool


async def wait_ready(host: Vmhost, count: int) -> None:
    for _ in range(300):
        if host.driver.warm_ready() >= count:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"the pool never had {count} sandboxes ready")


async def test_pooled_runs_work_and_the_pool_refills(pooled_vmhost: Vmhost) -> None:
    await wait_ready(pooled_vmhost, 2)
    _, result = await pooled_vmhost.run(
        language="python",
        code="import os; print(open('data.txt').read(), os.getuid(), os.getcwd())",
        files=[{"path": "data.txt", "content": "hello", "encoding": "utf8"}],
        **POOLED,
    )
    assert result["stdout"] == "hello 65534 /home/user\n", result
    assert pool(pooled_vmhost).taken == 1
    await wait_ready(pooled_vmhost, 2)
    async with pooled_vmhost.session.get(f"{pooled_vmhost.url}/v1/info") as resp:
        assert (await resp.json())["warm_pool_ready"] == 2


async def test_a_pooled_sandbox_serves_one_run_only(pooled_vmhost: Vmhost) -> None:
    await wait_ready(pooled_vmhost, 2)
    leave = "import os; open('/tmp/mark', 'w').write('x'); open('mark', 'w').write('x')"
    look = "import os; print(os.path.exists('/tmp/mark'), os.path.exists('mark'))"
    for _ in range(4):
        _, first = await pooled_vmhost.run(language="python", code=leave, **POOLED)
        assert first["exit_code"] == 0, first
        _, second = await pooled_vmhost.run(language="python", code=look, **POOLED)
        assert second["stdout"] == "False False\n", second


async def test_other_limits_and_network_start_cold(pooled_vmhost: Vmhost) -> None:
    await wait_ready(pooled_vmhost, 2)
    _, result = await pooled_vmhost.run(
        language="bash",
        code="cat /sys/fs/cgroup/memory/memory.limit_in_bytes 2>/dev/null; echo ok",
        limits={"vcpus": 1, "memory_mb": 128},
    )
    assert result["stdout"].endswith("ok\n")
    assert pool(pooled_vmhost).taken == 0


async def test_a_pooled_run_times_out_and_is_cleaned_up(pooled_vmhost: Vmhost) -> None:
    await wait_ready(pooled_vmhost, 2)
    _, result = await pooled_vmhost.run(
        language="python", code="while True: pass", timeout_s=1, **POOLED
    )
    assert result["termination_reason"] == "timeout"
    assert pool(pooled_vmhost).taken == 1
    await wait_ready(pooled_vmhost, 2)
    layout = pooled_vmhost.driver.layout
    assert layout is not None and len(layout.run_dirs()) == 2  # only the pool's own remain


async def test_closing_the_driver_leaves_nothing(pooled_vmhost: Vmhost) -> None:
    await wait_ready(pooled_vmhost, 2)
    layout = pooled_vmhost.driver.layout
    assert layout is not None and len(layout.run_dirs()) == 2
    cgroups = pooled_vmhost.driver.cgroup_setup
    await pooled_vmhost.driver.close()
    assert layout.run_dirs() == []
    assert cgroups is None or cgroups.run_dirs() == []
