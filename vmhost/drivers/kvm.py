"""Is KVM usable here? Proven by a trial boot, because a present /dev/kvm is not enough.

On hosts that are themselves VMs without nested virtualization (e.g. a PVM host), /dev/kvm
exists and opens, but a guest dies at once ("KVM internal error … emulation failure", or
QEMU aborts setting an MSR). So the probe boots the image's kernel and initramfs with
``accel=kvm`` and ``bulkhead.probe`` on the command line, which makes the init print a
marker and power off. The result is cached per boot of the host (boot_id), QEMU version,
image and user, in a small JSON file.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path

from vmhost.drivers.microvm import Credentials
from vmhost.images import ImageInfo

log = logging.getLogger("vmhost.kvm")
MARKER = "BULKHEAD-PROBE-OK"
TRIAL_TIMEOUT_S = 20.0
KVM = Path("/dev/kvm")
_PROBED: dict[str, KvmStatus] = {}  # this process's results, by the cache key


@dataclass(frozen=True)
class KvmStatus:
    usable: bool
    reason: str  # why not, or how it was proven
    boot_ms: int | None = None


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return "unknown"


def kvm_group() -> int | None:
    """/dev/kvm's group when the group may use it (Debian: root:kvm 0660), else None."""
    try:
        st = os.stat(KVM)
    except OSError:
        return None
    return st.st_gid if st.st_gid != 0 and st.st_mode & 0o060 == 0o060 else None


def kvm_accessible(creds: Credentials) -> bool:
    """Whether QEMU running with ``creds`` can open /dev/kvm read-write."""
    if creds.uid is None:
        return os.access(KVM, os.R_OK | os.W_OK)
    try:
        st = os.stat(KVM)
    except OSError:
        return False
    if st.st_uid == creds.uid:
        return st.st_mode & 0o600 == 0o600
    if st.st_gid == creds.gid or st.st_gid in creds.groups:
        return st.st_mode & 0o060 == 0o060
    return st.st_mode & 0o006 == 0o006


def trial_boot(qemu: str, image: ImageInfo, creds: Credentials) -> KvmStatus:
    args = [
        qemu, "-M", "microvm,accel=kvm", "-cpu", "host", "-m", "128", "-smp", "1",
        "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
        "-kernel", str(image.kernel), "-initrd", str(image.initrd),
        "-append", "console=ttyS0 quiet reboot=t panic=-1 pci=off bulkhead.probe",
        "-serial", "stdio",
    ]  # fmt: skip
    started = os.times().elapsed
    try:
        done = subprocess.run(
            args,
            capture_output=True,
            timeout=TRIAL_TIMEOUT_S,
            preexec_fn=creds.preexec,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return KvmStatus(False, f"a KVM trial boot did not finish within {TRIAL_TIMEOUT_S:.0f} s")
    elapsed = int((os.times().elapsed - started) * 1000)
    output = (done.stdout + done.stderr).decode(errors="replace")
    if MARKER in output:
        return KvmStatus(
            True, f"trial boot with accel=kvm reached userspace in {elapsed} ms", elapsed
        )
    lines = [line for line in output.strip().splitlines() if line.strip()]
    detail = " | ".join(lines[-3:]) or f"qemu exited with {done.returncode}"
    return KvmStatus(False, f"/dev/kvm is present but a trial boot failed: {detail}")


def probe_kvm(
    qemu: str | None, image: ImageInfo | None, creds: Credentials, cache: Path | None
) -> KvmStatus:
    """Whether this host can run microVMs with KVM (cached; cheap after the first call)."""
    if not KVM.exists():
        return KvmStatus(False, "no /dev/kvm (this machine exposes no hardware virtualization)")
    if qemu is None:
        return KvmStatus(False, "qemu-system-x86_64 is not installed")
    if image is None:
        return KvmStatus(False, "/dev/kvm exists, but no image is built to trial-boot with")
    key = {
        "boot_id": _boot_id(),
        "qemu": os.path.realpath(qemu),
        "qemu_mtime": os.stat(qemu).st_mtime,
        "image": image.key,
        "uid": creds.uid,
    }
    remembered = _PROBED.get(json.dumps(key, sort_keys=True))
    if remembered is not None:
        return remembered
    if cache is not None:
        try:
            cached = json.loads(cache.read_text())
            if cached.get("key") == key:
                return KvmStatus(**cached["status"])
        except (OSError, ValueError, TypeError):
            pass
    status = _PROBED[json.dumps(key, sort_keys=True)] = trial_boot(qemu, image, creds)
    if cache is not None:
        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
            cache.write_text(json.dumps({"key": key, "status": asdict(status)}))
        except OSError:
            log.debug("cannot cache the KVM probe in %s", cache, exc_info=True)
    return status
