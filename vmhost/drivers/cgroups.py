"""Per-run cgroups (v2, or the v1 memory/pids/cpu hierarchies) for the bwrap driver.

Detection happens once at startup. A run's cgroup is created before the sandbox is spawned;
the spawned process writes its own pid into every ``cgroup.procs`` file before it execs (so
nothing it forks escapes), and the cgroup is killed and removed when the run ends.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import signal
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("vmhost.cgroups")

RUNS_DIR = "bulkhead-runs"
CFS_PERIOD_US = 100_000
V1_CONTROLLERS = ("memory", "pids", "cpu")


def _write(path: Path, value: str) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.write(fd, value.encode())
    finally:
        os.close(fd)


def _read_counter(path: Path, key: str) -> int:
    try:
        for line in path.read_text().splitlines():
            name, _, value = line.partition(" ")
            if name == key:
                return int(value)
    except (OSError, ValueError):
        pass
    return 0


def _self_cgroups() -> dict[str, str]:
    """controller name (or "" for the v2 unified entry) -> our cgroup path."""
    result: dict[str, str] = {}
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _hier, controllers, path = line.split(":", 2)
        for controller in controllers.split(",") if controllers else [""]:
            result[controller] = path
    return result


def _mounts() -> list[tuple[str, str, list[str]]]:
    mounts = []
    for line in Path("/proc/self/mounts").read_text().splitlines():
        parts = line.split()
        if len(parts) >= 4 and parts[2] in ("cgroup", "cgroup2"):
            mounts.append((parts[1], parts[2], parts[3].split(",")))
    return mounts


@dataclass
class RunCgroup:
    """The cgroup directories of one run (one per v1 hierarchy, or one for v2)."""

    mode: str
    dirs: list[Path]
    memory_dir: Path

    def procs_files(self) -> list[str]:
        return [str(d / "cgroup.procs") for d in self.dirs]

    def oom_killed(self) -> bool:
        if self.mode == "v2":
            return _read_counter(self.memory_dir / "memory.events", "oom_kill") > 0
        return _read_counter(self.memory_dir / "memory.oom_control", "oom_kill") > 0

    def pids(self) -> set[int]:
        found: set[int] = set()
        for directory in self.dirs:
            try:
                found.update(int(p) for p in (directory / "cgroup.procs").read_text().split())
            except (OSError, ValueError):
                continue
        return found

    def kill_all(self) -> None:
        if self.mode == "v2" and (self.memory_dir / "cgroup.kill").exists():
            try:
                _write(self.memory_dir / "cgroup.kill", "1")
            except OSError:
                pass
        for pid in self.pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass

    async def remove(self, timeout_s: float = 10.0) -> None:
        """Kill what is left and rmdir every directory (retrying while tasks exit)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        pending = list(self.dirs)
        while pending:
            self.kill_all()
            for directory in list(pending):
                try:
                    directory.rmdir()
                    pending.remove(directory)
                except FileNotFoundError:
                    pending.remove(directory)
                except OSError as exc:
                    if exc.errno not in (errno.EBUSY, errno.ENOTEMPTY):
                        raise
            if pending:
                if loop.time() > deadline:
                    log.warning("could not remove cgroups %s: tasks remain", pending)
                    return
                await asyncio.sleep(0.005)


class Cgroups:
    """Finds a usable cgroup setup once and creates per-run cgroups in it."""

    def __init__(self) -> None:
        self.mode = "none"
        self.reason: str | None = None
        self.parents: dict[str, Path] = {}  # controller -> directory holding run cgroups
        self.cpu = False
        try:
            if not self._setup_v2():
                self._setup_v1()
        except OSError as exc:
            self.mode, self.reason, self.parents = "none", f"cgroup setup failed: {exc}", {}
        if self.mode == "none":
            log.warning(
                "no usable cgroups (%s): sandboxes run with rlimits only; memory, pids and "
                "cpu limits are NOT enforced by cgroups",
                self.reason,
            )
        elif not self.cpu:
            log.warning("cgroup cpu controller unavailable: vcpus limits are not enforced")

    def _setup_v2(self) -> bool:
        ours = _self_cgroups().get("")
        mount = next((m for m, kind, _ in _mounts() if kind == "cgroup2"), None)
        if ours is None or mount is None:
            return False
        base = Path(mount) / ours.lstrip("/")
        available = set((base / "cgroup.controllers").read_text().split())
        if not {"memory", "pids"} <= available:
            self.reason = f"cgroup v2 at {base} lacks the memory/pids controllers"
            return False
        wanted = [c for c in ("memory", "pids", "cpu") if c in available]
        enable = " ".join("+" + c for c in wanted)
        enabled = set((base / "cgroup.subtree_control").read_text().split())
        if not set(wanted) <= enabled:
            try:
                _write(base / "cgroup.subtree_control", enable)
            except OSError as exc:
                if exc.errno != errno.EBUSY:
                    raise
                # "No internal processes": move ourselves into a leaf, then enable.
                leaf = base / "bulkhead-vmhost"
                leaf.mkdir(exist_ok=True)
                for pid in (base / "cgroup.procs").read_text().split():
                    _write(leaf / "cgroup.procs", pid)
                _write(base / "cgroup.subtree_control", enable)
        runs = base / RUNS_DIR
        runs.mkdir(exist_ok=True)
        _write(runs / "cgroup.subtree_control", enable)
        self.mode, self.cpu = "v2", "cpu" in wanted
        self.parents = {"unified": runs}
        return True

    def _setup_v1(self) -> None:
        ours = _self_cgroups()
        for controller in V1_CONTROLLERS:
            mount = next(
                (m for m, kind, opts in _mounts() if kind == "cgroup" and controller in opts), None
            )
            if mount is None or controller not in ours:
                continue
            parent = Path(mount) / ours[controller].lstrip("/") / RUNS_DIR
            try:
                parent.mkdir(exist_ok=True)
            except OSError as exc:
                log.debug("cgroup v1 %s not writable: %s", controller, exc)
                continue
            self.parents[controller] = parent
        if "memory" in self.parents and "pids" in self.parents:
            self.mode, self.cpu = "v1", "cpu" in self.parents
        else:
            self.reason = "no writable cgroup v2 or v1 memory+pids hierarchies"
            self.parents = {}

    def run_dirs(self) -> list[Path]:
        """Existing run cgroups (used at startup cleanup and by tests)."""
        found: list[Path] = []
        for parent in self.parents.values():
            found.extend(p for p in parent.iterdir() if p.is_dir())
        return found

    def remove_stale(self) -> None:
        """rmdir leftover empty run cgroups (non-empty ones belong to live runs)."""
        for directory in self.run_dirs():
            try:
                directory.rmdir()
            except OSError:
                pass

    def create(self, key: str, memory_mb: int, pids_max: int, vcpus: int) -> RunCgroup | None:
        if self.mode == "none":
            return None
        dirs = {name: parent / key for name, parent in self.parents.items()}
        created: list[Path] = []
        try:
            for directory in dirs.values():
                directory.mkdir()
                created.append(directory)
            return self._configure(dirs, memory_mb, pids_max, vcpus)
        except OSError:
            for directory in created:
                directory.rmdir()
            raise

    def _configure(
        self, dirs: dict[str, Path], memory_mb: int, pids_max: int, vcpus: int
    ) -> RunCgroup:
        memory = str(memory_mb * 1024 * 1024)
        group: RunCgroup
        if self.mode == "v2":
            d = dirs["unified"]
            group = RunCgroup("v2", [d], d)
            _write(d / "memory.max", memory)
            if (d / "memory.swap.max").exists():
                _write(d / "memory.swap.max", "0")
            _write(d / "pids.max", str(pids_max))
            if self.cpu:
                _write(d / "cpu.max", f"{vcpus * CFS_PERIOD_US} {CFS_PERIOD_US}")
            return group
        group = RunCgroup("v1", list(dirs.values()), dirs["memory"])
        _write(dirs["memory"] / "memory.limit_in_bytes", memory)
        try:
            _write(dirs["memory"] / "memory.memsw.limit_in_bytes", memory)
        except OSError:
            pass  # no swap accounting on this kernel
        _write(dirs["pids"] / "pids.max", str(pids_max))
        if "cpu" in dirs:
            _write(dirs["cpu"] / "cpu.cfs_period_us", str(CFS_PERIOD_US))
            _write(dirs["cpu"] / "cpu.cfs_quota_us", str(vcpus * CFS_PERIOD_US))
        return group
