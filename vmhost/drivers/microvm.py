"""One QEMU microVM: its command line, the process (launched, booted or restored, killed and
reaped), the agent channel over virtio-serial, and taking a snapshot of a booted VM.

The agent's virtio-serial port and the QMP monitor are socketpairs whose guest ends QEMU
inherits (``-chardev socket,fd=N``), so QEMU needs no socket paths and the host side is
connected before the guest runs: a restored agent never sees its host "disconnect". A
restore reads the snapshot from a descriptor (``-incoming fd:N``); with
``migration.store-global-state=off`` the restored VM starts running by itself, so restoring
costs one process start and no monitor round trip (snapshots.py takes the snapshots).
QEMU runs as the unprivileged sandbox user when the vmhost is root, under QEMU's own
seccomp filter when it has one, and dies with the vmhost (PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import asyncio
import ctypes
import functools
import hashlib
import logging
import os
import signal
import socket
import stat
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from vmhost.errors import ProtocolError, SandboxError
from vmhost.guest.channel import GuestChannel
from vmhost.guest.protocol import b64encode
from vmhost.images import ImageInfo

log = logging.getLogger("vmhost.microvm")
QEMU = "qemu-system-x86_64"
BOOT_TIMEOUT_S = 60.0
RESTORE_TIMEOUT_S = 30.0
SECCOMP = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"
PR_SET_PDEATHSIG = 1
CONSOLE_TAIL = 4000
_libc = ctypes.CDLL(None, use_errno=True)


@functools.lru_cache(maxsize=4)
def qemu_facts(qemu: str) -> tuple[str, bool]:
    """QEMU's version line, and whether it has its seccomp sandbox (checked once)."""
    version = subprocess.run([qemu, "--version"], capture_output=True, text=True, check=False)
    argv = [qemu, "-M", "none", "-nodefaults", "-display", "none", "-sandbox", SECCOMP]
    quit_ = b'{"execute":"qmp_capabilities"}\n{"execute":"quit"}\n'
    try:
        done = subprocess.run(
            [*argv, "-qmp", "stdio"], input=quit_, capture_output=True, timeout=20, check=False
        )
        seccomp = done.returncode == 0
    except subprocess.TimeoutExpired:
        seccomp = False
    if not seccomp:
        log.warning("this qemu has no seccomp sandbox (-sandbox): VMs run without it")
    return (version.stdout.splitlines() or ["unknown"])[0], seccomp


def host_tsc_khz() -> int | None:
    """The host TSC rate for the guest's tsc_early_khz (TCG's TSC runs at the host's)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("cpu MHz"):
                return int(float(line.split(":", 1)[1]) * 1000)
    except (OSError, ValueError):
        pass
    return None


def readable_by_others(path: Path) -> bool:
    """Whether an unprivileged user can read ``path`` (o+r, and o+x on every parent)."""
    try:
        if not os.stat(path).st_mode & stat.S_IROTH:
            return False
        return all(os.stat(p).st_mode & stat.S_IXOTH for p in path.resolve().parents)
    except OSError:
        return False


@dataclass(frozen=True)
class Credentials:
    """Who QEMU runs as: None = the vmhost's own user."""

    uid: int | None = None
    gid: int | None = None
    groups: tuple[int, ...] = ()

    def preexec(self) -> None:
        """Runs in the child between fork and exec."""
        if self.uid is not None and self.gid is not None:
            os.setgroups(list(self.groups))
            os.setresgid(self.gid, self.gid, self.gid)
            os.setresuid(self.uid, self.uid, self.uid)
        # after the uid change (which clears it): die when the vmhost dies
        _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


@dataclass(frozen=True)
class VmConfig:
    qemu: str
    image: ImageInfo
    accel: str  # "kvm" | "tcg"
    memory_mb: int
    vcpus: int
    tsc_khz: int | None = None
    seccomp: bool = True
    qemu_version: str = ""

    def cmdline(self) -> str:
        parts = ["console=ttyS0", "quiet", "reboot=t", "panic=-1", "pci=off"]
        if self.accel == "tcg" and self.tsc_khz:
            # without it ~6 % of TCG boots hang calibrating the TSC
            parts += [f"tsc_early_khz={self.tsc_khz}", "tsc=reliable"]
        return " ".join(parts)

    def args(
        self, agent_fd: int, qmp_fd: int | None = None, incoming_fd: int | None = None
    ) -> list[str]:
        image = self.image
        args = [
            self.qemu,
            "-M", f"microvm,accel={self.accel}",
            "-cpu", "host" if self.accel == "kvm" else "max",
            "-smp", str(self.vcpus), "-m", str(self.memory_mb),
            "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
            "-kernel", str(image.kernel), "-initrd", str(image.initrd),
            "-append", self.cmdline(),
            "-drive", f"id=root,file={image.rootfs},format=raw,if=none,readonly=on",
            "-device", "virtio-blk-device,drive=root",
            "-device", "virtio-serial-device",
            "-chardev", f"socket,id=agent,fd={agent_fd}",
            "-device", "virtserialport,chardev=agent,name=agent",
            "-serial", "stdio",
            # a restored VM runs at once instead of staying paused like its source
            "-global", "migration.store-global-state=off",
        ]  # fmt: skip
        if self.seccomp:
            args += ["-sandbox", SECCOMP]
        if qmp_fd is not None:
            args += ["-chardev", f"socket,id=qmp,fd={qmp_fd}", "-mon", "chardev=qmp,mode=control"]
        if incoming_fd is not None:
            args += ["-incoming", f"fd:{incoming_fd}"]
        return args

    def fingerprint(self) -> str:
        """Identifies what a snapshot of this configuration must be restored with."""
        text = "\0".join([self.qemu_version, self.image.key, *self.args(3)])
        return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass(eq=False)
class MicroVm:
    """A running QEMU process and the agent channel to its guest."""

    config: VmConfig
    proc: asyncio.subprocess.Process
    channel: GuestChannel
    console: IO[bytes]
    launched_at: float = field(default_factory=time.monotonic)
    hello: dict[str, Any] | None = None
    closed: bool = False
    last_console: str = ""

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.returncode is None and not self.closed

    def kill(self) -> None:
        """SIGKILL the VM now (safe to call more than once)."""
        if self.proc.returncode is None:
            try:
                self.proc.kill()
            except ProcessLookupError:
                pass

    async def close(self) -> None:
        """Kill, reap and release the VM; safe on every path and more than once (the
        console's tail is kept for error messages)."""
        self.kill()
        try:
            await self.proc.wait()
        finally:
            if not self.closed:
                self.closed = True
                self.channel.close()
                self.last_console = self.console_tail()
                self.console.close()

    def console_tail(self) -> str:
        if self.console.closed:
            return self.last_console
        try:
            self.console.seek(0, os.SEEK_END)
            size = self.console.tell()
            self.console.seek(max(size - CONSOLE_TAIL, 0))
            return self.console.read().decode(errors="replace").strip()
        except (OSError, ValueError):
            return ""

    def failure(self, what: str, exc: BaseException | None = None) -> SandboxError:
        detail = f": {exc}" if exc is not None and str(exc) else ""
        tail = self.console_tail()
        console = f"\n--- VM console / qemu output (tail) ---\n{tail}" if tail else ""
        return SandboxError(f"microVM {what}{detail}{console}")

    async def boot(self, limit_s: float = BOOT_TIMEOUT_S) -> dict[str, Any]:
        """Wait for a freshly booted guest's agent to say hello."""
        try:
            self.hello = await asyncio.wait_for(self.channel.handshake(), limit_s)
        except (ProtocolError, TimeoutError) as exc:
            raise self.failure(f"did not boot within {limit_s:.0f} s", exc) from exc
        return self.hello

    async def sync(self, limit_s: float = RESTORE_TIMEOUT_S) -> None:
        """Fresh entropy and the clock for the guest; its ``ok`` means the VM is ready."""
        frame_id = self.channel.new_id()
        request = {
            "type": "sync",
            "id": frame_id,
            "time_ns": time.time_ns(),
            "entropy": b64encode(os.urandom(32)),
        }
        try:
            await self.channel.send(request)
            reply = await asyncio.wait_for(self.channel.read_frame(), limit_s)
        except (ProtocolError, TimeoutError) as exc:
            raise self.failure("did not answer after the restore", exc) from exc
        if reply.get("id") != frame_id or reply["type"] != "ok":
            raise self.failure(f"answered sync with {reply!r}")


async def launch(
    config: VmConfig,
    creds: Credentials,
    incoming: Path | None = None,
    qmp: bool = False,
) -> tuple[MicroVm, socket.socket | None]:
    """Start QEMU (booting, or restoring from ``incoming``); the caller must ``close`` it."""
    host_agent, guest_agent = socket.socketpair()
    host_qmp, guest_qmp = socket.socketpair() if qmp else (None, None)
    incoming_fd = os.open(incoming, os.O_RDONLY | os.O_CLOEXEC) if incoming else None
    console = tempfile.TemporaryFile(prefix="bulkhead-vm-")
    inherited = [guest_agent.fileno()]
    if guest_qmp is not None:
        inherited.append(guest_qmp.fileno())
    if incoming_fd is not None:
        inherited.append(incoming_fd)
    args = config.args(
        guest_agent.fileno(),
        guest_qmp.fileno() if guest_qmp is not None else None,
        incoming_fd,
    )
    try:
        proc = await asyncio.create_subprocess_exec(
            *args,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=console,
            stderr=asyncio.subprocess.STDOUT,
            pass_fds=inherited,
            preexec_fn=creds.preexec,
            start_new_session=True,
        )
    except BaseException:
        for sock in (host_agent, host_qmp):
            if sock is not None:
                sock.close()
        console.close()
        raise
    finally:
        guest_agent.close()
        if guest_qmp is not None:
            guest_qmp.close()
        if incoming_fd is not None:
            os.close(incoming_fd)
    try:
        reader, writer = await asyncio.open_unix_connection(sock=host_agent)
    except BaseException:
        proc.kill()
        await proc.wait()
        host_agent.close()
        console.close()
        raise
    return MicroVm(config, proc, GuestChannel(reader, writer), console), host_qmp
