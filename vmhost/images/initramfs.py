"""The initramfs: static busybox, the virtio modules and ``infra/guest-image/init``.

Written directly as a "newc" cpio archive (the kernel's initramfs format), so the build
needs no cpio tool and no root, and the output is byte-for-byte reproducible. It is left
uncompressed: it is ~2.5 MiB, and decompressing under TCG costs more than reading it.
"""

from __future__ import annotations

import stat
import subprocess
from dataclasses import dataclass
from pathlib import Path

from vmhost.images.kernel import Kernel

S_IFCHR = stat.S_IFCHR
MODULES_LIST = "etc/bulkhead-modules"


@dataclass
class _Entry:
    name: str
    mode: int
    data: bytes = b""
    rdev: tuple[int, int] = (0, 0)


class CpioWriter:
    """An in-memory newc archive (see the kernel's early-userspace buffer-format docs)."""

    def __init__(self) -> None:
        self.entries: list[_Entry] = []

    def directory(self, name: str, mode: int = 0o755) -> None:
        self.entries.append(_Entry(name, stat.S_IFDIR | mode))

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        self.entries.append(_Entry(name, stat.S_IFREG | mode, data))

    def symlink(self, name: str, target: str) -> None:
        self.entries.append(_Entry(name, stat.S_IFLNK | 0o777, target.encode()))

    def char_device(self, name: str, major: int, minor: int, mode: int = 0o600) -> None:
        self.entries.append(_Entry(name, S_IFCHR | mode, rdev=(major, minor)))

    @staticmethod
    def _pad(length: int) -> bytes:
        return b"\0" * (-length % 4)

    def _record(self, ino: int, entry: _Entry) -> bytes:
        name = entry.name.encode() + b"\0"
        nlink = 2 if stat.S_ISDIR(entry.mode) else 1
        fields = (
            ino, entry.mode, 0, 0, nlink, 0, len(entry.data), 0, 0,
            entry.rdev[0], entry.rdev[1], len(name), 0,
        )  # fmt: skip
        header = b"070701" + b"".join(b"%08X" % value for value in fields)
        head = header + name
        return head + self._pad(len(head)) + entry.data + self._pad(len(entry.data))

    def to_bytes(self) -> bytes:
        records = [self._record(i + 1, e) for i, e in enumerate(self.entries)]
        records.append(self._record(0, _Entry("TRAILER!!!", 0)))
        return b"".join(records)


def busybox_applets(busybox: Path) -> list[str]:
    out = subprocess.run(
        [str(busybox), "--list"], capture_output=True, text=True, check=True
    ).stdout
    return sorted({name for name in out.split() if name and "/" not in name})


def build_initramfs(busybox: Path, kernel: Kernel, init_script: Path, out: Path) -> None:
    cpio = CpioWriter()
    for directory in ("bin", "dev", "etc", "lib", "lib/modules", "proc", "sys", "run", "tmp"):
        cpio.directory(directory)
    cpio.char_device("dev/console", 5, 1)
    cpio.char_device("dev/null", 1, 3, 0o666)
    cpio.file("bin/busybox", busybox.read_bytes(), 0o755)
    for applet in busybox_applets(busybox):
        if applet != "busybox":
            cpio.symlink(f"bin/{applet}", "busybox")
    names = []
    for module in kernel.modules:
        cpio.file(f"lib/modules/{module.name}", module.read_bytes())
        names.append(module.name)
    cpio.file(MODULES_LIST, ("\n".join(names) + "\n").encode())
    cpio.file("init", init_script.read_bytes(), 0o755)
    out.write_bytes(cpio.to_bytes())
