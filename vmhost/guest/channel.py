"""An async, driver-agnostic connection to one guest agent over a byte stream."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

from vmhost.errors import ProtocolError
from vmhost.guest import protocol


class GuestChannel:
    """Reads validated frames from the guest and writes requests to it."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self._next_id = 0
        self.hello: dict[str, Any] | None = None

    def new_id(self) -> str:
        self._next_id += 1
        return str(self._next_id)

    async def read_frame(self) -> dict[str, Any]:
        try:
            header = await self._reader.readexactly(protocol.HEADER.size)
            payload = await self._reader.readexactly(protocol.frame_length(header))
        except asyncio.IncompleteReadError as exc:
            raise ProtocolError("the guest agent exited unexpectedly", "agent_exited") from exc
        return protocol.decode_frame(payload)

    async def handshake(self) -> dict[str, Any]:
        frame = await self.read_frame()
        if frame["type"] != "hello":
            raise ProtocolError(f"guest sent {frame['type']!r} before hello")
        self.hello = frame
        return frame

    async def send(self, frame: Mapping[str, Any]) -> None:
        try:
            self._writer.write(protocol.encode_frame(frame))
            await self._writer.drain()
        except (ConnectionError, RuntimeError) as exc:
            raise ProtocolError("the guest agent stopped reading", "agent_exited") from exc

    def close(self) -> None:
        if not self._writer.is_closing():
            self._writer.close()
