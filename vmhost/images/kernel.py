"""The guest kernel: Debian's ``linux-image-cloud-amd64``, fetched with ``apt-get download``
(never installed on the host), as an uncompressed ELF ``vmlinux`` plus the virtio modules
the initramfs loads.

The bzImage in the package boots slower than the ELF inside it, so ``extract_vmlinux`` does
what the kernel tree's ``scripts/extract-vmlinux`` does: find a compressed payload's magic
bytes and decompress from there until the result is an ELF file.
"""

from __future__ import annotations

import bz2
import json
import lzma
import os
import re
import shutil
import subprocess
import tempfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from vmhost.errors import ImageError
from vmhost.images.tools import require_tool, run

META_PACKAGE = "linux-image-cloud-amd64"
# The modules the init script loads; the rest of each one's dependencies are found in the
# modules' own .modinfo ("depends=").
WANTED_MODULES = ("virtio_mmio", "virtio_console", "virtio_blk", "overlay")
ELF_MAGIC = b"\x7fELF"


@dataclass(frozen=True)
class Kernel:
    version: str  # the Debian package version
    release: str  # uname -r
    vmlinux: Path
    modules: tuple[Path, ...]  # in load order


def _package_name() -> str:
    argv = ["apt-cache", "depends", "--no-recommends", "--no-suggests", META_PACKAGE]
    try:
        out = run(argv)
    except ImageError:
        out = ""
    match = re.search(r"Depends:\s*(linux-image-\S+)", out)
    if match is None and os.geteuid() == 0:  # no package lists yet (a fresh machine)
        run(["apt-get", "update", "-qq"], timeout=600)
        match = re.search(r"Depends:\s*(linux-image-\S+)", run(argv))
    if match is None:
        raise ImageError(
            f"apt knows no {META_PACKAGE} (run `apt-get update`; the kernel comes from "
            "Debian's main archive)"
        )
    return match.group(1)


def _decompressors() -> list[tuple[bytes, Callable[[bytes], bytes | None]]]:
    def external(*argv: str) -> Callable[[bytes], bytes | None]:
        def go(data: bytes) -> bytes | None:
            if shutil.which(argv[0]) is None:
                return None
            # like extract-vmlinux, ignore the exit status (trailing data makes it non-zero)
            done = subprocess.run(list(argv), input=data, capture_output=True, check=False)
            return done.stdout

        return go

    def py(fn: Callable[[bytes], bytes]) -> Callable[[bytes], bytes | None]:
        def go(data: bytes) -> bytes | None:
            try:
                return fn(data)
            except (OSError, EOFError, ValueError, lzma.LZMAError, zlib.error):
                return None

        return go

    return [
        (b"\x02!L\x18", external("lz4", "-dc")),  # LZ4 legacy frame (Debian's choice)
        (b"(\xb5/\xfd", external("zstd", "-dcq")),
        (b"\x1f\x8b\x08", py(lambda d: zlib.decompressobj(31).decompress(d))),
        (b"\xfd7zXZ\x00", py(lambda d: lzma.LZMADecompressor().decompress(d))),
        (b"BZh", py(lambda d: bz2.BZ2Decompressor().decompress(d))),
        (b"\x5d\x00\x00\x00", py(lambda d: lzma.LZMADecompressor(lzma.FORMAT_ALONE).decompress(d))),
    ]


def extract_vmlinux(bzimage: bytes) -> bytes:
    """The ELF kernel inside a compressed bzImage."""
    if bzimage.startswith(ELF_MAGIC):
        return bzimage
    missing = []
    for magic, decompress in _decompressors():
        start = bzimage.find(magic)
        while start >= 0:
            out = decompress(bzimage[start:])
            if out is None and magic == b"\x02!L\x18":
                missing.append("lz4 (apt-get install lz4)")
                break
            if out is None and magic == b"(\xb5/\xfd":
                missing.append("zstd (apt-get install zstd)")
                break
            if out and out.startswith(ELF_MAGIC):
                return out
            start = bzimage.find(magic, start + 1)
    hint = f"; install {', '.join(missing)}" if missing else ""
    raise ImageError(f"no ELF vmlinux found inside the kernel image{hint}")


def module_depends(path: Path) -> list[str]:
    """A module's ``depends=`` from its .modinfo strings (what modinfo/depmod read)."""
    data = path.read_bytes()
    match = re.search(rb"(?:^|\x00)depends=([^\x00]*)\x00", data)
    if match is None:
        return []
    return [name for name in match.group(1).decode().split(",") if name]


def module_order(tree: Path, wanted: tuple[str, ...]) -> list[Path]:
    """``wanted`` modules and their dependencies, dependencies first; built-ins skipped."""
    index: dict[str, Path] = {}
    for ko in tree.rglob("*.ko"):
        index[ko.stem.replace("-", "_")] = ko
    builtin_file = tree / "modules.builtin"
    builtin = set()
    if builtin_file.exists():
        builtin = {
            Path(line).stem.replace("-", "_") for line in builtin_file.read_text().splitlines()
        }
    order: list[Path] = []
    seen: set[str] = set()

    def visit(name: str) -> None:
        name = name.replace("-", "_")
        if name in seen:
            return
        seen.add(name)
        if name in builtin:
            return
        ko = index.get(name)
        if ko is None:
            raise ImageError(f"the guest kernel has no module {name!r} (not built in either)")
        for dep in module_depends(ko):
            visit(dep)
        order.append(ko)

    for name in wanted:
        visit(name)
    return order


def fetch_kernel(cache_dir: Path, progress: Callable[[str], None]) -> Kernel:
    """Download and unpack the cloud kernel once per package version (cached)."""
    for tool, package in (("apt-get", "apt"), ("apt-cache", "apt"), ("dpkg-deb", "dpkg")):
        require_tool(tool, package)
    package = _package_name()
    version = run(["apt-cache", "policy", package])
    match = re.search(r"Candidate:\s*(\S+)", version)
    version = match.group(1) if match else "unknown"
    target = cache_dir / f"kernel-{package}-{version}"
    meta = target / "kernel.json"
    if meta.exists():
        info = json.loads(meta.read_text())
        progress(f"kernel: {package} {version} (cached)")
        return Kernel(
            version,
            info["release"],
            target / "vmlinux",
            tuple(target / "modules" / m for m in info["modules"]),
        )
    progress(f"kernel: downloading {package} {version}")
    cache_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir, prefix=".kernel-") as tmp:
        work = Path(tmp)
        run(["apt-get", "download", "-q", "-o", "APT::Sandbox::User=root", package], cwd=work)
        debs = list(work.glob("*.deb"))
        if not debs:
            raise ImageError(f"apt-get download {package} produced no .deb")
        run(["dpkg-deb", "-x", str(debs[0]), str(work / "pkg")])
        bzimages = list((work / "pkg" / "boot").glob("vmlinuz-*"))
        trees = list((work / "pkg" / "lib" / "modules").glob("*"))
        if not bzimages or not trees:
            raise ImageError(f"{package} has no /boot/vmlinuz-* or /lib/modules/*")
        release = trees[0].name
        progress(f"kernel: extracting the ELF vmlinux of {release}")
        out = work / "out"
        (out / "modules").mkdir(parents=True)
        (out / "vmlinux").write_bytes(extract_vmlinux(bzimages[0].read_bytes()))
        names = []
        for ko in module_order(trees[0], WANTED_MODULES):
            shutil.copyfile(ko, out / "modules" / ko.name)
            names.append(ko.name)
        (out / "kernel.json").write_text(json.dumps({"release": release, "modules": names}))
        out.rename(target)
    return fetch_kernel(cache_dir, lambda _msg: None)


__all__ = ["Kernel", "extract_vmlinux", "fetch_kernel", "module_order"]
