"""``bulkhead doctor``: which sandbox drivers work on this host, and why not.

Prints the bwrap probe, cgroup mode and controllers, the QEMU binary and version, the KVM
trial-boot result (and so whether microVMs are a security boundary here or only TCG), the
microVM images built per template, what ``BULKHEAD_SANDBOX_DRIVER=auto`` would pick, and
the interpreters. It only reports: the exit status is 0 whatever it finds.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

from vmhost.drivers.bwrap import BwrapDriver
from vmhost.drivers.kvm import KVM
from vmhost.drivers.qemu import QemuDriver
from vmhost.errors import VmhostError
from vmhost.images.builder import find_image, image_path, list_images
from vmhost.images.pyenv import find_pyenv
from vmhost.settings import VmhostSettings
from vmhost.templates import list_templates, load_template


def _version(argv: list[str]) -> str | None:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    lines = (done.stdout or done.stderr).strip().splitlines()
    return lines[0] if done.returncode == 0 and lines else None


def _line(label: str, ok: bool | None, text: str) -> None:
    mark = {True: "ok ", False: "NO ", None: "-- "}[ok]
    print(f"  {mark} {label:<22} {text}")


def _kvm_device() -> str:
    if not KVM.exists():
        return "absent"
    st = KVM.stat()
    return f"present (mode {st.st_mode & 0o777:04o}, uid {st.st_uid}, gid {st.st_gid})"


def _interpreters() -> None:
    print("interpreters (bwrap sandboxes use the host's):")
    python = _version(["/usr/bin/python3", "--version"])
    _line("python3", python is not None, python or "missing: apt-get install python3")
    node = shutil.which("node") or shutil.which("nodejs")
    node_version = _version([node, "--version"]) if node else None
    _line("node", node_version is not None, f"{node} {node_version}" if node else "missing")
    _line("vmhost python", True, f"{sys.executable} ({sys.version.split()[0]})")


def _images(settings: VmhostSettings) -> None:
    print(f"microVM images ({settings.image_dir}):")
    for name in list_templates():
        try:
            info = find_image(load_template(name), settings.image_dir)
        except VmhostError as exc:
            _line(name, False, exc.message)
            continue
        if info is None:
            _line(name, False, f"not built: bulkhead image build --template {name}")
        else:
            languages = ", ".join(sorted(info.interpreters))
            size = info.size_bytes / 2**20
            _line(name, True, f"{info.path} ({size:.0f} MiB, {languages}, {info.built_at})")
    current = set()
    for name in list_templates():
        try:
            current.add(image_path(load_template(name), settings.image_dir))
        except VmhostError:
            continue
    stale = [i for i in list_images(settings.image_dir) if i.path not in current]
    if stale:
        _line("stale images", None, f"{len(stale)} older builds (bulkhead image list)")
    print("bwrap template environments (pip packages, mounted read-only):")
    for name in list_templates():
        template = load_template(name)
        if not template.has_pip_env:
            _line(name, True, "no pip packages: the host's /usr is enough")
            continue
        pyenv = find_pyenv(template, settings.image_dir)
        if pyenv is None:
            _line(name, False, f"not built: bulkhead image build --template {name} --for bwrap")
        else:
            _line(name, True, str(pyenv))


def report(settings: VmhostSettings) -> None:
    print("bulkhead doctor: sandbox drivers on this host")
    print("bwrap (isolation: namespace):")
    bwrap = BwrapDriver(settings)
    probe = bwrap.probe()
    _line("bwrap", probe.available, "works" if probe.available else str(probe.reason))
    if bwrap.cgroup_setup is not None:
        cg = bwrap.cgroup_setup
        controllers = ", ".join(sorted(cg.parents)) or "none"
        detail = f"mode {cg.mode}, controllers: {controllers}"
        _line("cgroups", cg.mode != "none", detail + (f" ({cg.reason})" if cg.reason else ""))
    else:
        _line("cgroups", None, "not checked (bwrap unavailable)")
    asyncio.run(bwrap.close())

    print("qemu (isolation: microvm):")
    qemu = QemuDriver(settings)
    _line("qemu binary", qemu.qemu is not None, f"{qemu.qemu} ({qemu.qemu_version})")
    _line("/dev/kvm", KVM.exists(), _kvm_device())
    _line("KVM trial boot", qemu.kvm.usable, qemu.kvm.reason)
    qprobe = qemu.probe()
    if qprobe.available:
        boundary = "KVM" if qemu.accel == "kvm" else "TCG: development and CI only, NOT a boundary"
        _line("qemu driver", True, f"works, accel {qemu.accel} ({boundary})")
        user = "root" if qemu.creds.uid is None else f"uid {qemu.creds.uid}"
        _line("qemu process", True, f"runs as {user}, seccomp {'on' if qemu.seccomp else 'off'}")
    else:
        _line("qemu driver", False, str(qprobe.reason))
    _images(settings)
    _interpreters()

    print("driver choice:")
    if qprobe.available and qemu.kvm.usable:
        auto = "qemu (KVM works)"
    elif probe.available:
        auto = "bwrap" + (" (qemu needs KVM to be the default)" if qprobe.available else "")
    else:
        auto = "qemu under TCG" if qprobe.available else "nothing: no driver works"
    _line("configured", None, f"BULKHEAD_SANDBOX_DRIVER={settings.driver}")
    _line("auto would pick", None, auto)


def main(env: Mapping[str, str] | None = None) -> int:
    env = dict(os.environ if env is None else env)
    env.setdefault("BULKHEAD_VMHOST_TOKEN", "doctor")  # not serving: any token parses
    try:
        settings = VmhostSettings.from_env(env)
    except VmhostError as exc:
        print(f"bulkhead doctor: configuration error: {exc.message}")
        return 0
    if os.geteuid() != 0:
        print("note: not root; the vmhost runs sandboxes as root (results may differ)")
    Path(settings.work_dir).mkdir(parents=True, exist_ok=True)
    report(settings)
    return 0
