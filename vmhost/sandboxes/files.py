"""The files API of a held-open sandbox, carried out by the guest agent.

Every operation is a request to the agent, which runs as the sandbox user inside the
sandbox's own mount namespace (or VM): a path — relative, absolute, with ``..`` or through
a symlink planted by sandbox code — resolves in the sandbox's view of the filesystem, where
host files do not exist. The host never opens a path a client named. Relative paths resolve
against the sandbox home. Large files move in chunks of ``CHUNK`` bytes; an upload goes to
a temporary name and is renamed into place once complete.
"""

from __future__ import annotations

import asyncio
import posixpath
import secrets
from collections import deque
from collections.abc import AsyncIterator
from typing import Any

from vmhost.errors import InvalidPath, NotFound, RequestError
from vmhost.guest.protocol import b64decode, b64encode
from vmhost.guest.session import GuestRequestError, GuestSession

CHUNK = 1024 * 1024
WINDOW = 4  # chunk requests in flight per transfer
MAX_DEPTH = 10
MAX_ENTRIES = 10_000
STATUS = {
    "not_found": (404, "not_found"),
    "exists": (409, "exists"),
    "not_a_directory": (422, "not_a_directory"),
    "is_a_directory": (422, "is_a_directory"),
    "permission_denied": (403, "permission_denied"),
    "not_empty": (409, "not_empty"),
    "no_space": (507, "no_space"),
    "too_large": (413, "file_too_large"),
}


class FileError(RequestError):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message, code)
        self.http_status = status


def _translate(exc: GuestRequestError) -> RequestError:
    if exc.code == "not_found":
        return NotFound(exc.message)
    status, code = STATUS.get(exc.code, (422, exc.code))
    return FileError(status, code, exc.message)


class SandboxFiles:
    def __init__(self, session: GuestSession, home: str) -> None:
        self.session = session
        self.home = home

    def resolve(self, path: str) -> str:
        if not path or "\x00" in path:
            raise InvalidPath("path must be a non-empty string without NUL bytes")
        return posixpath.normpath(posixpath.join(self.home, path))

    async def _call(self, frame: dict[str, Any]) -> dict[str, Any]:
        try:
            return await self.session.request(frame)
        except GuestRequestError as exc:
            raise _translate(exc) from None

    async def stat(self, path: str, follow: bool = False) -> dict[str, Any]:
        reply = await self._call({"type": "stat", "path": self.resolve(path), "follow": follow})
        info: dict[str, Any] = reply["stat"]
        return {"path": self.resolve(path), "name": posixpath.basename(self.resolve(path)), **info}

    async def write(self, path: str, chunks: AsyncIterator[bytes], mode: int | None) -> int:
        """Stream ``chunks`` into ``path`` (parents created); returns the bytes written.

        Up to ``WINDOW`` chunk writes are in flight at once: the agent applies them in the
        order they were sent, so the next chunk travels while the previous one is written.
        """
        target = self.resolve(path)
        parent = posixpath.dirname(target)
        await self._call({"type": "mkdir", "path": parent, "parents": True, "mode": None})
        temp = posixpath.join(parent, f".bulkhead-upload-{secrets.token_hex(6)}")
        size = 0
        pending: deque[asyncio.Future[dict[str, Any]]] = deque()
        try:
            buffer = bytearray()
            async for chunk in chunks:
                buffer += chunk
                while len(buffer) >= CHUNK:
                    await self._append(pending, temp, bytes(buffer[:CHUNK]), size == 0, mode)
                    size += CHUNK
                    del buffer[:CHUNK]
            await self._append(pending, temp, bytes(buffer), size == 0, mode)
            size += len(buffer)
            while pending:
                await self._settle(pending.popleft())
            try:
                await self._call({"type": "remove", "path": target, "recursive": False})
            except NotFound:
                pass
            await self._call({"type": "move", "source": temp, "destination": target})
        except BaseException:
            for future in pending:
                future.cancel()
            try:
                await self.session.request({"type": "remove", "path": temp, "recursive": False})
            except Exception:  # noqa: BLE001 - best effort: the temp file may not exist
                pass
            raise
        return size

    async def _append(
        self,
        pending: deque[asyncio.Future[dict[str, Any]]],
        path: str,
        data: bytes,
        first: bool,
        mode: int | None,
    ) -> None:
        if len(pending) >= WINDOW:
            await self._settle(pending.popleft())
        frame = {
            "type": "write_file",
            "path": path,
            "data": b64encode(data),
            "mode": mode,
            "append": not first,
        }
        pending.append(await self.session.submit(frame))

    @staticmethod
    async def _settle(reply: asyncio.Future[dict[str, Any]]) -> None:
        try:
            await reply
        except GuestRequestError as exc:
            raise _translate(exc) from None

    async def read(self, path: str) -> AsyncIterator[bytes]:
        """The file's bytes in chunks (checked to be a regular file first)."""
        target = self.resolve(path)
        info = await self.stat(path, follow=True)
        if info["type"] != "file":
            raise FileError(422, "not_a_file", f"{target} is a {info['type']}, not a file")
        pending: deque[asyncio.Future[dict[str, Any]]] = deque()
        offset = 0
        try:
            for _ in range(WINDOW):  # read ahead: later chunks travel while one is sent on
                pending.append(await self._read_chunk(target, offset))
                offset += CHUNK
            while pending:
                reply = await pending.popleft()
                data = b64decode(reply["data"])
                if data:
                    yield data
                if reply.get("eof", True):
                    return
                pending.append(await self._read_chunk(target, offset))
                offset += CHUNK
        except GuestRequestError as exc:
            raise _translate(exc) from None
        finally:
            for future in pending:
                future.cancel()

    async def _read_chunk(self, path: str, offset: int) -> asyncio.Future[dict[str, Any]]:
        frame = {"type": "read_file", "path": path, "offset": offset, "length": CHUNK}
        return await self.session.submit(frame)

    async def remove(self, path: str) -> None:
        target = self.resolve(path)
        if target == self.home:
            raise InvalidPath("the sandbox home cannot be removed")
        await self._call({"type": "remove", "path": target, "recursive": True})

    async def mkdir(self, path: str) -> dict[str, Any]:
        await self._call({"type": "mkdir", "path": self.resolve(path), "parents": True})
        return await self.stat(path)

    async def move(self, source: str, destination: str) -> dict[str, Any]:
        src, dst = self.resolve(source), self.resolve(destination)
        parent = posixpath.dirname(dst)
        await self._call({"type": "mkdir", "path": parent, "parents": True, "mode": None})
        await self._call({"type": "move", "source": src, "destination": dst})
        return await self.stat(dst)

    async def list(self, path: str, depth: int) -> list[dict[str, Any]]:
        if not 1 <= depth <= MAX_DEPTH:
            raise InvalidPath(f"depth must be between 1 and {MAX_DEPTH}")
        root = self.resolve(path)
        entries: list[dict[str, Any]] = []
        queue = [(root, 1)]
        while queue:
            directory, level = queue.pop(0)
            reply = await self._call({"type": "list_dir", "path": directory})
            for entry in reply["entries"]:
                full = posixpath.join(directory, entry["name"])
                entries.append({**entry, "path": full})
                if entry["type"] == "dir" and level < depth:
                    queue.append((full, level + 1))
                if len(entries) >= MAX_ENTRIES:
                    return entries
        return entries
