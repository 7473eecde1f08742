"""Held-open sandboxes through the vmhost API: lifecycle, commands, files, code."""

from __future__ import annotations

import asyncio
import json
import secrets
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

from tests.vmhost.conftest import Vmhost, _serve
from vmhost.settings import VmhostSettings


async def _create(vmhost: Vmhost, **fields: Any) -> str:
    sandbox_id = "sbx" + secrets.token_hex(6)
    body = {"sandbox_id": sandbox_id, **fields}
    async with vmhost.session.post(f"{vmhost.url}/v1/sandboxes", json=body) as resp:
        assert resp.status == 201, await resp.text()
        info = await resp.json()
    assert info["state"] == "running"
    return sandbox_id


async def _lines(resp: Any) -> list[dict[str, Any]]:
    return [json.loads(line) async for line in resp.content]


async def test_lifecycle_commands_and_idempotent_delete(vmhost: Vmhost) -> None:
    sid = await _create(vmhost)
    base = f"{vmhost.url}/v1/sandboxes/{sid}"
    body = {"cmd": "echo one; echo two >&2; echo $((6*7)); exit 3"}
    async with vmhost.session.post(f"{base}/commands", json=body) as resp:
        assert resp.status == 200
        lines = await _lines(resp)
    assert lines[0]["type"] == "start"
    assert lines[-1]["type"] == "exit" and lines[-1]["exit_code"] == 3
    out = "".join(e["data"] for e in lines if e["type"] == "stdout")
    assert out == "one\n42\n"
    # state persists in the sandbox's filesystem between commands
    async with vmhost.session.post(f"{base}/commands", json={"cmd": "echo hi > f; pwd"}) as r:
        await _lines(r)
    async with vmhost.session.post(f"{base}/commands", json={"cmd": "cat f"}) as r:
        lines = await _lines(r)
    assert [e["data"] for e in lines if e["type"] == "stdout"] == ["hi\n"]
    async with vmhost.session.delete(base) as resp:
        first = await resp.json()
    async with vmhost.session.delete(base) as resp:
        second = await resp.json()
    assert first == second and first["state"] == "ended" and first["end_reason"] == "canceled"
    async with vmhost.session.post(f"{base}/commands", json=body) as resp:
        assert resp.status == 404


async def test_background_stdin_signal_and_replay(vmhost: Vmhost) -> None:
    sid = await _create(vmhost)
    base = f"{vmhost.url}/v1/sandboxes/{sid}"
    cmd = "trap 'echo got-term; exit 7' TERM; while read line; do echo \"echo:$line\"; done"
    async with vmhost.session.post(
        f"{base}/commands", json={"cmd": cmd, "background": True}
    ) as resp:
        assert resp.status == 201, await resp.text()
        pid = (await resp.json())["pid"]
    async with vmhost.session.post(f"{base}/commands/{pid}/stdin", json={"data": "a\nb\n"}) as resp:
        assert resp.status == 204, await resp.text()
    for _ in range(100):
        async with vmhost.session.get(f"{base}/commands") as resp:
            procs = (await resp.json())["data"]
        if procs[0]["output_events"] >= 1:
            break
        await asyncio.sleep(0.05)
    async with vmhost.session.post(
        f"{base}/commands/{pid}/signal", json={"signal": "SIGTERM"}
    ) as resp:
        assert resp.status == 204
    async with vmhost.session.get(f"{base}/commands/{pid}/output?offset=0") as resp:
        lines = await _lines(resp)
    text = "".join(e["data"] for e in lines if e["type"] == "stdout")
    assert "echo:a\necho:b\n" in text
    assert lines[-1]["type"] == "exit"
    async with vmhost.session.get(f"{base}/commands/{pid}/output?offset=1") as resp:
        replay = await _lines(resp)
    assert replay == lines[1:]
    await vmhost.session.delete(base)


async def test_files_round_trip(vmhost: Vmhost) -> None:
    sid = await _create(vmhost)
    base = f"{vmhost.url}/v1/sandboxes/{sid}"
    data = secrets.token_bytes(3 * 1024 * 1024 + 5)
    async with vmhost.session.put(f"{base}/files?path=dir/sub/blob.bin", data=data) as resp:
        assert resp.status == 201, await resp.text()
        info = await resp.json()
    assert info["size"] == len(data)
    async with vmhost.session.get(f"{base}/files?path=/home/user/dir/sub/blob.bin") as resp:
        assert resp.status == 200
        assert await resp.read() == data
    async with vmhost.session.get(f"{base}/files/list?path=dir&depth=2") as resp:
        names = [e["path"] for e in (await resp.json())["data"]]
    assert names == ["/home/user/dir/sub", "/home/user/dir/sub/blob.bin"]
    async with vmhost.session.get(f"{base}/files?path=nope") as resp:
        assert resp.status == 404
    await vmhost.session.delete(base)


async def test_code_context_state(vmhost: Vmhost) -> None:
    sid = await _create(vmhost)
    base = f"{vmhost.url}/v1/sandboxes/{sid}"
    async with vmhost.session.post(f"{base}/code", json={"code": "x = 20\nprint('hi')"}) as r:
        assert r.status == 200, await r.text()
        first = await _lines(r)
    async with vmhost.session.post(f"{base}/code", json={"code": "x * 2 + 2"}) as r:
        second = await _lines(r)
    assert "".join(e["text"] for e in first if e["type"] == "stdout") == "hi\n", first
    assert first[-1] == {"type": "end", "execution_count": 1}
    result = next(e for e in second if e["type"] == "result")
    assert result["data"]["text/plain"] == "42"
    assert second[-1] == {"type": "end", "execution_count": 2}
    await vmhost.session.delete(base)


async def test_upload_cap_is_413_and_leaves_nothing(settings: VmhostSettings) -> None:
    async for vmhost in _serve(replace(settings, max_upload_bytes=1024 * 1024)):
        sid = await _create(vmhost)
        files = f"{vmhost.url}/v1/sandboxes/{sid}/files"

        async def body() -> AsyncIterator[bytes]:  # no Content-Length: counted as it streams
            for _ in range(3):
                yield b"x" * (512 * 1024)

        async with vmhost.session.put(f"{files}?path=big.bin", data=body()) as resp:
            assert resp.status == 413
            assert (await resp.json())["error"]["code"] == "file_too_large"
        async with vmhost.session.put(f"{files}?path=big.bin", data=b"x" * (2 << 20)) as resp:
            assert resp.status == 413
        async with vmhost.session.get(f"{files}/list?path=.") as resp:
            assert (await resp.json())["data"] == [], "no partial upload remains"
        await vmhost.session.delete(f"{vmhost.url}/v1/sandboxes/{sid}")


async def test_javascript_context(vmhost: Vmhost) -> None:
    if not vmhost.driver.languages()["javascript"]:
        print("node is not installed: the JavaScript context is not offered")
        return
    sid = await _create(vmhost)
    base = f"{vmhost.url}/v1/sandboxes/{sid}"
    async with vmhost.session.post(f"{base}/contexts", json={"language": "javascript"}) as r:
        assert r.status == 201, await r.text()
        context = (await r.json())["id"]
    for code in ("const xs = [1, 2, 3]; console.log('n', xs.length)", "xs.map(x => x * 2)"):
        async with vmhost.session.post(
            f"{base}/code", json={"code": code, "context_id": context}
        ) as r:
            events = await _lines(r)
    assert next(e for e in events if e["type"] == "result")["data"]["text/plain"] == "[ 2, 4, 6 ]"
    await vmhost.session.delete(base)
