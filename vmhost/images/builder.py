"""Content-addressed microVM images: ``build_image`` and ``find_image``.

An image is a directory ``<image_dir>/<template>-<key16>/`` holding ``vmlinux`` (ELF
kernel), ``initrd.img`` (busybox + virtio modules + init), ``rootfs.ext4`` (read-only root)
and ``image.json`` (what the driver needs to know: interpreters, kernel release). The key
is a sha256 over the template file's digest, the guest programs (agent, kernels), the
init scripts and the builder version, so a second build of an unchanged template is a
no-op, and changing any input builds a new image next to the old one.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from vmhost.errors import ImageError
from vmhost.images import initramfs, kernel, rootfs
from vmhost.images.tools import require_root, static_busybox
from vmhost.templates import Template

BUILDER_VERSION = "2"  # 2: user code runs as uid 1000
REPO = Path(__file__).resolve().parent.parent.parent
GUEST_IMAGE_DIR = REPO / "infra" / "guest-image"
GUEST_DIR = REPO / "vmhost" / "guest"
# guest-side programs copied to /opt/bulkhead/guest (the agent and the code kernels)
GUEST_FILES = ("agent.py", "kernel.py", "kernel.js")
INIT = GUEST_IMAGE_DIR / "init"
START = GUEST_IMAGE_DIR / "start"
META = "image.json"
Progress = Callable[[str], None]


@dataclass(frozen=True)
class ImageInfo:
    template: str
    key: str
    path: Path
    kernel_release: str
    kernel_package: str
    interpreters: dict[str, str]  # language -> absolute path inside the guest
    built_at: str
    build_seconds: float

    @property
    def kernel(self) -> Path:
        return self.path / "vmlinux"

    @property
    def initrd(self) -> Path:
        return self.path / "initrd.img"

    @property
    def rootfs(self) -> Path:
        return self.path / "rootfs.ext4"

    @property
    def size_bytes(self) -> int:
        return sum(p.stat().st_size for p in (self.kernel, self.initrd, self.rootfs))

    def to_json(self) -> str:
        doc = asdict(self)
        doc["path"] = str(self.path)
        return json.dumps(doc, indent=2, sort_keys=True) + "\n"

    @classmethod
    def load(cls, directory: Path) -> ImageInfo | None:
        try:
            doc: dict[str, Any] = json.loads((directory / META).read_text())
            doc["path"] = directory
            info = cls(**doc)
        except (OSError, ValueError, TypeError):
            return None
        if not all(p.exists() for p in (info.kernel, info.initrd, info.rootfs)):
            return None
        return info


def guest_files() -> list[Path]:
    return [GUEST_DIR / name for name in GUEST_FILES if (GUEST_DIR / name).exists()]


def image_key(template: Template) -> str:
    digest = hashlib.sha256()
    for part in (
        f"builder {BUILDER_VERSION}\n".encode(),
        template.digest.encode(),
        *(f"{p.name}\n".encode() + p.read_bytes() for p in guest_files()),
        INIT.read_bytes(),
        START.read_bytes(),
    ):
        digest.update(hashlib.sha256(part).digest())
    return digest.hexdigest()


def image_path(template: Template, image_dir: Path) -> Path:
    return image_dir / f"{template.name}-{image_key(template)[:16]}"


def find_image(template: Template, image_dir: Path) -> ImageInfo | None:
    """The built image for the template as it is now, or None."""
    return ImageInfo.load(image_path(template, image_dir))


def list_images(image_dir: Path) -> list[ImageInfo]:
    """Every image in the directory (current or not), newest first."""
    if not image_dir.is_dir():
        return []
    found = [ImageInfo.load(p) for p in image_dir.iterdir() if p.is_dir()]
    return sorted((i for i in found if i is not None), key=lambda i: i.built_at, reverse=True)


@contextmanager
def _locked(image_dir: Path) -> Iterator[None]:
    image_dir.mkdir(parents=True, exist_ok=True)
    with (image_dir / ".build.lock").open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def build_image(template: Template, image_dir: Path, progress: Progress) -> ImageInfo:
    """Build the template's image unless it exists; returns it either way."""
    existing = find_image(template, image_dir)
    if existing is not None:
        progress(f"{template.name}: image {existing.path.name} is up to date (nothing to do)")
        return existing
    require_root("building a microVM image")
    busybox = static_busybox()
    with _locked(image_dir):
        existing = find_image(template, image_dir)
        if existing is not None:  # another process built it while we waited for the lock
            progress(f"{template.name}: image {existing.path.name} was just built")
            return existing
        return _build(template, image_dir, busybox, progress)


def _build(template: Template, image_dir: Path, busybox: Path, progress: Progress) -> ImageInfo:
    clock = time.monotonic()
    final = image_path(template, image_dir)
    cache = image_dir / ".cache"
    work = image_dir / f".build-{final.name}-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)

    def step(message: str) -> None:
        progress(f"{template.name}: [{time.monotonic() - clock:5.1f}s] {message}")

    try:
        guest_kernel = kernel.fetch_kernel(cache, step)
        shutil.copyfile(guest_kernel.vmlinux, work / "vmlinux")
        step(f"initramfs: busybox + {len(guest_kernel.modules)} modules + init")
        initramfs.build_initramfs(busybox, guest_kernel, INIT, work / "initrd.img")
        tree = rootfs.base_tree(template, cache, step)
        found = rootfs.assemble(template, tree, guest_files(), START, work / "rootfs.ext4", step)
        for path in work.iterdir():
            path.chmod(0o644)  # qemu may run as an unprivileged user; none of it is secret
        info = ImageInfo(
            template=template.name,
            key=image_key(template),
            path=final,
            kernel_release=guest_kernel.release,
            kernel_package=guest_kernel.version,
            interpreters=found,
            built_at=datetime.now(UTC).isoformat(timespec="seconds"),
            build_seconds=round(time.monotonic() - clock, 1),
        )
        (work / META).write_text(info.to_json())
        work.chmod(0o755)
        shutil.rmtree(final, ignore_errors=True)
        work.rename(final)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    loaded = ImageInfo.load(final)
    if loaded is None:
        raise ImageError(f"the image at {final} is incomplete after the build")
    step(f"done: {final} ({loaded.size_bytes / 2**20:.0f} MiB)")
    return loaded
