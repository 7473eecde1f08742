"""Billing end to end through ``bulkhead up``: a tiny configured free plan is refused at its
line and its running sandbox is stopped there; a pro key's usage reaches the fake Stripe
exactly once per ledger row through injected errors and a killed worker."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import time
from collections.abc import Iterator
from typing import Any

import aiohttp
import pytest

from billing.fake_stripe import FakeStripe
from tests.e2e.conftest import Up, run_up

pytestmark = pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap not installed")
PLANS = {
    "free": {"included_seconds": 3, "max_concurrent": 5},
    "pro": {"included_hours": None, "metered": True, "requires_stripe_customer": True},
}


@pytest.fixture(scope="module")
def stripe_fake() -> Iterator[FakeStripe]:
    fake = FakeStripe()
    fake.start_in_thread()
    yield fake
    fake.stop_thread()


@pytest.fixture(scope="module")
def up(stripe_fake: FakeStripe, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Up]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BULKHEAD_")}
    env.update(
        {
            "BULKHEAD_PLANS": json.dumps(PLANS),
            "BULKHEAD_STRIPE_API_KEY": stripe_fake.secret_key,
            "BULKHEAD_STRIPE_API_BASE": stripe_fake.url,
            "BULKHEAD_RECONCILE_EVERY_S": "1",
        }
    )
    yield from run_up(tmp_path_factory.mktemp("billing"), env)


async def post(session: aiohttp.ClientSession, up: Up, body: dict[str, Any], wait: int) -> Any:
    async with session.post(f"{up.url}/v1/jobs?wait={wait}", json=body) as resp:
        return resp.status, await resp.json()


async def test_a_free_key_is_stopped_at_its_line_and_then_refused(up: Up) -> None:
    key = json.loads(up.cli("keys", "create", "--name", "free", "--json"))
    headers = {"Authorization": f"Bearer {key['key']}"}
    async with aiohttp.ClientSession(headers=headers) as session:
        code = "import time; time.sleep(30)"
        status, job = await post(session, up, {"language": "python", "code": code}, 30)
        assert status == 200, job
        assert job["termination_reason"] == "quota_exceeded", job
        assert job["usage"]["sandbox_seconds"] == 3
        status, refused = await post(session, up, {"language": "python", "code": "1"}, 0)
        assert status == 429 and refused["error"]["code"] == "quota_exceeded"
        assert "resets at" in refused["error"]["message"]
        async with session.get(f"{up.url}/v1/usage") as resp:
            usage = await resp.json()
        assert usage["quota"]["remaining_hours"] == 0
        assert usage["totals"]["sandbox_seconds"] == 3
    row = up.cli("usage", "--key", key["id"]).splitlines()[2].split()
    assert row[0] == key["id"] and (row[5], row[7]) == ("0.0008", "0.0000")


async def test_pro_usage_reaches_stripe_once_per_ledger_row(
    up: Up, stripe_fake: FakeStripe
) -> None:
    customer = stripe_fake.create_customer(email="e2e@example.com")["id"]
    key = json.loads(
        up.cli("keys", "create", "--name", "pro", "--plan", "pro",
               "--stripe-customer", customer, "--json")
    )  # fmt: skip
    # the first meter event hangs for 8 s: the worker is killed while that flush waits
    stripe_fake.inject(status=None, delay_s=8.0, count=1)
    headers = {"Authorization": f"Bearer {key['key']}"}
    async with aiohttp.ClientSession(headers=headers) as session:
        for i in range(4):
            body = {"language": "python", "code": f"import time; time.sleep({i % 2}); print({i})"}
            status, job = await post(session, up, body, 30)
            assert status == 200 and job["status"] == "completed", job
            if i == 1:
                await asyncio.sleep(2.5)  # a flush (every second) is now stuck on Stripe
                os.kill(up.state()["children"]["worker-1"], signal.SIGKILL)  # `up` restarts it
                stripe_fake.inject(status=429, count=1)
                stripe_fake.inject(status=500, count=1, after_apply=True)
        async with session.get(f"{up.url}/v1/usage") as resp:
            ledger_total = (await resp.json())["totals"]["sandbox_seconds"]
        async with session.get(f"{up.url}/v1/usage/sandboxes") as resp:
            rows = (await resp.json())["data"]
    assert len(rows) == 4
    deadline = time.monotonic() + 90  # backoff after the injected errors: 5 s, then 15 s
    while time.monotonic() < deadline:
        if stripe_fake.totals().get((customer, "bulkhead_sandbox_seconds")) == ledger_total:
            break
        await asyncio.sleep(0.5)
    assert stripe_fake.totals() == {(customer, "bulkhead_sandbox_seconds"): ledger_total}
    sent = sorted(e["identifier"] for e in stripe_fake.meter_events)
    assert sent == sorted(r["id"] for r in rows)
