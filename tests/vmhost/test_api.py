"""The HTTP contract: auth, validation, info, conflicts, cancel and client disconnect."""

from __future__ import annotations

import asyncio
import json
import secrets
from pathlib import Path

import aiohttp
import pytest

from tests.vmhost.conftest import Vmhost
from tests.vmhost.helpers import assert_clean, pids_with_marker, sandbox_pids, wait_until
from vmhost.errors import ConfigError
from vmhost.settings import VmhostSettings


async def test_healthz_and_info(vmhost: Vmhost) -> None:
    async with aiohttp.ClientSession() as anonymous:
        async with anonymous.get(f"{vmhost.url}/healthz") as resp:
            assert resp.status == 200
            assert await resp.json() == {"status": "ok"}
    async with vmhost.session.get(f"{vmhost.url}/v1/info") as resp:
        info = await resp.json()
    assert info["driver"] == "bwrap"
    bwrap, qemu = info["drivers"]["bwrap"], info["drivers"]["qemu"]
    assert bwrap == {"isolation": "namespace", "available": True, "reason": None, "default": True}
    assert qemu["isolation"] == "microvm" and qemu["default"] is False
    assert qemu["available"] or qemu["reason"]  # unavailable says why
    assert info["languages"]["python"] is True and info["languages"]["bash"] is True
    assert info["cgroups"] in ("v1", "v2", "none")
    assert info["active_runs"] == 0


@pytest.mark.parametrize("header", [None, "Bearer wrong", "Basic abc"])
async def test_auth_required(vmhost: Vmhost, header: str | None) -> None:
    headers = {} if header is None else {"Authorization": header}
    async with aiohttp.ClientSession(headers=headers) as client:
        for method, path in (("GET", "/v1/info"), ("POST", "/v1/runs"), ("DELETE", "/v1/runs/x")):
            async with client.request(method, f"{vmhost.url}{path}", json={}) as resp:
                assert resp.status == 401
                body = await resp.json()
                assert body["error"]["code"] == "unauthorized"


@pytest.mark.parametrize(
    ("change", "code"),
    [
        ({"surprise": 1}, "invalid_request"),
        ({"limits": {"vcpus": 1, "memory_mb": 64, "gpu": 1}}, "invalid_request"),
        ({"files": [{"path": "../x", "content": "", "encoding": "utf8"}]}, "invalid_path"),
        ({"files": [{"path": "/etc/passwd", "content": "", "encoding": "utf8"}]}, "invalid_path"),
        ({"files": [{"path": "a/../../b", "content": "", "encoding": "utf8"}]}, "invalid_path"),
        ({"command": ["ls"]}, "invalid_request"),
        ({"language": "cobol"}, "invalid_request"),
        ({"timeout_s": 0}, "invalid_request"),
        ({"network": "yes"}, "invalid_request"),
    ],
)
async def test_invalid_requests_are_422(vmhost: Vmhost, change: dict, code: str) -> None:
    body = vmhost.body(language="python", code="print(1)")
    body.update(change)
    async with vmhost.session.post(f"{vmhost.url}/v1/runs", json=body) as resp:
        assert resp.status == 422, await resp.text()
        assert (await resp.json())["error"]["code"] == code
    await assert_clean(vmhost)


async def test_bad_json_is_422(vmhost: Vmhost) -> None:
    async with vmhost.session.post(f"{vmhost.url}/v1/runs", data=b"{nope") as resp:
        assert resp.status == 422
        assert (await resp.json())["error"]["code"] == "invalid_request"


async def test_language_unavailable_is_a_result(vmhost: Vmhost) -> None:
    vmhost.driver.node = None
    _, result = await vmhost.run(language="javascript", code="console.log(1)")
    assert result["exit_code"] is None
    assert result["termination_reason"] == "internal_error"
    assert result["error"]["code"] == "language_unavailable"
    await assert_clean(vmhost)


async def _start_sleeper(vmhost: Vmhost, run_id: str, marker: str) -> asyncio.Task:
    body = vmhost.body(run_id=run_id, command=["sh", "-c", f"sleep 1000 # {marker}"], timeout_s=120)

    async def consume() -> list[dict]:
        async with vmhost.session.post(f"{vmhost.url}/v1/runs", json=body) as resp:
            assert resp.status == 200
            return [json.loads(line) async for line in resp.content]

    task = asyncio.ensure_future(consume())
    assert await wait_until(lambda: bool(pids_with_marker(marker))), "sandbox never started"
    return task


async def test_delete_cancels_and_conflicts(vmhost: Vmhost) -> None:
    before = sandbox_pids()
    marker = "bulkhead-" + secrets.token_hex(6)
    run_id = "cancel-" + marker
    task = await _start_sleeper(vmhost, run_id, marker)
    body = vmhost.body(run_id=run_id, language="python", code="print(1)")
    async with vmhost.session.post(f"{vmhost.url}/v1/runs", json=body) as resp:
        assert resp.status == 409
        assert (await resp.json())["error"]["code"] == "run_exists"
    async with vmhost.session.get(f"{vmhost.url}/v1/info") as resp:
        assert (await resp.json())["active_runs"] == 1
    async with vmhost.session.delete(f"{vmhost.url}/v1/runs/{run_id}") as resp:
        assert resp.status == 204
    lines = await asyncio.wait_for(task, 30)
    assert lines[-1]["type"] == "result"
    assert lines[-1]["termination_reason"] == "canceled"
    assert not pids_with_marker(marker)
    async with vmhost.session.delete(f"{vmhost.url}/v1/runs/{run_id}") as resp:
        assert resp.status == 404
        assert (await resp.json())["error"]["code"] == "not_found"
    await assert_clean(vmhost, before)


async def test_client_disconnect_kills_the_sandbox(vmhost: Vmhost) -> None:
    before = sandbox_pids()
    marker = "bulkhead-" + secrets.token_hex(6)
    task = await _start_sleeper(vmhost, "disconnect-" + marker, marker)
    task.cancel()  # drops the HTTP connection mid-stream
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await wait_until(lambda: not pids_with_marker(marker)), "sandbox survived"
    await assert_clean(vmhost, before)
    async with vmhost.session.get(f"{vmhost.url}/v1/info") as resp:
        assert (await resp.json())["active_runs"] == 0


async def test_busy_when_max_runs_reached(two_slot_vmhost: Vmhost) -> None:
    vmhost = two_slot_vmhost
    before = sandbox_pids()
    markers = ["bulkhead-" + secrets.token_hex(6) for _ in range(2)]
    tasks = [await _start_sleeper(vmhost, f"busy-{m}", m) for m in markers]
    body = vmhost.body(language="python", code="print(1)")
    async with vmhost.session.post(f"{vmhost.url}/v1/runs", json=body) as resp:
        assert resp.status == 503
        assert (await resp.json())["error"]["code"] == "busy"
    for marker in markers:
        async with vmhost.session.delete(f"{vmhost.url}/v1/runs/busy-{marker}") as resp:
            assert resp.status == 204
    results = await asyncio.wait_for(asyncio.gather(*tasks), 30)
    assert [r[-1]["termination_reason"] for r in results] == ["canceled", "canceled"]
    await assert_clean(vmhost, before)


def test_settings_require_a_token() -> None:
    with pytest.raises(ConfigError, match="BULKHEAD_VMHOST_TOKEN"):
        VmhostSettings.from_env({})


def test_qemu_driver_without_an_image_is_a_clear_startup_error(tmp_path: Path) -> None:
    from vmhost.drivers import select_driver

    env = {
        "BULKHEAD_VMHOST_TOKEN": "x",
        "BULKHEAD_SANDBOX_DRIVER": "qemu",
        "BULKHEAD_IMAGE_DIR": str(tmp_path / "images"),
        "BULKHEAD_VMHOST_WORK_DIR": str(tmp_path / "work"),
    }
    with pytest.raises(ConfigError, match="qemu"):  # not installed, or no image built
        select_driver(VmhostSettings.from_env(env))
