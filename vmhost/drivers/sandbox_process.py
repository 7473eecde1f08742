"""One bwrap sandbox process on the host: spawn (in its cgroup, with rlimits, as the sandbox
uid), optional network attachment, and the kill-and-reap that every run path ends with."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import resource
import signal
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from vmhost.drivers.cgroups import RunCgroup
from vmhost.drivers.network import SlirpNetwork, SlirpProcess
from vmhost.errors import SandboxError

log = logging.getLogger("vmhost.sandbox")

STDERR_KEEP = 64 * 1024
INFO_TIMEOUT_S = 10.0
STREAM_LIMIT = 1024 * 1024


@dataclass(frozen=True)
class Credentials:
    uid: int
    gid: int

    def drop(self) -> None:
        """Become the sandbox user (called in a forked child before exec)."""
        if os.geteuid() == 0:
            os.setgroups([])
            os.setresgid(self.gid, self.gid, self.gid)
            os.setresuid(self.uid, self.uid, self.uid)


def make_preexec(
    procs_files: Sequence[str], rlimits: Sequence[tuple[int, int, int]], creds: Credentials
) -> Callable[[], None]:
    """The function run in the child between fork and exec: join the cgroup first (so
    nothing can fork outside it), then set rlimits, then drop to the sandbox uid."""
    paths = [p.encode() for p in procs_files]

    def preexec() -> None:
        pid = str(os.getpid()).encode()
        for path in paths:
            fd = os.open(path, os.O_WRONLY)
            try:
                os.write(fd, pid)
            finally:
                os.close(fd)
        for which, soft, hard in rlimits:
            resource.setrlimit(which, (soft, hard))
        creds.drop()

    return preexec


class SandboxProcess:
    """Owns the bwrap process and everything attached to it until ``cleanup``."""

    def __init__(self, cgroup: RunCgroup | None, creds: Credentials) -> None:
        self.cgroup = cgroup
        self.creds = creds
        self.proc: asyncio.subprocess.Process | None = None
        self.slirp: SlirpProcess | None = None
        self.stderr = bytearray()
        self._stderr_task: asyncio.Task[None] | None = None

    async def spawn(
        self,
        args: list[str],
        env: dict[str, str],
        cwd: str,
        rlimits: Sequence[tuple[int, int, int]],
        network: SlirpNetwork | None,
    ) -> asyncio.subprocess.Process:
        procs = self.cgroup.procs_files() if self.cgroup else []
        preexec = make_preexec(procs, rlimits, self.creds)
        info_r = info_w = block_r = block_w = -1
        pass_fds: tuple[int, ...] = ()
        if network is not None:
            info_r, info_w = os.pipe()
            block_r, block_w = os.pipe()
            pass_fds = (info_w, block_r)
            args = [args[0], "--info-fd", str(info_w), "--block-fd", str(block_r), *args[1:]]
        try:
            self.proc = await asyncio.create_subprocess_exec(
                *args,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                env=env,
                cwd=cwd,
                preexec_fn=preexec,
                start_new_session=True,
                pass_fds=pass_fds,
                limit=STREAM_LIMIT,
            )
        except (OSError, subprocess.SubprocessError) as exc:  # preexec failures land here
            raise SandboxError(f"cannot start bwrap: {exc}") from exc
        finally:
            for fd in (info_w, block_r):
                if fd >= 0:
                    os.close(fd)
        self._stderr_task = asyncio.ensure_future(self._collect_stderr())
        if network is not None:
            try:
                child_pid = await self._read_child_pid(info_r)
                self.slirp = await network.attach(
                    child_pid, self.creds.uid, self.creds.gid, self.creds.drop
                )
                os.write(block_w, b"1")
            finally:
                os.close(info_r)
                os.close(block_w)
        return self.proc

    async def _read_child_pid(self, fd: int) -> int:
        loop = asyncio.get_running_loop()
        data = b""
        while True:
            chunk = await asyncio.wait_for(
                loop.run_in_executor(None, os.read, fd, 4096), INFO_TIMEOUT_S
            )
            if not chunk:
                raise SandboxError(f"bwrap exited during setup: {self.stderr_text()}")
            data += chunk
            try:
                return int(json.loads(data)["child-pid"])
            except (ValueError, KeyError):
                continue

    async def _collect_stderr(self) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        while chunk := await self.proc.stderr.read(65536):
            room = STDERR_KEEP - len(self.stderr)
            if room > 0:
                self.stderr += chunk[:room]

    def stderr_text(self) -> str:
        return self.stderr.decode(errors="replace").strip()

    def kill(self) -> None:
        """Synchronously SIGKILL bwrap (its pid namespace dies with it) and the cgroup."""
        if self.proc is not None and self.proc.returncode is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if self.cgroup is not None:
            self.cgroup.kill_all()

    async def cleanup(self) -> None:
        """Kill and reap everything; remove the cgroup. Safe to call on any path."""
        self.kill()
        if self.proc is not None:
            if self.proc.stdin is not None:
                self.proc.stdin.close()
            # Process.wait() also waits for the stdout/stderr pipes to close; a survivor
            # holding them (only possible without cgroups) is killed again until they do.
            for _attempt in range(5):
                try:
                    await asyncio.wait_for(asyncio.shield(self.proc.wait()), 2.0)
                    break
                except TimeoutError:
                    self.kill()
            else:
                log.warning("bwrap pid %s: output pipes still open after kill", self.proc.pid)
            if self._stderr_task is not None:
                try:
                    await asyncio.wait_for(self._stderr_task, 5.0)
                except TimeoutError:
                    pass
        if self.slirp is not None:
            await self.slirp.stop()
        if self.cgroup is not None:
            await self.cgroup.remove()
