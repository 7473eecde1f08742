"""Many concurrent conversations with one guest agent: a frame demultiplexer.

A held-open sandbox runs several processes at once and serves file requests while they
run. ``GuestSession`` owns the channel's only reader: one task reads every frame and routes
it by ``id`` to the waiting request (``ok``/``error``) or to the exec's event queue
(``started``, ``stdout``, ``stderr``, ``exit``). When the agent goes away every waiter gets
a ProtocolError, so nothing hangs on a dead sandbox.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Mapping
from typing import Any

from vmhost.errors import ProtocolError
from vmhost.guest.channel import GuestChannel
from vmhost.guest.protocol import b64encode

Frame = dict[str, Any]


class Exec:
    """One process started through the session: its frames arrive on ``events``."""

    def __init__(self, session: GuestSession, exec_id: str) -> None:
        self.session = session
        self.id = exec_id
        self.events: asyncio.Queue[Frame | ProtocolError] = asyncio.Queue()
        self.started = False

    async def next(self) -> Frame:
        item = await self.events.get()
        if isinstance(item, ProtocolError):
            raise item
        return item

    async def stdin(self, data: bytes | None, eof: bool) -> None:
        payload = b64encode(data) if data else None
        await self.session.send({"type": "stdin", "id": self.id, "data": payload, "eof": eof})

    async def signal(self, signum: int) -> None:
        await self.session.request({"type": "signal", "id": self.id, "signal": signum})


class GuestSession:
    def __init__(self, channel: GuestChannel) -> None:
        self.channel = channel
        self._requests: dict[str, asyncio.Future[Frame]] = {}
        self._execs: dict[str, Exec] = {}
        self._reader: asyncio.Task[None] | None = None
        self._failure: ProtocolError | None = None
        self._send_lock = asyncio.Lock()

    def start(self) -> None:
        self._reader = asyncio.ensure_future(self._read_loop())

    @property
    def failure(self) -> ProtocolError | None:
        return self._failure

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._reader
        self._fail(ProtocolError("the sandbox was closed", "sandbox_closed"))
        self.channel.close()

    async def send(self, frame: Mapping[str, Any]) -> None:
        if self._failure is not None:
            raise self._failure
        async with self._send_lock:
            await self.channel.send(frame)

    async def request(self, frame: Mapping[str, Any]) -> Frame:
        """Send a request and wait for its ``ok``; an ``error`` reply raises GuestRequestError.

        Requests about an exec (``signal``) carry that exec's id; their reply is told apart
        from the exec's own frames by type (``ok``/``error``).
        """
        return await (await self.submit(frame))

    async def submit(self, frame: Mapping[str, Any]) -> asyncio.Future[Frame]:
        """Send a request now; the returned awaitable gives its reply (as ``request`` does).

        Requests are sent in call order and the agent answers them in order, so a caller can
        keep several in flight (pipelined chunks of one file) and await them in turn.
        """
        if "id" in frame:
            key, message = f"{frame['id']}#reply", dict(frame)
        else:
            key = self.channel.new_id()
            message = {**frame, "id": key}
        future: asyncio.Future[Frame] = asyncio.get_running_loop().create_future()
        self._requests[key] = future
        try:
            await self.send(message)
        except BaseException:
            self._requests.pop(key, None)
            raise
        return asyncio.ensure_future(self._reply(key, future))

    async def _reply(self, key: str, future: asyncio.Future[Frame]) -> Frame:
        try:
            reply = await future
        finally:
            self._requests.pop(key, None)
        if reply["type"] == "error":
            raise GuestRequestError(reply["code"], reply["message"])
        return reply

    async def exec(self, frame: Mapping[str, Any]) -> Exec:
        """Start a process; its ``started``/output/``exit`` frames go to the returned Exec."""
        exec_id = self.channel.new_id()
        handle = Exec(self, exec_id)
        self._execs[exec_id] = handle
        try:
            await self.send({**frame, "type": "exec", "id": exec_id})
        except BaseException:
            self._execs.pop(exec_id, None)
            raise
        return handle

    # --- the reader --------------------------------------------------------------
    async def _read_loop(self) -> None:
        try:
            while True:
                self._route(await self.channel.read_frame())
        except ProtocolError as exc:
            self._fail(exc)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - any reader failure ends the session
            self._fail(ProtocolError(f"guest channel failed: {exc}", "agent_exited"))

    def _route(self, frame: Frame) -> None:
        kind, frame_id = frame["type"], frame.get("id")
        if kind in ("ok", "error"):
            key = frame_id if frame_id in self._requests else f"{frame_id}#reply"
            future = self._requests.get(key) if frame_id is not None else None
            if future is not None and not future.done():
                future.set_result(frame)
                return
            handle = self._execs.get(frame_id) if frame_id is not None else None
            if handle is not None and kind == "error" and not handle.started:
                handle.events.put_nowait(frame)  # the agent refused the exec itself
                self._execs.pop(handle.id, None)
            return  # a reply to a stdin frame (e.g. stdin already closed): nothing waits
        handle = self._execs.get(frame_id) if frame_id is not None else None
        if handle is None:
            raise ProtocolError(f"guest sent {kind!r} for unknown id {frame_id!r}")
        handle.started = handle.started or kind == "started"
        handle.events.put_nowait(frame)
        if kind == "exit":
            self._execs.pop(handle.id, None)

    def _fail(self, exc: ProtocolError) -> None:
        if self._failure is None:
            self._failure = exc
        for future in self._requests.values():
            if not future.done():
                future.set_exception(exc)
        self._requests.clear()
        for handle in self._execs.values():
            handle.events.put_nowait(exc)
        self._execs.clear()


class GuestRequestError(Exception):
    """The agent answered a request with an ``error`` frame (e.g. ``not_found``)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
