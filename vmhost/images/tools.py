"""Host tools the image build runs, with errors that name the Debian package to install."""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
from collections.abc import Sequence
from pathlib import Path

from vmhost.errors import ImageError

INSTALL_ALL = "apt-get install qemu-system-x86 debootstrap e2fsprogs busybox-static lz4"
PT_INTERP = 3


def require_tool(name: str, package: str) -> str:
    """The tool's path, or ImageError naming the package that provides it."""
    path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin:/usr/bin:/bin")
    if path is None:
        raise ImageError(
            f"{name} is not installed: apt-get install {package} "
            f"(everything the image build needs: {INSTALL_ALL})"
        )
    return path


def require_root(what: str) -> None:
    if os.geteuid() != 0:
        raise ImageError(f"{what} needs root (debootstrap and chroot do): run it as root")


def is_static_elf(path: Path) -> bool:
    """True for an ELF executable without a program interpreter (statically linked)."""
    with path.open("rb") as handle:
        header = handle.read(64)
        if header[:4] != b"\x7fELF" or header[4] != 2:  # 64-bit only
            return False
        (phoff,) = struct.unpack_from("<Q", header, 32)
        phentsize, phnum = struct.unpack_from("<HH", header, 54)
        handle.seek(phoff)
        table = handle.read(phentsize * phnum)
    return all(struct.unpack_from("<I", table, i * phentsize)[0] != PT_INTERP for i in range(phnum))


def static_busybox() -> Path:
    for candidate in ("/bin/busybox", "/usr/bin/busybox"):
        path = Path(candidate)
        if path.exists() and is_static_elf(path):
            return path
    raise ImageError(
        "a statically linked busybox is needed for the initramfs: apt-get install busybox-static"
    )


def run(
    argv: Sequence[str],
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
    timeout: float = 3600,
) -> str:
    """Run a build step; ImageError with the tail of its output when it fails."""
    try:
        done = subprocess.run(
            list(argv),
            cwd=cwd,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except FileNotFoundError as exc:
        raise ImageError(f"{argv[0]} is not installed ({INSTALL_ALL})") from exc
    except subprocess.TimeoutExpired as exc:
        raise ImageError(f"{' '.join(argv[:3])} … took longer than {timeout:.0f} s") from exc
    if done.returncode != 0:
        tail = (done.stdout + done.stderr).strip().splitlines()[-15:]
        raise ImageError(
            f"{' '.join(argv[:4])} … failed (exit {done.returncode}):\n" + "\n".join(tail)
        )
    return done.stdout
