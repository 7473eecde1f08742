"""Process and leftover checks shared by the vmhost tests."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from pathlib import Path

from tests.vmhost.conftest import Vmhost

SANDBOX_UID = 65534


def sandbox_pids() -> set[int]:
    """Live processes owned by the sandbox uid."""
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            status = (entry / "status").read_text()
        except OSError:
            continue
        for line in status.splitlines():
            if line.startswith("Uid:") and int(line.split()[1]) == SANDBOX_UID:
                if "State:\tZ" not in status:
                    found.add(int(entry.name))
    return found


def pids_with_marker(marker: str) -> set[int]:
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if marker.encode() in cmdline and int(entry.name) != os.getpid():
            found.add(int(entry.name))
    return found


async def wait_until(predicate: Callable[[], object], within: float = 15.0) -> bool:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while loop.time() < deadline:
        if predicate():
            return True
        await asyncio.sleep(0.05)
    return bool(predicate())


async def assert_clean(vmhost: Vmhost, before: set[int] | None = None) -> None:
    """No run dirs, no run cgroups and no new sandbox-uid processes remain."""
    layout, cgroups = vmhost.driver.layout, vmhost.driver.cgroup_setup
    assert layout is not None
    assert await wait_until(lambda: not layout.run_dirs()), layout.run_dirs()
    if cgroups is not None:
        assert await wait_until(lambda: not cgroups.run_dirs()), cgroups.run_dirs()
    if before is not None:
        assert await wait_until(lambda: not (sandbox_pids() - before)), sandbox_pids() - before
