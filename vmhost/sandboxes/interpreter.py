"""Code-interpreter contexts: a kernel process per context, cells run one at a time.

A context is ``vmhost/guest/kernel.py`` (or ``kernel.js``) started through the guest agent
with its stdin held open; cells go in as JSON lines and events come back as JSON lines on
the kernel's stdout (``vmhost/guest/KERNEL.md``). State lives in the kernel process, so it
persists between cells. A cell that outlives its timeout is interrupted with SIGINT (the
kernel turns that into KeyboardInterrupt and keeps its state); a kernel that does not come
back within ``INTERRUPT_GRACE_S`` is restarted and the cell reports that the state was lost.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import signal
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from vmhost.drivers.base import OpenSandbox
from vmhost.errors import InvalidRequest, NotFound, ProtocolError, SandboxError
from vmhost.guest.protocol import b64decode
from vmhost.guest.session import Exec, GuestSession

Event = dict[str, Any]
READY_TIMEOUT_S = 60.0
INTERRUPT_GRACE_S = 5.0
MAX_LINE = 64 * 1024 * 1024
MAX_CONTEXTS = 16


@dataclass
class Context:
    id: str
    language: str
    cwd: str
    exec: Exec | None = None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    events: asyncio.Queue[Event] = field(default_factory=asyncio.Queue)
    reader: asyncio.Task[None] | None = None
    stderr: bytearray = field(default_factory=bytearray)

    def describe(self) -> dict[str, Any]:
        return {"id": self.id, "language": self.language, "cwd": self.cwd}


class Interpreter:
    """The contexts of one sandbox."""

    def __init__(self, session: GuestSession, opened: OpenSandbox) -> None:
        self.session = session
        self.opened = opened
        self.contexts: dict[str, Context] = {}
        self.defaults: dict[str, str] = {}  # language -> id of its default context

    def languages(self) -> list[str]:
        return sorted(self.opened.interpreters)

    async def create(self, language: str, cwd: str | None) -> Context:
        if language not in self.opened.interpreters:
            raise InvalidRequest(
                f"no {language!r} runtime in this sandbox's template "
                f"(available: {', '.join(self.languages()) or 'none'})",
                "language_unavailable",
            )
        if len(self.contexts) >= MAX_CONTEXTS:
            raise InvalidRequest(f"at most {MAX_CONTEXTS} contexts per sandbox", "too_many")
        context = Context(id=secrets.token_hex(8), language=language, cwd=cwd or self.opened.home)
        await self._start(context)
        self.contexts[context.id] = context
        return context

    def get(self, context_id: str) -> Context:
        context = self.contexts.get(context_id)
        if context is None:
            raise NotFound(f"no context {context_id!r} in this sandbox")
        return context

    async def default(self, language: str) -> Context:
        context_id = self.defaults.get(language)
        if context_id in self.contexts:
            return self.contexts[context_id]
        context = await self.create(language, None)
        self.defaults[language] = context.id
        return context

    async def delete(self, context_id: str) -> None:
        context = self.get(context_id)
        del self.contexts[context_id]
        await self._stop(context)

    async def restart(self, context_id: str) -> Context:
        context = self.get(context_id)
        async with context.lock:
            await self._stop(context)
            await self._start(context)
        return context

    async def run(self, context: Context, code: str, timeout_s: float) -> AsyncIterator[Event]:
        """Run one cell; yields the kernel's events, always ending with ``end``."""
        async with context.lock:
            if context.exec is None:
                await self._start(context)
            assert context.exec is not None
            cell_id = secrets.token_hex(6)
            line = json.dumps({"id": cell_id, "code": code}) + "\n"
            await context.exec.stdin(line.encode(), eof=False)
            loop = asyncio.get_running_loop()
            deadline = loop.time() + timeout_s
            interrupted = False
            while True:
                remaining = deadline - loop.time()
                if interrupted:
                    remaining += INTERRUPT_GRACE_S
                try:
                    event = await asyncio.wait_for(context.events.get(), max(remaining, 0.01))
                except TimeoutError:
                    if not interrupted:
                        interrupted = True
                        await self._signal(context, signal.SIGINT)
                        continue
                    await self._stop(context)  # the kernel ignores interrupts: start over
                    yield _error(
                        "ContextRestarted",
                        f"the cell ran past its {timeout_s:g} s timeout and did not stop on "
                        "interrupt; the context was restarted and its state is lost",
                    )
                    yield {"type": "end", "execution_count": None}
                    return
                if event["type"] == "kernel_exit":
                    context.exec = None
                    yield _error("KernelDied", event["message"])
                    yield {"type": "end", "execution_count": None}
                    return
                if event.get("id") not in (cell_id, None):
                    continue  # a late event of an earlier, abandoned cell
                event.pop("id", None)
                if interrupted and event["type"] == "error":
                    event["value"] = f"{event.get('value', '')} (cell timeout {timeout_s:g} s)"
                yield event
                if event["type"] == "end":
                    return

    async def _signal(self, context: Context, signum: int) -> None:
        if context.exec is not None:
            try:
                await context.exec.signal(signum)
            except Exception:  # noqa: BLE001 - the kernel may be gone already
                pass

    async def _start(self, context: Context) -> None:
        argv = [*self.opened.interpreters[context.language]]
        context.events = asyncio.Queue()
        context.stderr = bytearray()
        handle = await self.session.exec(
            {
                "argv": argv,
                "cwd": context.cwd,
                "env": dict(self.opened.env),
                "stdin": None,
                "stdin_open": True,
                "max_output_bytes": None,
            }
        )
        context.exec = handle
        context.reader = asyncio.ensure_future(self._read(context, handle))
        try:
            event = await asyncio.wait_for(context.events.get(), READY_TIMEOUT_S)
        except TimeoutError:
            await self._stop(context)
            raise SandboxError(f"the {context.language} kernel did not start") from None
        if event["type"] != "ready":
            await self._stop(context)
            detail = event.get("message") or context.stderr.decode(errors="replace")[-2000:]
            raise SandboxError(f"the {context.language} kernel failed to start: {detail}")

    async def _stop(self, context: Context) -> None:
        handle, context.exec = context.exec, None
        if handle is not None:
            try:
                await handle.signal(signal.SIGKILL)
            except Exception:  # noqa: BLE001 - already gone
                pass
        if context.reader is not None:
            try:
                await asyncio.wait_for(asyncio.shield(context.reader), 5.0)
            except (TimeoutError, asyncio.CancelledError):
                context.reader.cancel()
            context.reader = None

    async def _read(self, context: Context, handle: Exec) -> None:
        """Turn the kernel's stdout frames into events on the context's queue."""
        buffer = bytearray()
        message = "the kernel exited"
        try:
            while True:
                frame = await handle.next()
                kind = frame["type"]
                if kind == "stdout":
                    buffer += b64decode(frame["data"])
                    while (newline := buffer.find(b"\n")) >= 0:
                        raw, buffer = bytes(buffer[:newline]), buffer[newline + 1 :]
                        context.events.put_nowait(_parse(raw))
                    if len(buffer) > MAX_LINE:
                        raise ProtocolError("the kernel sent an overlong line")
                elif kind == "stderr":
                    context.stderr += b64decode(frame["data"])
                    del context.stderr[:-8192]
                elif kind == "exit":
                    code, sig = frame["exit_code"], frame["signal"]
                    message = f"the kernel exited (code {code}, signal {sig})"
                    if self.opened.oom_killed():
                        message = "the kernel was killed: the sandbox ran out of memory"
                    break
                elif kind == "error":
                    message = f"the kernel could not start: {frame['message']}"
                    break
        except ProtocolError as exc:
            message = f"the sandbox stopped: {exc.message}"
        detail = context.stderr.decode(errors="replace").strip()[-1000:]
        if detail:
            message = f"{message}: {detail}"
        context.events.put_nowait({"type": "kernel_exit", "message": message})


def _parse(raw: bytes) -> Event:
    try:
        event = json.loads(raw)
    except ValueError:
        return {"type": "stdout", "text": raw.decode(errors="replace") + "\n"}
    if not isinstance(event, dict) or not isinstance(event.get("type"), str):
        return {"type": "stdout", "text": raw.decode(errors="replace") + "\n"}
    return event


def _error(name: str, value: str) -> Event:
    return {"type": "error", "name": name, "value": value, "traceback": []}
