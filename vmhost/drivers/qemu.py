"""The qemu driver: each job or sandbox in its own QEMU ``microvm``, guest agent over
virtio-serial, images from ``bulkhead image build``.

KVM is used only when a trial boot proves it works (vmhost/drivers/kvm.py); otherwise the
driver runs under TCG, software emulation, which is for development and CI and not a
security boundary. Per template (at the default memory and vCPUs) one VM is booted,
warmed up and snapshotted; jobs then start from a restore of that snapshot (the guest gets
fresh entropy and the clock through the agent's ``sync``), and a warm pool keeps restored
VMs ready. Every VM writes into its own RAM (a tmpfs overlay over the read-only rootfs), has
no network device, and is killed and reaped when its run ends, on every path.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import Any

from vmhost.drivers.base import (
    Driver,
    FileSpec,
    OpenSandbox,
    Outcome,
    Probe,
    RunSink,
    RunSpec,
    SandboxSpec,
)
from vmhost.drivers.bwrap import BASE_ENV, SOURCES
from vmhost.drivers.capture import OutputCapture
from vmhost.drivers.guest_exec import oom_kills, run_exec, write_files
from vmhost.drivers.kvm import KvmStatus, kvm_accessible, kvm_group, probe_kvm
from vmhost.drivers.microvm import (
    QEMU,
    Credentials,
    MicroVm,
    VmConfig,
    host_tsc_khz,
    launch,
    qemu_facts,
    readable_by_others,
)
from vmhost.drivers.snapshots import Snapshot, SnapshotStore
from vmhost.drivers.warm_pool import WarmPool
from vmhost.errors import (
    ConfigError,
    LanguageUnavailable,
    NetworkUnsupported,
    ProtocolError,
    RunError,
    SandboxError,
)
from vmhost.images import ImageInfo, find_image
from vmhost.settings import VmhostSettings
from vmhost.templates import list_templates, load_template

log = logging.getLogger("vmhost.qemu")

HOME = "/home/user"
GUEST = "/opt/bulkhead/guest"
VENV_BIN = "/opt/venv/bin"
PREPARE_TIMEOUT_S = 60.0  # VM start + job files, on top of the job's own timeout
OOM_CHECK_TIMEOUT_S = 5.0
POOL_REFILL_DELAY_S = 0.5
TCG_WARNING = (
    "qemu driver: no usable KVM (%s); running microVMs under TCG software emulation, "
    "which is for development and CI, not a security boundary"
)


_TCG_WARNED = False

class QemuDriver(Driver):
    name = "qemu"
    cgroups = "none"

    def __init__(self, settings: VmhostSettings, image_dir: Path | None = None) -> None:
        super().__init__()
        self.settings = settings
        self.image_dir = image_dir or settings.image_dir
        self.state_dir = settings.work_dir / "qemu"
        self.qemu = shutil.which(QEMU)
        self.qemu_version = ""
        self.images: dict[str, ImageInfo] = {}
        self.creds = Credentials()
        self.kvm = KvmStatus(False, "not probed")
        self.accel = "tcg"
        self.seccomp = False
        self.tsc_khz = host_tsc_khz()
        self.pools: dict[str, WarmPool[MicroVm]] = {}
        self.snapshots = SnapshotStore(self.state_dir / "snapshots", self.creds)
        self._vms: set[MicroVm] = set()
        self._probe = self._check()
        if self._probe.available and settings.qemu_pool_size > 0:
            for template in self.images:
                make = partial(
                    self.restore_vm, template, settings.default_memory_mb, settings.default_vcpus
                )
                self.pools[template] = WarmPool(settings.qemu_pool_size, make, self._discard)

    # --- startup -------------------------------------------------------------
    def _check(self) -> Probe:
        if self.qemu is None:
            return Probe(
                False, "qemu-system-x86_64 is not installed (apt-get install qemu-system-x86)"
            )
        self.qemu_version, self.seccomp = qemu_facts(self.qemu)
        for name in list_templates():
            try:
                image = find_image(load_template(name), self.image_dir)
            except ConfigError as exc:
                log.warning("template %s: %s", name, exc)
                continue
            if image is not None:
                self.images[name] = image
        base = self.images.get("base")
        if base is None:
            return Probe(
                False,
                f"no microVM image for template 'base' in {self.image_dir}: run "
                "`bulkhead image build --template base`",
            )
        if os.geteuid() == 0:
            if readable_by_others(base.rootfs) and readable_by_others(base.kernel):
                group = kvm_group()
                groups = (group,) if group is not None else ()
                self.creds = Credentials(
                    self.settings.sandbox_uid, self.settings.sandbox_gid, groups
                )
            else:
                log.warning(
                    "images in %s are not world-readable: qemu runs as root", self.image_dir
                )
        # KVM as the sandbox user when /dev/kvm lets it, else (only if KVM works) as root
        kvm_creds = self.creds if kvm_accessible(self.creds) else Credentials()
        self.kvm = probe_kvm(self.qemu, base, kvm_creds, self.image_dir / ".kvm-probe.json")
        self.accel = "kvm" if self.kvm.usable else "tcg"
        if self.kvm.usable and kvm_creds != self.creds:
            log.warning("/dev/kvm is not usable by uid %s: qemu runs as root", self.creds.uid)
            self.creds = kvm_creds
        if not self.kvm.usable:
            global _TCG_WARNED
            if not _TCG_WARNED:  # once per process: several drivers may be built
                log.warning(TCG_WARNING, self.kvm.reason)
                _TCG_WARNED = True
        (self.state_dir / "snapshots").mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(self.state_dir, 0o700)
        self.snapshots.creds = self.creds
        return Probe(True, None)

    def probe(self) -> Probe:
        return self._probe

    def languages(self) -> dict[str, bool]:
        base = self.images.get("base")
        found = base.interpreters if base is not None else {}
        return {language: language in found for language in ("python", "bash", "javascript")}

    def warm_ready(self) -> int:
        return sum(pool.ready for pool in self.pools.values())

    async def start(self) -> None:
        for pool in self.pools.values():
            pool.start()

    async def close(self) -> None:
        await super().close()
        for pool in self.pools.values():
            await pool.close()
        await asyncio.gather(*(vm.close() for vm in list(self._vms)), return_exceptions=True)

    # --- VMs -----------------------------------------------------------------
    def image(self, template: str) -> ImageInfo:
        image = self.images.get(template)
        if image is None:
            raise SandboxError(
                f"template {template!r} has no microVM image on this vmhost: run "
                f"`bulkhead image build --template {template}`",
                "template_not_built",
            )
        return image

    def config(self, template: str, memory_mb: int, vcpus: int) -> VmConfig:
        assert self.qemu is not None
        return VmConfig(
            self.qemu, self.image(template), self.accel, memory_mb, vcpus,
            self.tsc_khz, self.seccomp, self.qemu_version,
        )  # fmt: skip

    def env(self, image: ImageInfo, user_env: dict[str, str]) -> dict[str, str]:
        env = dict(BASE_ENV)
        if image.interpreters.get("python", "").startswith(VENV_BIN):
            env["PATH"] = f"{VENV_BIN}:{env['PATH']}"
            env.update(VIRTUAL_ENV=VENV_BIN.removesuffix("/bin"), MPLBACKEND="Agg")
            env["MPLCONFIGDIR"] = f"{HOME}/.config/matplotlib"
        return {**env, **user_env}

    def _warm_up(self, image: ImageInfo) -> list[list[str]]:
        """Commands run before the snapshot, so restored guests have them in page cache."""
        commands = [["/bin/sh", "-c", ":"]]
        python = image.interpreters.get("python")
        if python is not None:
            code = "pass"
            if python.startswith(VENV_BIN):  # also builds matplotlib's font cache
                code = "import numpy, pandas, matplotlib.pyplot"
            env = " ".join(f"{k}={v}" for k, v in self.env(image, {}).items())
            commands.append(["/bin/sh", "-c", f"env {env} {python} -c '{code}' >/dev/null 2>&1"])
        node = image.interpreters.get("javascript")
        if node is not None:
            commands.append([node, "-e", "0"])
        return commands

    def _track(self, vm: MicroVm) -> MicroVm:
        """Remember every VM until it is closed, so ``close`` can kill what is left."""
        self._vms = {v for v in self._vms if not v.closed}
        self._vms.add(vm)
        return vm

    async def snapshot(self, template: str, memory_mb: int, vcpus: int) -> Snapshot:
        """The snapshot for this template and size, taken once (and kept on disk)."""
        config = self.config(template, memory_mb, vcpus)
        return await self.snapshots.get(config, template, self._warm_up(config.image))

    async def restore_vm(self, template: str, memory_mb: int, vcpus: int) -> MicroVm:
        """A VM restored from the template's snapshot, reseeded, clock set, ready."""
        snap = await self.snapshot(template, memory_mb, vcpus)
        vm, _ = await launch(self.config(template, memory_mb, vcpus), self.creds, snap.path)
        self._track(vm)
        try:
            await vm.sync()
        except BaseException:
            await asyncio.shield(vm.close())
            raise
        vm.hello = vm.channel.hello = snap.hello
        return vm

    async def boot_vm(self, template: str, memory_mb: int, vcpus: int) -> MicroVm:
        """A freshly booted VM (no snapshot): sizes other than the default ones."""
        vm, _ = await launch(self.config(template, memory_mb, vcpus), self.creds)
        self._track(vm)
        try:
            await vm.boot()
            await vm.sync()
        except BaseException:
            await asyncio.shield(vm.close())
            raise
        return vm

    async def _vm_for(self, template: str, memory_mb: int, vcpus: int) -> MicroVm:
        pool = self.pools.get(template)
        default = (memory_mb, vcpus) == (
            self.settings.default_memory_mb,
            self.settings.default_vcpus,
        )
        if default and pool is not None:
            vm = pool.take()
            if vm is not None:
                return vm
        if default:
            return await self.restore_vm(template, memory_mb, vcpus)
        return await self.boot_vm(template, memory_mb, vcpus)

    async def _discard(self, vm: MicroVm) -> None:
        await vm.close()

    def _refill(self, template: str, delay_s: float = 0.0) -> None:
        pool = self.pools.get(template)
        if pool is not None and delay_s:
            pool.start_later(delay_s)
        elif pool is not None:
            pool.start()

    # --- held-open sandboxes -------------------------------------------------
    async def open(self, spec: SandboxSpec) -> OpenSandbox:
        if not self._probe.available:
            raise SandboxError(f"the qemu driver is unavailable: {self._probe.reason}")
        if spec.network:
            raise NetworkUnsupported(NO_NETWORK)
        image = self.image(spec.template)
        vm = await self._vm_for(spec.template, spec.memory_mb, spec.vcpus)
        self._refill(spec.template, POOL_REFILL_DELAY_S)
        interpreters: dict[str, list[str]] = {}
        if "python" in image.interpreters:
            interpreters["python"] = [image.interpreters["python"], "-u", f"{GUEST}/kernel.py"]
        if "javascript" in image.interpreters:
            interpreters["javascript"] = [image.interpreters["javascript"], f"{GUEST}/kernel.js"]

        async def cleanup() -> None:
            await asyncio.shield(vm.close())

        return OpenSandbox(
            channel=vm.channel,
            driver=self.name,
            env=self.env(image, spec.env),
            home=HOME,
            interpreters=interpreters,
            kill=vm.kill,
            cleanup=cleanup,
            alive=vm.alive,
            oom_killed=lambda: False,  # the guest's OOM killer ends processes, not the VM
        )

    # --- one run -------------------------------------------------------------
    def _command(self, spec: RunSpec, image: ImageInfo) -> tuple[list[str], list[FileSpec]]:
        if spec.command is not None:
            return list(spec.command), []
        language = spec.language or ""
        interpreter = image.interpreters.get(language)
        if interpreter is None:
            raise LanguageUnavailable(f"no {language!r} interpreter in the {spec.template} image")
        source = SOURCES[language]
        return [interpreter, source], [FileSpec(source, (spec.code or "").encode())]

    async def execute(self, spec: RunSpec, sink: RunSink, cancel: asyncio.Event) -> Outcome:
        if not self._probe.available:
            raise SandboxError(f"the qemu driver is unavailable: {self._probe.reason}")
        if spec.network:
            raise NetworkUnsupported(NO_NETWORK)
        image = self.image(spec.template)
        argv, sources = self._command(spec, image)
        held: list[MicroVm] = []
        try:
            return await self._supervise(spec, sink, cancel, image, argv, sources, held)
        finally:
            cleanup = asyncio.ensure_future(_close_all(held))
            try:
                await asyncio.shield(cleanup)
            except asyncio.CancelledError:
                await asyncio.shield(cleanup)  # cancelled twice: finish the reaping first
                raise
            finally:
                self._refill(spec.template)

    async def _race(
        self,
        work: Awaitable[Any],
        cancel: asyncio.Event,
        limit_s: float,
        on_timeout: Callable[[], None],
    ) -> tuple[asyncio.Future[Any], str | None]:
        """Run ``work`` until it ends, the run is cancelled or the timeout passes."""
        task = asyncio.ensure_future(work)
        canceled = asyncio.ensure_future(cancel.wait())
        try:
            done, _ = await asyncio.wait(
                {task, canceled}, timeout=limit_s, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            canceled.cancel()
            if not task.done():
                on_timeout()
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        if task in done:
            return task, None
        return task, "canceled" if canceled in done else "timeout"

    async def _supervise(
        self,
        spec: RunSpec,
        sink: RunSink,
        cancel: asyncio.Event,
        image: ImageInfo,
        argv: list[str],
        sources: list[FileSpec],
        held: list[MicroVm],
    ) -> Outcome:
        async def prepare() -> MicroVm:
            vm = await self._vm_for(spec.template, spec.memory_mb, spec.vcpus)
            held.append(vm)
            await write_files(vm.channel, HOME, [*spec.files, *sources])
            return vm

        def kill_all() -> None:
            for vm in held:
                vm.kill()

        task, stopped = await self._race(prepare(), cancel, PREPARE_TIMEOUT_S, kill_all)
        if stopped == "canceled":
            return Outcome(termination_reason="canceled")
        if stopped == "timeout":
            raise SandboxError(f"the microVM was not ready within {PREPARE_TIMEOUT_S:.0f} s")
        vm: MicroVm = task.result()
        capture = OutputCapture(spec.max_output_bytes)
        env = self.env(image, spec.env)
        conversation = run_exec(
            vm.channel, argv, HOME, env, spec.stdin or b"", spec.max_output_bytes, capture, sink
        )
        task, stopped = await self._race(conversation, cancel, spec.timeout_s, vm.kill)
        outcome = Outcome(termination_reason=stopped or "exit")
        if stopped is None:
            try:
                frame = task.result()
            except ProtocolError as exc:
                await vm.close()  # reaped; its console tail stays readable
                if OOM_MARK in vm.console_tail():
                    outcome.termination_reason = "oom"  # the guest ran out of memory as a whole
                else:
                    error = vm.failure("stopped answering", exc)
                    log.warning("run %s failed: %s", spec.run_id, error.message)
                    outcome.termination_reason = "internal_error"
                    outcome.error = RunError(error.message, exc.code).to_dict()
            else:
                outcome.exit_code, outcome.signal = frame["exit_code"], frame["signal"]
                if outcome.exit_code != 0 and await self._oom_killed(vm):
                    outcome.termination_reason = "oom"
        outcome.stdout, outcome.stderr = capture.stdout.text(), capture.stderr.text()
        outcome.stdout_truncated = capture.stdout.truncated
        outcome.stderr_truncated = capture.stderr.truncated
        return outcome

    @staticmethod
    async def _oom_killed(vm: MicroVm) -> bool:
        try:
            return await asyncio.wait_for(oom_kills(vm.channel), OOM_CHECK_TIMEOUT_S) > 0
        except (ProtocolError, TimeoutError):
            return False


OOM_MARK = "Out of memory"
NO_NETWORK = (
    "the qemu driver gives microVMs no network device (networking for microVMs is not "
    "implemented yet): run without network, or with isolation 'namespace'"
)


async def _close_all(vms: list[MicroVm]) -> None:
    await asyncio.gather(*(vm.close() for vm in vms), return_exceptions=True)
