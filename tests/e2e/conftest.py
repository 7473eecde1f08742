"""Running the real ``bulkhead up`` for end-to-end tests."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import free_port

BIN = Path(sys.executable).parent / "bulkhead"


class Up:
    def __init__(self, root: Path, proc: subprocess.Popen[bytes], url: str, env: dict[str, str]):
        self.root, self.proc, self.url, self.env = root, proc, url, env
        self.on_sqlite = "BULKHEAD_DATABASE_URL" not in env

    def state(self) -> dict[str, Any]:
        return dict(json.loads((self.root / ".bulkhead" / "up.json").read_text()))

    def cli(self, *args: str) -> str:
        out = subprocess.run(
            [str(BIN), *args],
            env=self.env,
            cwd=self.root,
            check=True,
            capture_output=True,
            text=True,
            timeout=60,
        )
        return out.stdout


def run_up(root: Path, env: dict[str, str]) -> Iterator[Up]:
    """Start ``bulkhead up`` in ``root`` with ``env``; stop it (and check it stopped cleanly)."""
    port = free_port()
    env.update(
        {
            "BULKHEAD_JOB_LEASE_S": "3",
            "BULKHEAD_WEBHOOK_ALLOW_PRIVATE": "1",
            "BULKHEAD_WEBHOOK_SCHEDULE": "0,1,2",
            "BULKHEAD_LOG_LEVEL": "WARNING",
        }
    )
    log = open(root / "up.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        [str(BIN), "up", "--port", str(port)],
        cwd=root,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while not (root / ".bulkhead" / "up.json").exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            pytest.fail("bulkhead up did not start:\n" + (root / "up.log").read_text()[-4000:])
        time.sleep(0.1)
    yield Up(root, proc, url, env)
    proc.send_signal(signal.SIGTERM)
    try:
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
    # Ctrl-C / SIGTERM stopped every child
    assert not (root / ".bulkhead" / "up.json").exists()
