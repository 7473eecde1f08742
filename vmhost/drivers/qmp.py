"""A minimal, blocking QMP (QEMU Machine Protocol) client over a connected socket.

Only the snapshot step uses it (in a thread): ``stop``, hand QEMU the snapshot file's
descriptor (``getfd`` with SCM_RIGHTS), ``migrate`` to it and poll ``query-migrate``.
Restores need no QMP at all: ``-incoming fd:N`` reads the file and the VM starts by itself.
"""

from __future__ import annotations

import json
import socket
import time
from typing import Any

from vmhost.errors import SandboxError

MIGRATE_TIMEOUT_S = 120.0


class Qmp:
    def __init__(self, sock: socket.socket, timeout: float = 60.0) -> None:
        sock.setblocking(True)
        sock.settimeout(timeout)
        self.sock = sock
        self.reader = sock.makefile("rb")
        greeting = self._read()
        if "QMP" not in greeting:
            raise SandboxError(f"qemu did not greet with QMP: {greeting!r}")
        self.execute("qmp_capabilities")

    def _read(self) -> dict[str, Any]:
        while True:
            line = self.reader.readline()
            if not line:
                raise SandboxError("qemu closed its QMP socket")
            message: dict[str, Any] = json.loads(line)
            if "event" not in message:
                return message

    def execute(
        self, command: str, arguments: dict[str, Any] | None = None, fds: list[int] | None = None
    ) -> Any:
        request = json.dumps({"execute": command, "arguments": arguments or {}}).encode()
        if fds:
            socket.send_fds(self.sock, [request], fds)
        else:
            self.sock.sendall(request)
        reply = self._read()
        if "error" in reply:
            error = reply["error"]
            raise SandboxError(f"qemu refused {command}: {error.get('desc', error)}")
        return reply.get("return")

    def snapshot(self, fd: int) -> dict[str, Any]:
        """Pause the VM and write its whole state to the file open at ``fd``."""
        self.execute("migrate-set-parameters", {"max-bandwidth": 64 * 1024**3})
        self.execute("stop")
        self.execute("getfd", {"fdname": "snapshot"}, fds=[fd])
        self.execute("migrate", {"uri": "fd:snapshot"})
        deadline = time.monotonic() + MIGRATE_TIMEOUT_S
        while time.monotonic() < deadline:
            status: dict[str, Any] = self.execute("query-migrate")
            if status.get("status") == "completed":
                return status
            if status.get("status") in ("failed", "cancelled"):
                raise SandboxError(f"snapshot failed: {status.get('error-desc', status)}")
            time.sleep(0.01)
        raise SandboxError(f"snapshot did not complete within {MIGRATE_TIMEOUT_S:.0f} s")

    def close(self) -> None:
        self.reader.close()
        self.sock.close()
