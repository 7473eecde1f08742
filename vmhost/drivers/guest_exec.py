"""Driving a job through a guest agent channel: write its files, exec it with streamed
output and stdin, and ask the guest whether its OOM killer fired. Transport-agnostic (used
by the qemu driver over virtio-serial; the same frames bwrap sends over pipes)."""

from __future__ import annotations

import asyncio
import posixpath
from collections.abc import Iterable
from typing import Any

from vmhost.drivers.base import FileSpec, RunSink
from vmhost.drivers.capture import OutputCapture
from vmhost.errors import ProtocolError, SandboxError
from vmhost.guest.channel import GuestChannel
from vmhost.guest.protocol import b64decode, b64encode

INLINE_STDIN = 1024 * 1024
STDIN_CHUNK = 1024 * 1024
FILE_CHUNK = 4 * 1024 * 1024  # raw bytes per write_file frame (base64 stays far below 16 MiB)


async def _expect_ok(channel: GuestChannel, ids: list[str], what: dict[str, str]) -> None:
    for frame_id in ids:
        frame = await channel.read_frame()
        if frame.get("id") != frame_id:
            raise ProtocolError(f"guest answered {frame.get('id')!r}, expected {frame_id!r}")
        if frame["type"] == "error":
            raise SandboxError(
                f"cannot write {what[frame_id]} in the sandbox: {frame['code']}: {frame['message']}"
            )
        if frame["type"] != "ok":
            raise ProtocolError(f"guest sent {frame['type']!r} to a file request")


async def write_files(channel: GuestChannel, home: str, files: Iterable[FileSpec]) -> None:
    """Create the files (home-relative paths) through ``mkdir``/``write_file`` frames,
    pipelined: every request is sent first, then every reply is checked in order."""
    ids: list[str] = []
    what: dict[str, str] = {}
    made: set[str] = set()

    async def request(frame: dict[str, Any], label: str) -> None:
        frame_id = channel.new_id()
        await channel.send({**frame, "id": frame_id})
        ids.append(frame_id)
        what[frame_id] = label

    for spec in files:
        path = posixpath.join(home, spec.path)
        parent = posixpath.dirname(path)
        if parent != home and parent not in made:
            await request({"type": "mkdir", "path": parent, "parents": True}, parent)
            made.add(parent)
        content = spec.content
        offsets = range(0, max(len(content), 1), FILE_CHUNK)
        for index, offset in enumerate(offsets):
            chunk = b64encode(content[offset : offset + FILE_CHUNK])
            frame: dict[str, Any] = {"type": "write_file", "path": path, "data": chunk}
            if index:
                frame["append"] = True
            await request(frame, spec.path)
    await _expect_ok(channel, ids, what)


async def _feed(channel: GuestChannel, exec_id: str, data: bytes) -> None:
    for offset in range(0, len(data), STDIN_CHUNK):
        chunk = b64encode(data[offset : offset + STDIN_CHUNK])
        await channel.send({"type": "stdin", "id": exec_id, "data": chunk, "eof": False})
    await channel.send({"type": "stdin", "id": exec_id, "data": None, "eof": True})


async def run_exec(
    channel: GuestChannel,
    argv: list[str],
    cwd: str,
    env: dict[str, str],
    stdin: bytes,
    max_output_bytes: int,
    capture: OutputCapture,
    sink: RunSink,
) -> dict[str, Any]:
    """Exec one process and stream its output to ``sink``; returns its ``exit`` frame."""
    exec_id = channel.new_id()
    inline = len(stdin) <= INLINE_STDIN
    await channel.send(
        {
            "type": "exec",
            "id": exec_id,
            "argv": argv,
            "cwd": cwd,
            "env": env,
            "stdin": b64encode(stdin) if inline else None,
            "stdin_open": not inline,
            "max_output_bytes": max_output_bytes,
        }
    )
    feeder = None if inline else asyncio.ensure_future(_feed(channel, exec_id, stdin))
    started = False
    try:
        while True:
            frame = await channel.read_frame()
            kind = frame["type"]
            if kind in ("ok", "error") and started:
                continue  # replies to stdin frames after the process already ended
            if frame.get("id") != exec_id:
                raise ProtocolError(f"guest sent {kind!r} for unknown id {frame.get('id')!r}")
            if kind in ("stdout", "stderr"):
                text = capture.feed(kind, b64decode(frame["data"]))
                if text:
                    await sink.output(kind, text)
            elif kind == "started":
                started = True
            elif kind == "exit":
                return frame
            elif kind == "error":
                raise ProtocolError(f"guest refused exec: {frame['code']}: {frame['message']}")
            else:
                raise ProtocolError(f"guest sent an unexpected {kind!r} frame")
    finally:
        if feeder is not None:
            feeder.cancel()
            await asyncio.gather(feeder, return_exceptions=True)


async def oom_kills(channel: GuestChannel) -> int:
    """The guest kernel's OOM-kill count (``oom_kill`` in /proc/vmstat)."""
    frame_id = channel.new_id()
    await channel.send({"type": "read_file", "id": frame_id, "path": "/proc/vmstat"})
    while True:
        frame = await channel.read_frame()
        if frame.get("id") == frame_id:
            break  # skip late replies to stdin frames
    if frame["type"] != "ok" or "data" not in frame:
        return 0
    for line in b64decode(frame["data"]).decode(errors="replace").splitlines():
        name, _, value = line.partition(" ")
        if name == "oom_kill" and value.strip().isdigit():
            return int(value)
    return 0
