"""Timeouts, memory, pids and file-size limits, and cleanup after each."""

from __future__ import annotations

import time

from tests.vmhost.conftest import Vmhost
from tests.vmhost.helpers import assert_clean, sandbox_pids


async def test_timeout_kills_the_process_tree(vmhost: Vmhost) -> None:
    before = sandbox_pids()
    code = (
        "import subprocess\n"
        "subprocess.Popen(['sleep', '1000'])\n"
        "print('spinning', flush=True)\n"
        "while True: pass\n"
    )
    started = time.monotonic()
    _, result = await vmhost.run(language="python", code=code, timeout_s=1)
    assert time.monotonic() - started < 10
    assert result["termination_reason"] == "timeout"
    assert result["exit_code"] is None
    assert result["stdout"] == "spinning\n"
    await assert_clean(vmhost, before)


async def test_memory_bomb_is_oom(vmhost: Vmhost) -> None:
    before = sandbox_pids()
    code = "chunks = []\nwhile True:\n    chunks.append(bytearray(8 * 1024 * 1024))\n"
    _, result = await vmhost.run(
        language="python", code=code, limits={"vcpus": 1, "memory_mb": 64}, timeout_s=30
    )
    if vmhost.driver.cgroups == "none":
        print("no cgroups on this machine: memory limit not enforced, oom not checked")
        return
    assert result["termination_reason"] == "oom", result
    await assert_clean(vmhost, before)


async def test_fork_bomb_is_contained(vmhost: Vmhost) -> None:
    before = sandbox_pids()
    code = "bomb() { bomb | bomb & }; bomb; sleep 3; echo survived"
    _, result = await vmhost.run(language="bash", code=code, timeout_s=8)
    assert result["termination_reason"] in ("exit", "timeout")
    await assert_clean(vmhost, before)
    _, after = await vmhost.run(language="python", code="print('host fine')")
    assert after["stdout"] == "host fine\n"


async def test_file_size_limit_is_output_limit(small_files_vmhost: Vmhost) -> None:
    code = "head -c 5000000 /dev/zero > big.bin; echo unreachable"
    _, result = await small_files_vmhost.run(language="bash", code=code)
    assert result["termination_reason"] == "exit"  # bash survives; head got SIGXFSZ
    _, result = await small_files_vmhost.run(
        command=["sh", "-c", "exec head -c 5000000 /dev/zero > big.bin"]
    )
    assert result["termination_reason"] == "output_limit"
    assert result["signal"] == 25


async def test_parallel_runs_are_isolated_and_cleaned(vmhost: Vmhost) -> None:
    import asyncio

    before = sandbox_pids()
    results = await asyncio.gather(
        *(vmhost.run(language="python", code=f"print({i} * 2)") for i in range(6))
    )
    assert sorted(r["stdout"] for _, r in results) == sorted(f"{i * 2}\n" for i in range(6))
    await assert_clean(vmhost, before)
