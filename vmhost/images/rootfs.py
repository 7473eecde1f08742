"""The guest's read-only root filesystem: debootstrap minbase + the template's Debian
packages + its pip packages (in /opt/venv) + the guest agent, packed with ``mkfs.ext4 -d``.

The slow part (debootstrap, pip) is cached as a directory tree keyed by what goes into it,
so a change of the agent or the init script only re-packs the filesystem.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

from vmhost.images.tools import require_tool, run
from vmhost.templates import Template

SUITE = "bookworm"
DEFAULT_MIRROR = "http://deb.debian.org/debian"
AGENT_DIR = "opt/bulkhead"
GUEST_DIR = "opt/bulkhead/guest"  # same path as the bwrap driver mounts them at
VENV = "opt/venv"
MPLCONFIGDIR = "/home/user/.config/matplotlib"  # what the qemu driver sets for jobs
TRIM = (
    "var/cache/apt/archives",
    "var/cache/apt/pkgcache.bin",
    "var/cache/apt/srcpkgcache.bin",
    "var/lib/apt/lists",
    "usr/share/doc",
    "usr/share/man",
    "usr/share/info",
    "usr/share/locale",
    "var/log",
)
INTERPRETERS = {
    "python": ("usr/bin/python3",),
    "bash": ("usr/bin/bash", "bin/bash"),
    "javascript": ("usr/bin/node", "usr/bin/nodejs"),
}
STAGE_VERSION = "1"


def mirror() -> str:
    return os.environ.get("BULKHEAD_DEBIAN_MIRROR") or DEFAULT_MIRROR


def stage_key(template: Template, with_pip: bool) -> str:
    """What a cached tree depends on (debootstrap only, or debootstrap + pip)."""
    doc = {
        "v": STAGE_VERSION,
        "suite": SUITE,
        "mirror": mirror(),
        "apt": sorted(set(template.apt_packages) | {"python3"}),
        "pip": list(template.pip_packages) if with_pip else [],
    }
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:20]


def _chroot_python(tree: Path, code: str) -> str:
    return run(["chroot", str(tree), "/usr/bin/python3", "-c", code]).strip()


def _platforms(glibc: str) -> list[str]:
    """manylinux tags the guest's glibc accepts (pip does not expand them itself)."""
    major, minor = (int(x) for x in glibc.split(".")[:2])
    tags = [f"manylinux_{major}_{m}_x86_64" for m in range(minor, 4, -1)]
    return tags + ["manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64"]


def _pip_install(template: Template, tree: Path, progress: Callable[[str], None]) -> None:
    """pip runs on the host (the guest has no network) for the guest's python and glibc."""
    version = _chroot_python(tree, "import sys; print('%d.%d' % sys.version_info[:2])")
    glibc = _chroot_python(tree, "import platform; print(platform.libc_ver()[1])")
    progress(f"rootfs: creating /{VENV} with the guest's python{version}")
    run(["chroot", str(tree), "/usr/bin/python3", "-m", "venv", "--without-pip", f"/{VENV}"])
    site = tree / VENV / "lib" / f"python{version}" / "site-packages"
    progress(f"rootfs: pip install {' '.join(template.pip_packages)} (host pip, guest ABI)")
    platforms = [arg for tag in _platforms(glibc) for arg in ("--platform", tag)]
    run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "--no-compile",
            "--only-binary=:all:",
            "--implementation",
            "cp",
            "--python-version",
            version,
            "--abi",
            "cp" + version.replace(".", ""),
            *platforms,
            "--target",
            str(site),
            *template.pip_packages,
        ]  # fmt: skip
    )
    progress("rootfs: byte-compiling the pip packages with the guest's python")
    run(["chroot", str(tree), "/usr/bin/python3", "-m", "compileall", "-q", "-j", "0", f"/{VENV}"])
    if any(p.split("=")[0].strip().lower() == "matplotlib" for p in template.pip_packages):
        progress("rootfs: building matplotlib's font cache into /home/user/.config/matplotlib")
        code = "import matplotlib.pyplot as plt; plt.figure()"
        env = ["env", f"MPLCONFIGDIR={MPLCONFIGDIR}", "MPLBACKEND=Agg", "HOME=/home/user"]
        run(["chroot", str(tree), *env, f"/{VENV}/bin/python3", "-c", code])


def _trim(tree: Path) -> None:
    for rel in TRIM:
        path = tree / rel
        if path.is_dir() and not path.is_symlink():
            for child in path.iterdir():
                if child.is_dir() and not child.is_symlink():
                    shutil.rmtree(child)
                else:
                    child.unlink()
        elif path.exists():
            path.unlink()


def _cached(
    cache_dir: Path,
    key: str,
    what: str,
    fill: Callable[[Path], None],
    progress: Callable[[str], None],
) -> Path:
    """A tree built once by ``fill(work_dir)``, then reused (renamed into place when done)."""
    tree = cache_dir / f"rootfs-{key}"
    if (tree / ".bulkhead-complete").exists():
        progress(f"rootfs: {what} {tree.name} (cached)")
        return tree
    work = cache_dir / f".rootfs-{key}-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    cache_dir.mkdir(parents=True, exist_ok=True)
    try:
        fill(work)
        (work / ".bulkhead-complete").write_text(key + "\n")
        shutil.rmtree(tree, ignore_errors=True)
        work.rename(tree)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return tree


def base_tree(template: Template, cache_dir: Path, progress: Callable[[str], None]) -> Path:
    """The debootstrapped tree for the template, plus its pip packages; each step cached,
    so a failed pip install does not repeat the debootstrap."""
    require_tool("debootstrap", "debootstrap")
    require_tool("chroot", "coreutils")
    include = ",".join(sorted(set(template.apt_packages) | {"python3"}))

    def debootstrap(work: Path) -> None:
        progress(f"rootfs: debootstrap --variant=minbase {SUITE} ({include}); ~1 min")
        argv = ["debootstrap", "--variant=minbase", f"--include={include}", SUITE, str(work)]
        run([*argv, mirror()], timeout=1800)
        _trim(work)

    tree = _cached(cache_dir, stage_key(template, False), "debootstrap tree", debootstrap, progress)
    if not template.pip_packages:
        return tree

    def pip(work: Path) -> None:
        run(["cp", "-a", "--reflink=auto", str(tree), str(work)])
        _pip_install(template, work, progress)

    return _cached(cache_dir, stage_key(template, True), "pip tree", pip, progress)


SANDBOX_UID = 1000  # user code in the VM runs as this user (infra/guest-image/start)


def _add_sandbox_user(root: Path) -> None:
    """``user`` (uid/gid 1000, home /home/user): who jobs and sandbox commands run as."""
    entries = {
        "etc/passwd": f"user:x:{SANDBOX_UID}:{SANDBOX_UID}:sandbox:/home/user:/bin/bash\n",
        "etc/group": f"user:x:{SANDBOX_UID}:\n",
    }
    for name, line in entries.items():
        path = root / name
        text = path.read_text()
        if not any(row.startswith("user:") for row in text.splitlines()):
            path.write_text(text + line)


def interpreters(tree: Path, has_venv: bool) -> dict[str, str]:
    """Language -> absolute interpreter path inside the guest (only those present)."""
    found: dict[str, str] = {}
    for language, candidates in INTERPRETERS.items():
        for rel in candidates:
            if (tree / rel).exists() or (tree / rel).is_symlink():
                found[language] = "/" + rel
                break
    if has_venv and "python" in found:
        found["python"] = f"/{VENV}/bin/python3"
    return found


def assemble(
    template: Template,
    tree: Path,
    guest: list[Path],
    start_script: Path,
    out: Path,
    progress: Callable[[str], None],
) -> dict[str, str]:
    """Copy the cached tree, add the guest programs, pack it as ext4; returns the interpreters."""
    require_tool("mkfs.ext4", "e2fsprogs")
    staging = out.parent / ".rootfs-staging"
    shutil.rmtree(staging, ignore_errors=True)
    progress("rootfs: adding the guest agent")
    try:
        run(["cp", "-a", "--reflink=auto", str(tree), str(staging)])
        (staging / ".bulkhead-complete").unlink(missing_ok=True)
        guest_dir = staging / GUEST_DIR
        guest_dir.mkdir(parents=True, exist_ok=True)
        for path in guest:
            shutil.copyfile(path, guest_dir / path.name)
        shutil.copyfile(start_script, staging / AGENT_DIR / "start")
        (staging / AGENT_DIR / "start").chmod(0o755)
        run(["chroot", str(staging), "/usr/bin/python3", "-m", "compileall", "-q", f"/{GUEST_DIR}"])
        (staging / "home/user").mkdir(parents=True, exist_ok=True)
        (staging / "etc/hostname").write_text("sandbox\n")
        _add_sandbox_user(staging)
        found = interpreters(staging, bool(template.pip_packages))
        files, size = 0, 0
        for root, dirs, names in os.walk(staging):
            files += len(dirs) + len(names)
            size += sum(os.lstat(os.path.join(root, n)).st_size for n in names)
        size_mb = int(size * 1.15 / 2**20) + 64
        progress(f"rootfs: mkfs.ext4 -d ({files} files, {size_mb} MiB)")
        run(
            [
                "mkfs.ext4",
                "-q",
                "-F",
                "-L",
                "bulkhead-root",
                "-O",
                "^has_journal",
                "-m",
                "0",
                "-N",
                str(int(files * 1.2) + 4096),
                "-E",
                "root_owner=0:0",
                "-d",
                str(staging),
                str(out),
                f"{size_mb}M",
            ]  # fmt: skip
        )
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return found
