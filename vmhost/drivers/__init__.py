"""Sandbox drivers. ``select_driver`` picks the one the settings ask for; ``select_drivers``
builds every driver that works here, by isolation (namespace: bwrap, microvm: qemu)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator, Mapping

from vmhost.drivers.base import Driver, Probe, RunResult, RunSink, RunSpec
from vmhost.drivers.bwrap import BwrapDriver
from vmhost.drivers.kvm import KVM
from vmhost.drivers.qemu import QemuDriver
from vmhost.errors import ConfigError
from vmhost.settings import VmhostSettings

__all__ = [
    "Driver",
    "Drivers",
    "Probe",
    "RunResult",
    "RunSink",
    "RunSpec",
    "select_driver",
    "select_drivers",
]
log = logging.getLogger("vmhost.drivers")
ISOLATIONS = {"namespace": "bwrap", "microvm": "qemu"}


def select_driver(settings: VmhostSettings) -> Driver:
    """Build the configured driver; raise ConfigError when it cannot run here."""
    if settings.driver == "qemu" or (settings.driver == "auto" and KVM.exists()):
        qemu = QemuDriver(settings)
        probe = qemu.probe()
        if settings.driver == "qemu" and not probe.available:
            raise ConfigError(
                f"BULKHEAD_SANDBOX_DRIVER=qemu, but qemu is unavailable: {probe.reason}"
            )
        if settings.driver == "qemu" or (probe.available and qemu.kvm.usable):
            return qemu
    driver = BwrapDriver(settings)
    probe = driver.probe()
    if not probe.available:
        raise ConfigError(f"no usable sandbox driver: bwrap is unavailable: {probe.reason}")
    return driver


class Drivers(Mapping[str, Driver]):
    """The usable drivers by isolation ("namespace", "microvm"), the default one, and why
    each missing one is missing."""

    def __init__(self, drivers: dict[str, Driver], default: Driver, reasons: dict[str, str]):
        self._drivers = drivers
        self.default = default
        self.reasons = reasons  # isolation -> why its driver is unavailable
        self._started: set[str] = set()

    def __getitem__(self, isolation: str) -> Driver:
        return self._drivers[isolation]

    def __iter__(self) -> Iterator[str]:
        return iter(self._drivers)

    def __len__(self) -> int:
        return len(self._drivers)

    async def start(self) -> None:
        """Start the default driver (its warm pool fills now); the others start on first
        use, so a vmhost whose jobs never ask for a microVM spends nothing on one."""
        for isolation, driver in self._drivers.items():
            if driver is self.default:
                self._started.add(isolation)
                await driver.start()

    async def use(self, isolation: str) -> Driver:
        """The driver for ``isolation`` (started if this is its first use); KeyError if none."""
        driver = self._drivers[isolation]
        if isolation not in self._started:
            self._started.add(isolation)
            await driver.start()
        return driver

    def describe(self) -> dict[str, dict[str, object]]:
        info: dict[str, dict[str, object]] = {}
        for isolation, name in ISOLATIONS.items():
            driver = self._drivers.get(isolation)
            info[name] = {
                "isolation": isolation,
                "available": driver is not None,
                "reason": self.reasons.get(isolation),
                "default": driver is self.default,
            }
        return info

    async def close(self) -> None:
        await asyncio.gather(*(d.close() for d in self._drivers.values()))


def select_drivers(settings: VmhostSettings) -> Drivers:
    """Every driver whose probe passes, and the default: BULKHEAD_SANDBOX_DRIVER=bwrap|qemu
    that one (ConfigError if it cannot run here); auto: qemu only with usable KVM (TCG is
    no security boundary), else bwrap, else qemu under TCG as the last resort."""
    built: dict[str, Driver] = {"namespace": BwrapDriver(settings), "microvm": QemuDriver(settings)}
    drivers: dict[str, Driver] = {}
    reasons: dict[str, str] = {}
    for isolation, driver in built.items():
        probe = driver.probe()
        if probe.available:
            drivers[isolation] = driver
        else:
            reasons[isolation] = f"{driver.name}: {probe.reason}"
    wanted = {"bwrap": "namespace", "qemu": "microvm"}.get(settings.driver)
    if wanted is not None:
        if wanted not in drivers:
            raise ConfigError(
                f"BULKHEAD_SANDBOX_DRIVER={settings.driver}, but it is unavailable: "
                f"{reasons[wanted]}"
            )
        return Drivers(drivers, drivers[wanted], reasons)
    qemu = drivers.get("microvm")
    if isinstance(qemu, QemuDriver) and qemu.kvm.usable:
        return Drivers(drivers, qemu, reasons)
    if "namespace" in drivers:
        return Drivers(drivers, drivers["namespace"], reasons)
    if qemu is not None:
        log.warning("no bwrap here: the default driver is qemu under TCG (not a boundary)")
        return Drivers(drivers, qemu, reasons)
    raise ConfigError(f"no usable sandbox driver: {'; '.join(reasons.values())}")
