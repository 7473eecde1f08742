"""End to end: the real ``bulkhead up`` process driven over HTTP, as a user would.

One ``bulkhead up`` (embedded Valkey, SQLite, vmhost with bwrap, one worker, gateway) serves
the whole module; keys are made with the real CLI.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from standardwebhooks.webhooks import Webhook

from tests.conftest import free_port, fresh_pg_database
from tests.e2e.conftest import Up, run_up

pytestmark = pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap not installed")


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def up(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Up]:
    """``bulkhead up`` on its default SQLite file, then on PostgreSQL."""
    with contextlib.ExitStack() as stack:
        env = {k: v for k, v in os.environ.items() if not k.startswith("BULKHEAD_")}
        if request.param == "postgresql":
            env["BULKHEAD_DATABASE_URL"] = stack.enter_context(fresh_pg_database())
        yield from run_up(tmp_path_factory.mktemp("up"), env)


@pytest.fixture(scope="module")
def key(up: Up) -> dict[str, Any]:
    return dict(json.loads(up.cli("keys", "create", "--name", "e2e", "--json")))


@pytest.fixture
async def http(key: dict[str, Any]) -> AsyncIterator[aiohttp.ClientSession]:
    headers = {"Authorization": f"Bearer {key['key']}"}
    async with aiohttp.ClientSession(headers=headers) as session:
        yield session


async def run(http: aiohttp.ClientSession, up: Up, body: dict[str, Any], wait: int = 30) -> Any:
    async with http.post(f"{up.url}/v1/jobs?wait={wait}", json=body) as resp:
        job = await resp.json()
        assert resp.status in (200, 202), job
        return job


async def test_first_run_prints_a_key(up: Up) -> None:
    text = (up.root / "up.log").read_text()
    assert "Your first API key (shown once):      bk_" in text
    assert "curl -s -X POST" in text


async def test_python_and_bash_jobs(http: aiohttp.ClientSession, up: Up) -> None:
    job = await run(
        http,
        up,
        {
            "language": "python",
            "code": "import sys\nprint(6*7)\nprint('oops', file=sys.stderr)\nsys.exit(3)",
        },
    )
    assert job["status"] == "completed", job
    assert (job["stdout"], job["stderr"], job["exit_code"]) == ("42\n", "oops\n", 3)
    assert job["termination_reason"] == "exit"
    assert job["usage"]["sandbox_seconds"] >= 1
    job = await run(
        http,
        up,
        {
            "language": "bash",
            "code": 'read x; echo "got $x"; cat data.txt',
            "stdin": "hello\n",
            "files": [{"path": "data.txt", "content": "from a file"}],
        },
    )
    assert job["stdout"] == "got hello\nfrom a file", job
    assert job["exit_code"] == 0


async def test_timeout_kills_an_endless_loop(http: aiohttp.ClientSession, up: Up) -> None:
    started = time.monotonic()
    job = await run(http, up, {"language": "python", "code": "while True: pass", "timeout_s": 2})
    elapsed = time.monotonic() - started
    assert job["status"] == "timed_out", job
    assert job["termination_reason"] == "timeout"
    assert elapsed < 15  # ~3 s expected; generous for a loaded CI machine
    assert 1500 <= job["duration_ms"] <= 10000


async def test_sandbox_cannot_see_the_database_or_reach_the_gateway(
    http: aiohttp.ClientSession, up: Up
) -> None:
    db_file = up.root / ".bulkhead" / ("bulkhead.db" if up.on_sqlite else "secrets.json")
    assert db_file.exists()
    port = int(up.url.rsplit(":", 1)[1])
    code = f"""
import socket
try:
    open({str(db_file)!r}, 'rb').read(16); print('READ DB')
except OSError as e:
    print('no db:', type(e).__name__)
try:
    socket.create_connection(('127.0.0.1', {port}), timeout=2); print('REACHED GATEWAY')
except OSError as e:
    print('no gateway:', type(e).__name__)
"""
    job = await run(http, up, {"language": "python", "code": code})
    assert "no db: FileNotFoundError" in job["stdout"], job
    assert "no gateway:" in job["stdout"], job
    assert "READ DB" not in job["stdout"] and "REACHED" not in job["stdout"]


async def test_fork_bomb_is_contained(http: aiohttp.ClientSession, up: Up) -> None:
    job = await run(
        http,
        up,
        {"language": "bash", "code": "f(){ f|f& }; f; sleep 3; echo survived", "timeout_s": 5},
    )
    assert job["status"] in ("completed", "timed_out", "failed"), job
    after = await run(http, up, {"language": "python", "code": "print('still fine')"})
    assert after["stdout"] == "still fine\n"


async def test_cancel_a_running_job(http: aiohttp.ClientSession, up: Up) -> None:
    job = await run(http, up, {"language": "python", "code": "import time; time.sleep(60)"}, wait=0)
    for _ in range(100):
        async with http.get(f"{up.url}/v1/jobs/{job['id']}") as resp:
            if (await resp.json())["status"] == "running":
                break
        await asyncio.sleep(0.1)
    async with http.delete(f"{up.url}/v1/jobs/{job['id']}") as resp:
        canceled = await resp.json()
    assert canceled["status"] == "canceled", canceled
    assert canceled["termination_reason"] == "canceled"


@pytest.fixture
async def receiver() -> AsyncIterator[tuple[list[tuple[dict[str, str], bytes]], str]]:
    got: list[tuple[dict[str, str], bytes]] = []

    async def handle(request: web.Request) -> web.Response:
        got.append((dict(request.headers), await request.read()))
        return web.Response(status=204)

    app = web.Application()
    app.router.add_post("/hook", handle)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    yield got, f"http://127.0.0.1:{port}/hook"
    await runner.cleanup()


async def until(predicate: Any, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.1)


async def test_signed_webhook(
    http: aiohttp.ClientSession, up: Up, key: dict[str, Any], receiver: Any
) -> None:
    got, hook = receiver
    job = await run(http, up, {"language": "python", "code": "print('hi')", "callback_url": hook})
    await until(lambda: len(got) >= 1)
    headers, body = got[0]
    event = Webhook(key["webhook_secret"]).verify(body, headers)
    assert event["type"] == "job.completed"
    assert event["data"]["id"] == job["id"] and event["data"]["stdout"] == "hi\n"
    deliveries: list[dict[str, Any]] = []
    for _ in range(100):  # the attempt is recorded just after the receiver answered
        async with http.get(f"{up.url}/v1/jobs/{job['id']}/deliveries") as resp:
            deliveries = (await resp.json())["data"]
        if deliveries:
            break
        await asyncio.sleep(0.1)
    assert deliveries[0]["status_code"] == 204 and deliveries[0]["succeeded"]
    async with http.post(f"{up.url}/v1/jobs/{job['id']}/redeliver") as resp:
        assert resp.status == 202
    await until(lambda: len(got) >= 2)
    Webhook(key["webhook_secret"]).verify(got[1][1], got[1][0])
    assert got[1][0]["webhook-id"] == headers["webhook-id"]


async def test_worker_killed_mid_job_still_finishes_once(
    http: aiohttp.ClientSession, up: Up, receiver: Any
) -> None:
    got, hook = receiver
    code = "import time; time.sleep(3); print('finished')"
    job = await run(http, up, {"language": "python", "code": code, "callback_url": hook}, wait=0)
    for _ in range(200):
        async with http.get(f"{up.url}/v1/jobs/{job['id']}") as resp:
            if (await resp.json())["status"] == "running":
                break
        await asyncio.sleep(0.05)
    worker_pid = up.state()["children"]["worker-1"]
    os.kill(worker_pid, signal.SIGKILL)
    async with http.get(f"{up.url}/v1/jobs/{job['id']}?wait=60") as resp:
        done = await resp.json()
    assert done["status"] == "completed", done
    assert done["stdout"] == "finished\n"
    await until(lambda: len(got) >= 1, 60)
    await asyncio.sleep(3)  # room for a duplicate to show up, if there were one
    ids = {h["webhook-id"] for h, _ in got}
    assert len(ids) == 1
    assert up.state()["children"]["worker-1"] != worker_pid  # `up` restarted the worker
    async with http.get(f"{up.url}/v1/usage") as resp:
        usage = await resp.json()
    assert usage["totals"]["jobs"] >= 1


async def test_revoked_key_is_refused(up: Up) -> None:
    created = json.loads(up.cli("keys", "create", "--name", "short-lived", "--json"))
    headers = {"Authorization": f"Bearer {created['key']}"}
    async with aiohttp.ClientSession(headers=headers) as session:
        async with session.get(f"{up.url}/v1/jobs") as resp:
            assert resp.status == 200
        up.cli("keys", "revoke", created["id"])
        async with session.get(f"{up.url}/v1/jobs") as resp:
            assert resp.status == 401
