"""Sandbox drivers. ``select_driver`` picks and starts the one the settings ask for."""

from __future__ import annotations

from vmhost.drivers.base import Driver, Probe, RunResult, RunSink, RunSpec
from vmhost.drivers.bwrap import BwrapDriver
from vmhost.errors import ConfigError
from vmhost.settings import VmhostSettings

__all__ = ["Driver", "Probe", "RunResult", "RunSink", "RunSpec", "select_driver"]


def select_driver(settings: VmhostSettings) -> Driver:
    """Build the configured driver; raise ConfigError when it cannot run here."""
    if settings.driver == "qemu":
        raise ConfigError(
            "BULKHEAD_SANDBOX_DRIVER=qemu: the qemu microVM driver is not built yet in this "
            "version; use bwrap (or auto)"
        )
    driver = BwrapDriver(settings)
    probe = driver.probe()
    if not probe.available:
        raise ConfigError(f"no usable sandbox driver: bwrap is unavailable: {probe.reason}")
    return driver
