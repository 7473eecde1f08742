"""The driver interface every sandbox backend implements, and the run data it works on."""

from __future__ import annotations

import asyncio
import time
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

from vmhost.errors import RunError, SandboxError
from vmhost.guest.channel import GuestChannel

LANGUAGES = ("python", "bash", "javascript")
TERMINATION_REASONS = ("exit", "timeout", "oom", "output_limit", "canceled", "internal_error")


@dataclass(frozen=True)
class FileSpec:
    path: str  # relative to the sandbox home (/home/user), already normalized
    content: bytes


@dataclass(frozen=True)
class RunSpec:
    run_id: str
    language: str | None
    code: str | None
    command: tuple[str, ...] | None
    stdin: bytes | None
    env: dict[str, str]
    files: tuple[FileSpec, ...]
    timeout_s: float
    vcpus: int
    memory_mb: int
    network: bool
    template: str
    max_output_bytes: int
    isolation: str = "namespace"  # namespace (bwrap) | microvm (qemu)


@dataclass(frozen=True)
class SandboxSpec:
    """A sandbox held open for commands, files and code (the run-many counterpart of RunSpec)."""

    sandbox_id: str
    template: str
    env: dict[str, str]
    vcpus: int
    memory_mb: int
    network: bool
    lifetime_s: float  # the hard ceiling; the control plane ends it earlier
    isolation: str = "namespace"  # namespace (bwrap) | microvm (qemu)


@dataclass
class OpenSandbox:
    """What a driver hands over for a held-open sandbox: a live agent and how to end it.

    ``env`` is the base environment of processes in the sandbox; ``interpreters`` maps a
    code-interpreter language to the argv prefix that starts its kernel (absent when the
    template has no such runtime).
    """

    channel: GuestChannel
    driver: str
    env: dict[str, str]
    home: str
    interpreters: dict[str, list[str]]
    kill: Callable[[], None]
    cleanup: Callable[[], Awaitable[None]]
    alive: Callable[[], bool]
    oom_killed: Callable[[], bool]


@dataclass(frozen=True)
class Probe:
    available: bool
    reason: str | None = None


@dataclass
class Outcome:
    """What a driver's execution produced; the base class adds timing and identity."""

    termination_reason: str
    exit_code: int | None = None
    signal: int | None = None
    stdout: str = ""
    stderr: str = ""
    stdout_truncated: bool = False
    stderr_truncated: bool = False
    error: dict[str, str] | None = field(default=None)


@dataclass
class RunResult:
    """An outcome with the run's identity and timing: the final line of the run's stream."""

    run_id: str
    driver: str
    started_at: datetime
    finished_at: datetime
    duration_ms: int
    outcome: Outcome

    def to_dict(self) -> dict[str, Any]:
        return {
            "type": "result",
            "run_id": self.run_id,
            **asdict(self.outcome),
            "started_at": isoformat(self.started_at),
            "finished_at": isoformat(self.finished_at),
            "duration_ms": self.duration_ms,
            "driver": self.driver,
        }


class RunSink(Protocol):
    """Receives a run's events as they happen (the HTTP layer streams them)."""

    async def started(self, started_at: datetime) -> None: ...

    async def output(self, stream: str, text: str) -> None: ...


def utcnow() -> datetime:
    return datetime.now(UTC)


def isoformat(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class Driver(ABC):
    """A sandbox backend. Subclasses implement ``probe``, ``languages`` and ``execute``."""

    name: str = "abstract"
    cgroups: str = "none"

    def __init__(self) -> None:
        self._cancels: dict[str, asyncio.Event] = {}

    @abstractmethod
    def probe(self) -> Probe:
        """Whether this backend can run sandboxes on this machine (checked once)."""

    @abstractmethod
    def languages(self) -> dict[str, bool]:
        """Which of LANGUAGES have an interpreter available."""

    @abstractmethod
    async def execute(self, spec: RunSpec, sink: RunSink, cancel: asyncio.Event) -> Outcome:
        """Run one job to its end. Must kill and clean up everything it started on every
        path, including cancellation of the calling task. Raises RunError for runs that
        cannot be carried out."""

    async def open(self, spec: SandboxSpec) -> OpenSandbox:
        """Start a sandbox that stays up for many commands until ``cleanup`` is awaited."""
        raise SandboxError(f"the {self.name} driver cannot hold sandboxes open")

    def warm_ready(self) -> int:
        """Prestarted sandboxes waiting for a run (0 for drivers without a pool)."""
        return 0

    async def start(self) -> None:
        """Called once the event loop runs (e.g. to begin filling a warm pool)."""
        return None

    async def close(self) -> None:
        """Kill every active run and release what the driver holds."""
        for event in self._cancels.values():
            event.set()

    @property
    def active_runs(self) -> int:
        return len(self._cancels)

    def kill(self, run_id: str) -> bool:
        """Cancel an active run; its result reports termination_reason "canceled"."""
        event = self._cancels.get(run_id)
        if event is None:
            return False
        event.set()
        return True

    async def run(
        self, spec: RunSpec, sink: RunSink, cancel: asyncio.Event | None = None
    ) -> RunResult:
        cancel = cancel if cancel is not None else asyncio.Event()
        self._cancels[spec.run_id] = cancel
        started_at = utcnow()
        clock = time.monotonic()
        try:
            await sink.started(started_at)
            try:
                outcome = await self.execute(spec, sink, cancel)
            except RunError as exc:
                outcome = Outcome(termination_reason="internal_error", error=exc.to_dict())
        finally:
            self._cancels.pop(spec.run_id, None)
        return RunResult(
            run_id=spec.run_id,
            driver=self.name,
            started_at=started_at,
            finished_at=utcnow(),
            duration_ms=int((time.monotonic() - clock) * 1000),
            outcome=outcome,
        )
