"""Fixtures: a real vmhost app on 127.0.0.1 (random port) with the bwrap driver."""

from __future__ import annotations

import json
import os
import secrets
import shutil
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from vmhost.app import DRIVER, create_app
from vmhost.drivers.bwrap import BwrapDriver
from vmhost.settings import VmhostSettings

TOKEN = "test-vmhost-token"


def bwrap_skip_reason() -> str | None:
    if shutil.which("bwrap") is None:
        return "bubblewrap is not installed"
    if os.geteuid() != 0:
        return "the vmhost tests need root (sandboxes run as uid 65534)"
    return None


@dataclass
class Vmhost:
    url: str
    session: aiohttp.ClientSession
    driver: BwrapDriver
    work_dir: Path

    def body(self, **fields: Any) -> dict[str, Any]:
        body: dict[str, Any] = {
            "run_id": "run-" + secrets.token_hex(6),
            "language": None,
            "code": None,
            "command": None,
            "stdin": None,
            "env": {},
            "files": [],
            "timeout_s": 20,
            "limits": {"vcpus": 1, "memory_mb": 256},
            "network": False,
            "template": "base",
            "max_output_bytes": 1024 * 1024,
        }
        body.update(fields)
        return body

    async def run(self, **fields: Any) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """POST /v1/runs; returns all lines and the final result line."""
        async with self.session.post(f"{self.url}/v1/runs", json=self.body(**fields)) as resp:
            assert resp.status == 200, await resp.text()
            assert resp.headers["Content-Type"].startswith("application/x-ndjson")
            lines = [json.loads(line) async for line in resp.content]
        assert lines[0]["type"] == "started"
        assert lines[-1]["type"] == "result"
        assert [line["type"] for line in lines].count("result") == 1
        return lines, lines[-1]


@pytest.fixture
def settings() -> VmhostSettings:
    reason = bwrap_skip_reason()
    if reason:
        pytest.skip(reason)
    work_dir = Path("/var/lib/bulkhead") / f"vmhost-test-{secrets.token_hex(4)}"
    env = {
        "BULKHEAD_VMHOST_TOKEN": TOKEN,
        "BULKHEAD_VMHOST_WORK_DIR": str(work_dir),
        "BULKHEAD_SANDBOX_POOL": "0",  # cold starts; the warm pool has tests of its own
        "BULKHEAD_SANDBOX_DRIVER": "bwrap",  # the default; qemu is there for isolation=microvm
    }
    return VmhostSettings.from_env(env)


@pytest.fixture
async def vmhost(settings: VmhostSettings) -> AsyncIterator[Vmhost]:
    async for host in _serve(settings):
        yield host


@pytest.fixture
async def small_files_vmhost(settings: VmhostSettings) -> AsyncIterator[Vmhost]:
    async for host in _serve(replace(settings, max_file_bytes=1024 * 1024)):
        yield host


@pytest.fixture
async def two_slot_vmhost(settings: VmhostSettings) -> AsyncIterator[Vmhost]:
    async for host in _serve(replace(settings, max_runs=2)):
        yield host


@pytest.fixture
async def pooled_vmhost(settings: VmhostSettings) -> AsyncIterator[Vmhost]:
    async for host in _serve(replace(settings, pool_size=2)):
        yield host


async def _serve(settings: VmhostSettings) -> AsyncIterator[Vmhost]:
    app = create_app(settings)
    driver = app[DRIVER]
    assert isinstance(driver, BwrapDriver)
    runner = web.AppRunner(app, handler_cancellation=True)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    server = runner.server
    assert server is not None
    port = runner.addresses[0][1]
    headers = {"Authorization": f"Bearer {TOKEN}"}
    try:
        async with aiohttp.ClientSession(headers=headers) as session:
            yield Vmhost(f"http://127.0.0.1:{port}", session, driver, settings.work_dir)
    finally:
        await runner.cleanup()
        shutil.rmtree(settings.work_dir, ignore_errors=True)
