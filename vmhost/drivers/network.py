"""Outbound networking for sandboxes that ask for it, through slirp4netns.

The sandbox always gets its own network namespace. With ``network: true`` a slirp4netns
process (running as the sandbox uid) is attached to that namespace and provides a user-mode
NAT with ``--disable-host-loopback``, so the sandbox cannot reach the host's 127.0.0.1.

slirp4netns joins the user namespace that owns the sandbox's network namespace (found with
the NS_GET_USERNS ioctl: bwrap nests a second user namespace for the sandbox uid). It runs
as the sandbox uid when that uid may open /dev/net/tun, otherwise as root; either way with
``--enable-sandbox --enable-seccomp`` (own mount namespace, capabilities dropped).
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import shutil
import signal
import subprocess
from collections.abc import Callable

from vmhost.errors import NetworkUnavailable, SandboxError

READY_TIMEOUT_S = 10.0
NS_GET_USERNS = 0xB701
TUN = "/dev/net/tun"


def _tun_open_for(uid: int, gid: int) -> bool:
    try:
        st = os.stat(TUN)
    except OSError:
        return False
    if st.st_uid == uid:
        return st.st_mode & 0o600 == 0o600
    if st.st_gid == gid:
        return st.st_mode & 0o060 == 0o060
    return st.st_mode & 0o006 == 0o006


class SlirpNetwork:
    def __init__(self, binary: str | None = None) -> None:
        self.binary = binary or shutil.which("slirp4netns")

    @property
    def available(self) -> bool:
        return self.binary is not None

    def require(self) -> str:
        if self.binary is None:
            raise NetworkUnavailable(
                "network access was requested but slirp4netns is not installed on this vmhost "
                "(apt-get install slirp4netns)"
            )
        return self.binary

    async def attach(
        self, child_pid: int, uid: int, gid: int, drop: Callable[[], None]
    ) -> SlirpProcess:
        """Start slirp4netns for the network namespace of ``child_pid``; waits until ready."""
        binary = self.require()
        try:
            netns = os.open(f"/proc/{child_pid}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
            try:
                userns = fcntl.ioctl(netns, NS_GET_USERNS)
            finally:
                os.close(netns)
        except OSError as exc:
            raise SandboxError(f"cannot find the sandbox's network namespace: {exc}") from exc
        preexec = drop if _tun_open_for(uid, gid) else None
        ready_r, ready_w = os.pipe()
        exit_r, exit_w = os.pipe()
        try:
            proc = await asyncio.create_subprocess_exec(
                binary,
                "--configure",
                "--mtu=65520",
                "--disable-host-loopback",
                "--enable-sandbox",
                "--enable-seccomp",
                f"--ready-fd={ready_w}",
                f"--exit-fd={exit_r}",
                f"--userns-path=/proc/self/fd/{userns}",
                str(child_pid),
                "tap0",
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.DEVNULL,
                pass_fds=(ready_w, exit_r, userns),
                preexec_fn=preexec,
                start_new_session=True,
            )
        except (OSError, subprocess.SubprocessError) as exc:
            for fd in (ready_r, ready_w, exit_r, exit_w):
                os.close(fd)
            raise SandboxError(f"cannot start slirp4netns: {exc}") from exc
        finally:
            os.close(userns)
        os.close(ready_w)
        os.close(exit_r)
        slirp = SlirpProcess(proc, exit_w)
        try:
            loop = asyncio.get_running_loop()
            ready = await asyncio.wait_for(
                loop.run_in_executor(None, os.read, ready_r, 1), READY_TIMEOUT_S
            )
        except BaseException:
            await slirp.stop()
            raise
        finally:
            os.close(ready_r)
        if ready != b"1":
            await slirp.stop()
            raise SandboxError(f"slirp4netns exited before the network was ready ({ready!r})")
        return slirp


class SlirpProcess:
    def __init__(self, proc: asyncio.subprocess.Process, exit_fd: int) -> None:
        self.proc = proc
        self.exit_fd: int | None = exit_fd

    async def stop(self) -> None:
        if self.exit_fd is not None:
            os.close(self.exit_fd)
            self.exit_fd = None
        if self.proc.returncode is None:
            try:
                os.kill(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        await self.proc.wait()
