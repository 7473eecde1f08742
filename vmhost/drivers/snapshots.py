"""Template snapshots: boot a microVM once, warm it up, save its whole state; restores
start from there.

A snapshot is QEMU's migration stream of a booted VM whose agent has said hello and which
has run the warm-up commands (so the interpreter is in the guest's page cache), written
with ``stop`` + ``migrate fd:`` over QMP. It is keyed by ``VmConfig.fingerprint`` (QEMU
version, image, every command-line argument), kept on disk in the vmhost's state directory
(root-only; QEMU gets the file only as a read-only descriptor), and reused across vmhost
restarts. Every restored copy shares the snapshot's RNG state and clock until the driver
sends the agent's ``sync``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vmhost.drivers.microvm import Credentials, MicroVm, VmConfig, launch
from vmhost.drivers.qmp import Qmp
from vmhost.errors import ProtocolError, SandboxError

log = logging.getLogger("vmhost.snapshots")


@dataclass(frozen=True)
class Snapshot:
    path: Path
    hello: dict[str, Any]  # the agent's hello, which restored copies do not repeat


class SnapshotStore:
    def __init__(self, directory: Path, creds: Credentials) -> None:
        self.directory = directory
        self.creds = creds
        self._known: dict[str, Snapshot] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    async def get(self, config: VmConfig, name: str, warm_up: list[list[str]]) -> Snapshot:
        """The snapshot for this configuration: taken once, then from memory or disk."""
        key = config.fingerprint()
        async with self._locks.setdefault(key, asyncio.Lock()):
            found = self._known.get(key)
            if found is not None:
                return found
            size = f"{config.memory_mb}m-{config.vcpus}c"
            path = self.directory / f"{name}-{size}-{key}.vmstate"
            meta = path.with_suffix(".json")
            if path.exists() and meta.exists():
                hello = json.loads(meta.read_text())
            else:
                log.info("snapshotting %s (%s, %s)", name, size, config.accel)
                self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
                hello = await take_snapshot(config, self.creds, path, warm_up)
                meta.write_text(json.dumps(hello))
            found = self._known[key] = Snapshot(path, hello)
            return found


async def run_quietly(vm: MicroVm, argv: list[str], limit_s: float = 60.0) -> None:
    """Run a command in the guest and wait for it (output discarded); warms the page cache."""
    frame_id = vm.channel.new_id()
    await vm.channel.send({"type": "exec", "id": frame_id, "argv": argv, "stdin": None})

    async def until_exit() -> None:
        while (await vm.channel.read_frame())["type"] != "exit":
            pass

    await asyncio.wait_for(until_exit(), limit_s)


async def take_snapshot(
    config: VmConfig,
    creds: Credentials,
    target: Path,
    warm_up: list[list[str]],
) -> dict[str, Any]:
    """Boot a VM, warm it up, write its state to ``target``; returns the agent's hello."""
    vm, qmp_sock = await launch(config, creds, qmp=True)
    assert qmp_sock is not None
    try:
        hello = await vm.boot()
        for argv in warm_up:
            await run_quietly(vm, argv)
        partial = target.with_name(target.name + ".partial")
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            await asyncio.to_thread(lambda: Qmp(qmp_sock).snapshot(fd))
        finally:
            os.close(fd)
        os.replace(partial, target)
        return hello
    except SandboxError:
        raise
    except (ProtocolError, OSError, TimeoutError) as exc:
        raise vm.failure("snapshot failed", exc) from exc
    finally:
        qmp_sock.close()
        await vm.close()
