"""Held-open sandboxes on this vmhost: create, look up, end, and remember how they ended.

The control plane (gateway and the workers' reaper) decides when a sandbox ends; this
manager carries it out and keeps, for an hour after the end, each sandbox's real start and
end so a repeated ``DELETE`` (at-least-once callers) gets the same answer. Two safety nets
work without the control plane: a hard deadline at ``lifetime_s`` after the start, and a
watcher that ends a sandbox whose agent died (``oom`` when its cgroup saw an OOM kill).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from vmhost.drivers import Drivers
from vmhost.drivers.base import OpenSandbox, SandboxSpec, isoformat, utcnow
from vmhost.errors import Busy, InvalidRequest, NotFound, RunExists
from vmhost.guest.session import GuestSession
from vmhost.sandboxes.commands import Command
from vmhost.sandboxes.files import SandboxFiles
from vmhost.sandboxes.interpreter import Interpreter

log = logging.getLogger("vmhost.sandboxes")
TOMBSTONE_S = 3600.0
MAX_COMMANDS = 256  # kept per sandbox; the oldest finished ones are forgotten first
DEFAULT_COMMAND_TIMEOUT_S = 60.0


@dataclass
class HeldSandbox:
    spec: SandboxSpec
    opened: OpenSandbox
    session: GuestSession
    started_at: datetime
    files: SandboxFiles
    interpreter: Interpreter
    commands: dict[int, Command] = field(default_factory=dict)
    ended_at: datetime | None = None
    end_reason: str | None = None
    _deadline: asyncio.TimerHandle | None = None
    _watcher: asyncio.Task[None] | None = None
    _ending: asyncio.Future[None] | None = None

    @property
    def id(self) -> str:
        return self.spec.sandbox_id

    def describe(self) -> dict[str, Any]:
        return {
            "sandbox_id": self.id,
            "state": "running" if self.ended_at is None else "ended",
            "template": self.spec.template,
            "limits": {"vcpus": self.spec.vcpus, "memory_mb": self.spec.memory_mb},
            "driver": self.opened.driver,
            "started_at": isoformat(self.started_at),
            "ended_at": isoformat(self.ended_at) if self.ended_at else None,
            "end_reason": self.end_reason,
            "commands_running": sum(1 for c in self.commands.values() if c.running),
            "languages": self.interpreter.languages(),
        }

    def require_running(self) -> None:
        if self.ended_at is not None:
            raise NotFound(f"sandbox {self.id} has ended ({self.end_reason})", "sandbox_ended")

    async def run_command(
        self,
        cmd: str,
        cwd: str | None,
        env: dict[str, str],
        stdin: bytes | None,
        timeout_s: float | None,
        background: bool,
        buffer_cap: int,
    ) -> Command:
        self.require_running()
        if timeout_s is None:
            timeout_s = None if background else DEFAULT_COMMAND_TIMEOUT_S
        handle = await self.session.exec(
            {
                "argv": ["/bin/bash", "-c", cmd],
                "cwd": self.files.resolve(cwd) if cwd else self.opened.home,
                "env": {**self.opened.env, **env},
                "stdin": None,
                "stdin_open": True,
                "max_output_bytes": None,
            }
        )
        first = await handle.next()
        if first["type"] == "error":
            raise InvalidRequest(f"the command was refused: {first['message']}", first["code"])
        pid = first.get("pid")
        if pid is None:  # bash itself could not run: let the caller see its stderr and exit
            pid = -len(self.commands) - 1
        command = Command(pid, cmd, background, handle, buffer_cap, stdin_open=True)
        self.commands[pid] = command
        self._forget_finished()
        command.start(timeout_s or None)
        if stdin:
            await command.send_stdin(stdin, eof=not background)
        elif not background:
            await command.send_stdin(b"", eof=True)
        return command

    def _forget_finished(self) -> None:
        finished = [pid for pid, c in self.commands.items() if not c.running]
        for pid in finished[: max(len(self.commands) - MAX_COMMANDS, 0)]:
            del self.commands[pid]

    def command(self, pid: int) -> Command:
        command = self.commands.get(pid)
        if command is None:
            raise NotFound(f"no process {pid} in sandbox {self.id}")
        return command


class SandboxManager:
    def __init__(self, drivers: Drivers, max_sandboxes: int) -> None:
        """``drivers`` maps an isolation (namespace, microvm) to the driver providing it."""
        self.drivers = drivers
        self.max_sandboxes = max_sandboxes
        self.sandboxes: dict[str, HeldSandbox] = {}
        self._ended: dict[str, tuple[float, dict[str, Any]]] = {}
        self._starting: set[str] = set()

    @property
    def running(self) -> int:
        return sum(1 for s in self.sandboxes.values() if s.ended_at is None)

    async def create(self, spec: SandboxSpec) -> tuple[HeldSandbox, bool]:
        """Start the sandbox; an id that exists already returns it (created False)."""
        existing = self.sandboxes.get(spec.sandbox_id)
        if existing is not None:
            return existing, False
        if spec.sandbox_id in self._ended:
            raise RunExists(f"sandbox {spec.sandbox_id} existed and has ended")
        if spec.sandbox_id in self._starting:
            raise RunExists(f"sandbox {spec.sandbox_id} is being created")
        if self.running + len(self._starting) >= self.max_sandboxes:
            raise Busy(f"this vmhost holds its maximum of {self.max_sandboxes} sandboxes")
        if spec.isolation not in self.drivers:
            reason = self.drivers.reasons.get(spec.isolation, "not configured")
            raise InvalidRequest(
                f"isolation {spec.isolation!r} is not available on this vmhost: {reason} "
                "(see `bulkhead doctor`)",
                "isolation_unavailable",
            )
        driver = await self.drivers.use(spec.isolation)
        self._starting.add(spec.sandbox_id)
        try:
            opened = await driver.open(spec)
        finally:
            self._starting.discard(spec.sandbox_id)
        session = GuestSession(opened.channel)
        session.start()
        held = HeldSandbox(
            spec=spec,
            opened=opened,
            session=session,
            started_at=utcnow(),
            files=SandboxFiles(session, opened.home),
            interpreter=Interpreter(session, opened),
        )
        self.sandboxes[spec.sandbox_id] = held
        loop = asyncio.get_running_loop()
        held._deadline = loop.call_later(
            spec.lifetime_s, lambda: asyncio.ensure_future(self.end(held.id, "lifetime_exceeded"))
        )
        held._watcher = asyncio.ensure_future(self._watch(held))
        log.info("sandbox %s started (%s, %s)", held.id, spec.template, opened.driver)
        return held, True

    def get(self, sandbox_id: str) -> HeldSandbox:
        held = self.sandboxes.get(sandbox_id)
        if held is None:
            raise NotFound(f"no sandbox {sandbox_id!r} on this vmhost")
        return held

    def describe(self, sandbox_id: str) -> dict[str, Any]:
        self._forget_old()
        held = self.sandboxes.get(sandbox_id)
        if held is not None:
            return held.describe()
        if sandbox_id in self._ended:
            return self._ended[sandbox_id][1]
        raise NotFound(f"no sandbox {sandbox_id!r} on this vmhost")

    def list(self) -> list[dict[str, Any]]:
        self._forget_old()
        live = [s.describe() for s in self.sandboxes.values()]
        return live + [record for _, record in self._ended.values()]

    async def end(self, sandbox_id: str, reason: str) -> dict[str, Any]:
        """End the sandbox (idempotent); returns its record with the real start and end."""
        if sandbox_id in self._ended:
            return self._ended[sandbox_id][1]
        held = self.get(sandbox_id)
        if held._ending is None:
            held._ending = asyncio.ensure_future(self._end(held, reason))
        await asyncio.shield(held._ending)
        return self._ended[sandbox_id][1]

    async def _end(self, held: HeldSandbox, reason: str) -> None:
        held.ended_at = utcnow()
        if held.end_reason is None:
            held.end_reason = "oom" if held.opened.oom_killed() else reason
        if held._deadline is not None:
            held._deadline.cancel()
        held.opened.kill()
        try:
            await held.session.close()
            for command in held.commands.values():
                await command.stopped()
            await held.opened.cleanup()
        finally:
            if held._watcher is not None and held._watcher is not asyncio.current_task():
                held._watcher.cancel()
            self._ended[held.id] = (time.monotonic(), held.describe())
            self.sandboxes.pop(held.id, None)
            log.info("sandbox %s ended (%s)", held.id, held.end_reason)

    async def _watch(self, held: HeldSandbox) -> None:
        """End the sandbox if its agent dies on its own (crash, OOM kill)."""
        while held.ended_at is None:
            await asyncio.sleep(0.5)
            if held.session.failure is not None or not held.opened.alive():
                held.end_reason = "oom" if held.opened.oom_killed() else "internal_error"
                with contextlib.suppress(Exception):
                    await self.end(held.id, held.end_reason)
                return

    async def close(self) -> None:
        for sandbox_id in list(self.sandboxes):
            with contextlib.suppress(Exception):
                await self.end(sandbox_id, "vmhost_shutdown")

    def _forget_old(self) -> None:
        cutoff = time.monotonic() - TOMBSTONE_S
        for sandbox_id in [k for k, (t, _) in self._ended.items() if t < cutoff]:
            del self._ended[sandbox_id]
