"""Processes started in a held-open sandbox, with their output kept for replay.

Each command's output is a list of events (``stdout``/``stderr`` chunks, in the order the
guest sent them) numbered by ``seq``; ``follow(offset)`` replays from event ``offset`` and
then follows live until the process exits, so a client whose connection dropped reconnects
with the next ``seq`` it expects and loses nothing. The pump that reads the process's frames
belongs to the sandbox, not to any HTTP request: a client going away never stops a process.
At most ``buffer_cap`` bytes of output are kept per command; beyond that output is dropped
and the exit event says ``output_truncated``.
"""

from __future__ import annotations

import asyncio
import codecs
import signal as signals
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from vmhost.drivers.base import isoformat, utcnow
from vmhost.errors import InvalidRequest, ProtocolError
from vmhost.guest.protocol import b64decode
from vmhost.guest.session import Exec

Event = dict[str, Any]
SIGNALS = {name: int(getattr(signals, name)) for name in (
    "SIGHUP", "SIGINT", "SIGQUIT", "SIGKILL", "SIGUSR1", "SIGUSR2", "SIGTERM", "SIGCONT",
    "SIGSTOP", "SIGTSTP", "SIGWINCH",
)}  # fmt: skip


@dataclass
class Command:
    pid: int
    cmd: str
    background: bool
    exec: Exec
    buffer_cap: int
    started_at: datetime = field(default_factory=utcnow)
    events: list[Event] = field(default_factory=list)
    exit: Event | None = None
    stdin_open: bool = False
    buffered: int = 0
    truncated: bool = False
    timed_out: bool = False
    _changed: asyncio.Event = field(default_factory=asyncio.Event)
    _pump: asyncio.Task[None] | None = None
    _timer: asyncio.TimerHandle | None = None

    def start(self, timeout_s: float | None) -> None:
        self._pump = asyncio.ensure_future(self._run())
        if timeout_s:
            loop = asyncio.get_running_loop()
            self._timer = loop.call_later(timeout_s, self._timeout)

    @property
    def running(self) -> bool:
        return self.exit is None

    def describe(self) -> dict[str, Any]:
        return {
            "pid": self.pid,
            "cmd": self.cmd,
            "background": self.background,
            "running": self.running,
            "started_at": isoformat(self.started_at),
            "exit_code": self.exit["exit_code"] if self.exit else None,
            "output_events": len(self.events),
        }

    async def follow(self, offset: int = 0) -> AsyncIterator[Event]:
        """Events from ``offset`` on, then live ones, ending with the ``exit`` event."""
        index = max(offset, 0)
        while True:
            self._changed.clear()
            while index < len(self.events):
                yield self.events[index]
                index += 1
            if self.exit is not None:
                yield self.exit
                return
            await self._changed.wait()

    async def send_stdin(self, data: bytes, eof: bool) -> None:
        if not self.stdin_open or not self.running:
            raise InvalidRequest(f"process {self.pid} has no open stdin", "stdin_closed")
        await self.exec.stdin(data, eof)
        if eof:
            self.stdin_open = False

    async def signal(self, signum: int) -> None:
        if self.running:
            await self.exec.signal(signum)

    def _timeout(self) -> None:
        if self.running:
            self.timed_out = True
            asyncio.ensure_future(self._kill_quietly())

    async def _kill_quietly(self) -> None:
        try:
            await self.exec.signal(signals.SIGKILL)
        except Exception:  # noqa: BLE001 - the process or the sandbox is already gone
            pass

    async def _run(self) -> None:
        decoders = {
            s: codecs.getincrementaldecoder("utf-8")(errors="replace") for s in ("stdout", "stderr")
        }
        exit_code: int | None = None
        signum: int | None = None
        error: str | None = None
        try:
            while True:
                frame = await self.exec.next()
                kind = frame["type"]
                if kind in ("stdout", "stderr"):
                    self._add(kind, decoders[kind].decode(b64decode(frame["data"])))
                elif kind == "exit":
                    exit_code, signum = frame["exit_code"], frame["signal"]
                    break
                elif kind == "error":
                    error = f"{frame['code']}: {frame['message']}"
                    break
        except ProtocolError as exc:
            error = exc.message
        finally:
            if self._timer is not None:
                self._timer.cancel()
        for stream, decoder in decoders.items():
            self._add(stream, decoder.decode(b"", final=True))
        self.stdin_open = False
        self.exit = {
            "type": "exit",
            "pid": self.pid,
            "exit_code": exit_code,
            "signal": signum,
            "timed_out": self.timed_out,
            "output_truncated": self.truncated,
            "error": "timeout" if self.timed_out else error,
        }
        self._changed.set()

    def _add(self, stream: str, text: str) -> None:
        if not text:
            return
        size = len(text.encode())
        if self.buffered + size > self.buffer_cap:
            self.truncated = True
            return
        self.buffered += size
        self.events.append({"type": stream, "data": text, "seq": len(self.events)})
        self._changed.set()

    async def stopped(self) -> None:
        if self._pump is not None:
            await asyncio.gather(self._pump, return_exceptions=True)


def parse_signal(value: Any) -> int:
    """``"SIGTERM"``, ``"TERM"`` or a number → the signal number; ValueError otherwise."""
    if isinstance(value, bool):
        raise ValueError("signal must be a name like SIGTERM or a number")
    if isinstance(value, int):
        if value in SIGNALS.values():
            return value
        raise ValueError(f"signal {value} is not allowed")
    if isinstance(value, str):
        name = value.upper()
        name = name if name.startswith("SIG") else f"SIG{name}"
        if name in SIGNALS:
            return SIGNALS[name]
    raise ValueError(f"unknown signal {value!r}; use one of {', '.join(SIGNALS)}")
