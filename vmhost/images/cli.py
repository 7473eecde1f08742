"""``bulkhead image build|list|prune``: build the templates' artifacts and show what is built.

For each template two independent artifacts can be built: the microVM image for the qemu
driver (kernel, initramfs, rootfs; see builder.py) and, for templates with pip packages,
the bwrap driver's prepared Python environment (pyenv.py). ``--for`` picks one of them.
"""

from __future__ import annotations

import importlib.util
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path

from vmhost.errors import VmhostError
from vmhost.images.builder import build_image, image_path, list_images
from vmhost.templates import Template, list_templates, load_template

TARGETS = ("all", "qemu", "bwrap")


def _progress(message: str) -> None:
    print(message, flush=True)


def _pyenv_builder() -> Callable[[Template, Path, Callable[[str], None]], object] | None:
    """The bwrap environment builder (vmhost/images/pyenv.py), when this version has it."""
    if importlib.util.find_spec("vmhost.images.pyenv") is None:
        return None
    from vmhost.images import pyenv

    return pyenv.build_pyenv


def build(names: list[str], all_templates: bool, target: str, image_dir: Path) -> int:
    """Build what was asked for; exit status 1 if any part failed (the rest still runs)."""
    if all_templates:
        names = list_templates()
    names = names or ["base"]
    failures = []
    for name in names:
        try:
            template = load_template(name)
        except VmhostError as exc:
            print(f"bulkhead image build: {exc.message}", file=sys.stderr)
            failures.append(name)
            continue
        if target in ("all", "bwrap"):
            build_pyenv = _pyenv_builder()
            try:
                if build_pyenv is not None:
                    build_pyenv(template, image_dir, _progress)
                elif target == "bwrap":
                    _progress(f"{name}: this version has no bwrap environment builder")
            except VmhostError as exc:
                print(f"{name}: bwrap environment FAILED: {exc.message}", file=sys.stderr)
                failures.append(f"{name} (bwrap)")
        if target in ("all", "qemu"):
            clock = time.monotonic()
            try:
                info = build_image(template, image_dir, _progress)
            except VmhostError as exc:
                print(f"{name}: microVM image FAILED: {exc.message}", file=sys.stderr)
                if target == "all":
                    print(
                        f"  (only the bwrap part: --for bwrap --template {name})", file=sys.stderr
                    )
                failures.append(f"{name} (qemu)")
            else:
                took = time.monotonic() - clock
                _progress(f"{name}: microVM image ready at {info.path} ({took:.1f} s)")
    if failures:
        print(f"bulkhead image build: failed: {', '.join(failures)}", file=sys.stderr)
        return 1
    return 0


def _current(image_dir: Path) -> dict[str, str]:
    """Template name -> directory name of its current image (built or not)."""
    current = {}
    for name in list_templates():
        try:
            current[name] = image_path(load_template(name), image_dir).name
        except VmhostError:
            continue
    return current


def prune(image_dir: Path) -> int:
    """Delete images that are not the current one of any template. A running vmhost
    still using one (it picks images at start) must be restarted first."""
    current = set(_current(image_dir).values())
    freed = 0
    for info in list_images(image_dir):
        if info.path.name not in current:
            freed += info.size_bytes
            shutil.rmtree(info.path)
            print(f"removed {info.path}")
    print(f"freed {freed / 2**20:.0f} MiB")
    return 0


def show(image_dir: Path) -> int:
    """Print every built image, marking the current one of each template."""
    current = _current(image_dir)
    images = list_images(image_dir)
    print(f"microVM images in {image_dir}:")
    if not images:
        print("  none (build one: bulkhead image build --template base)")
    for info in images:
        state = "current" if current.get(info.template) == info.path.name else "stale"
        languages = ",".join(sorted(info.interpreters))
        print(
            f"  {info.template:<18} {state:<8} {info.size_bytes / 2**20:6.0f} MiB  "
            f"{info.built_at}  kernel {info.kernel_release}  [{languages}]  {info.path}"
        )
    missing = [n for n in current if not any(i.path.name == current[n] for i in images)]
    if missing:
        print(f"  not built (current version): {', '.join(missing)}")
    return 0
