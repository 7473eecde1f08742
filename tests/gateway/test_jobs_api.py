"""The jobs API over HTTP: validation, auth, idempotency, tenancy, pagination, cancel."""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp.test_utils import TestClient
from redis.asyncio import Redis

from bulkhead import queue
from tests.gateway.conftest import auth

PY = {"language": "python", "code": "print(1)"}


async def post_job(client: TestClient, key: Any, body: Any, **kw: Any) -> Any:
    return await client.post(
        "/v1/jobs", json=body, headers={**auth(key), **kw.pop("headers", {})}, **kw
    )


async def test_create_job_is_queued_and_enqueued(
    client: TestClient, key_factory: Any, redis: Redis
) -> None:
    key = await key_factory()
    resp = await post_job(client, key, {**PY, "metadata": {"team": "a"}, "timeout_s": 5})
    assert resp.status == 202
    job = await resp.json()
    assert job["id"].startswith("job_")
    assert job["status"] == "queued"
    assert job["metadata"] == {"team": "a"}
    assert job["timeout_s"] == 5
    assert job["limits"] == {"vcpus": 1, "memory_mb": 512}
    queued = await redis.zrange("bulkhead:test", 0, -1)
    assert queued == [queue.run_job_id(job["id"], 1).encode()]
    assert await redis.llen(queue.WAKE_KEY) == 1


async def test_auth_is_required_and_errors_are_json(client: TestClient, key_factory: Any) -> None:
    resp = await client.post("/v1/jobs", json=PY)
    assert resp.status == 401
    body = await resp.json()
    assert body["error"]["code"] == "unauthorized"
    resp = await client.get("/v1/jobs", headers={"Authorization": "Bearer bk_nope_nope_nope_nope"})
    assert resp.status == 401
    key = await key_factory()
    resp = await client.get("/v1/jobs", headers={"X-API-Key": key.secret})
    assert resp.status == 200


async def test_revoked_key_is_refused_at_once(client: TestClient, key_factory: Any) -> None:
    key = await key_factory()
    assert (await client.get("/v1/jobs", headers=auth(key))).status == 200
    admin = {"Authorization": "Bearer admin-secret"}
    resp = await client.delete(f"/v1/admin/keys/{key.key.id}", headers=admin)
    assert resp.status == 200
    assert (await resp.json())["revoked_at"] is not None
    resp = await client.get("/v1/jobs", headers=auth(key))
    assert resp.status == 401


async def test_admin_api_needs_the_admin_token(client: TestClient) -> None:
    assert (await client.get("/v1/admin/keys")).status == 401
    wrong = {"Authorization": "Bearer wrong"}
    assert (await client.get("/v1/admin/keys", headers=wrong)).status == 401
    admin = {"Authorization": "Bearer admin-secret"}
    body = {"name": "ci", "plan": "pro", "stripe_customer_id": "cus_Test123"}
    resp = await client.post("/v1/admin/keys", json=body, headers=admin)
    assert resp.status == 201
    created = await resp.json()
    assert created["key"].startswith("bk_") and created["webhook_secret"].startswith("whsec_")
    assert created["stripe_customer_id"] == "cus_Test123"
    unlinked = await client.post("/v1/admin/keys", json={"name": "x", "plan": "pro"}, headers=admin)
    assert unlinked.status == 422
    assert (await unlinked.json())["error"]["code"] == "stripe_customer_required"
    nope = await client.post("/v1/admin/keys", json={"name": "x", "plan": "gold"}, headers=admin)
    assert (await nope.json())["error"]["code"] == "unknown_plan"
    listed = await (await client.get("/v1/admin/keys", headers=admin)).json()
    assert [k["id"] for k in listed["data"]] == [created["id"]]
    assert "key" not in listed["data"][0] and "key_hash" not in listed["data"][0]


async def test_validation_errors(client: TestClient, key_factory: Any) -> None:
    key = await key_factory()
    cases: list[tuple[Any, str]] = [
        ({**PY, "bogus": 1}, "unknown field 'bogus'"),
        ({"language": "cobol", "code": "x"}, "language"),
        ({"code": "print(1)"}, "give language and code"),
        ({**PY, "command": ["ls"]}, "not both"),
        ({**PY, "timeout_s": "5"}, "timeout_s"),
        ({**PY, "timeout_s": 90000}, "timeout_s must be at most"),
        ({**PY, "limits": {"vcpus": 1, "gpus": 1}}, "unknown field 'limits.gpus'"),
        ({**PY, "files": [{"path": "../x", "content": ""}]}, "'..'"),
        ({**PY, "files": [{"path": "/etc/x", "content": ""}]}, "/home/user"),
        ({**PY, "files": [{"path": "a", "content": "!!", "encoding": "base64"}]}, "base64"),
        ({**PY, "env": {"1BAD": "x"}}, "invalid environment variable"),
        ({**PY, "callback_url": "ftp://x"}, "http"),
        ({**PY, "template": "nope"}, "unknown template"),
    ]
    for body, needle in cases:
        resp = await post_job(client, key, body)
        assert resp.status == 422, body
        err = (await resp.json())["error"]
        assert needle in err["message"], (body, err)
    resp = await client.post("/v1/jobs", data=b"{not json", headers=auth(key))
    assert resp.status == 422
    assert (await resp.json())["error"]["code"] == "invalid_json"


async def test_body_over_10_mib_is_413(client: TestClient, key_factory: Any) -> None:
    key = await key_factory()
    resp = await post_job(client, key, {"language": "python", "code": "#" * (11 * 1024 * 1024)})
    assert resp.status == 413
    assert (await resp.json())["error"]["code"] == "payload_too_large"


async def test_idempotency_key(client: TestClient, key_factory: Any, redis: Redis) -> None:
    key = await key_factory()
    hdr = {"Idempotency-Key": "abc-1"}
    first = await post_job(client, key, PY, headers=hdr)
    assert first.status == 202
    # same meaning, other key order and spacing → same job
    again = await client.post(
        "/v1/jobs",
        data=b'{ "code": "print(1)",  "language": "python" }',
        headers={**auth(key), **hdr},
    )
    assert again.status == 200
    assert (await again.json())["id"] == (await first.json())["id"]
    other = await post_job(client, key, {**PY, "code": "print(2)"}, headers=hdr)
    assert other.status == 409
    assert (await other.json())["error"]["code"] == "idempotency_conflict"
    assert await redis.zcard("bulkhead:test") == 1
    # another tenant may use the same idempotency key for its own job
    stranger = await key_factory("other")
    theirs = await post_job(client, stranger, PY, headers=hdr)
    assert theirs.status == 202


async def test_other_tenants_job_is_404(client: TestClient, key_factory: Any) -> None:
    owner, stranger = await key_factory("a"), await key_factory("b")
    job = await (await post_job(client, owner, PY)).json()
    for method, path in (
        ("GET", ""),
        ("DELETE", ""),
        ("GET", "/deliveries"),
        ("POST", "/redeliver"),
    ):
        resp = await client.request(method, f"/v1/jobs/{job['id']}{path}", headers=auth(stranger))
        assert resp.status == 404, (method, path)
        assert (await resp.json())["error"]["code"] == "not_found"
    listed = await (await client.get("/v1/jobs", headers=auth(stranger))).json()
    assert listed["data"] == []
    assert (await client.get(f"/v1/jobs/{job['id']}", headers=auth(owner))).status == 200


async def test_list_paginates_with_a_cursor(client: TestClient, key_factory: Any) -> None:
    key = await key_factory()
    ids = [(await (await post_job(client, key, PY)).json())["id"] for _ in range(5)]
    seen: list[str] = []
    cursor = None
    while True:
        params = {"limit": "2", **({"cursor": cursor} if cursor else {})}
        page = await (await client.get("/v1/jobs", params=params, headers=auth(key))).json()
        seen += [j["id"] for j in page["data"]]
        if not page["has_more"]:
            break
        cursor = page["next_cursor"]
    assert seen == list(reversed(ids))
    queued = await (await client.get("/v1/jobs?status=queued", headers=auth(key))).json()
    assert len(queued["data"]) == 5
    bad = await client.get("/v1/jobs?status=weird", headers=auth(key))
    assert bad.status == 422


async def test_cancel_a_queued_job(client: TestClient, key_factory: Any) -> None:
    key = await key_factory()
    job = await (await post_job(client, key, PY)).json()
    resp = await client.delete(f"/v1/jobs/{job['id']}", headers=auth(key))
    assert resp.status == 200
    canceled = await resp.json()
    assert canceled["status"] == "canceled"
    assert canceled["termination_reason"] == "canceled"
    again = await client.delete(f"/v1/jobs/{job['id']}", headers=auth(key))
    assert again.status == 409
    assert (await again.json())["error"]["code"] == "job_already_finished"


async def test_wait_returns_202_when_the_job_is_not_done(
    client: TestClient, key_factory: Any
) -> None:
    key = await key_factory()
    resp = await post_job(client, key, PY, params={"wait": "0.2"})
    assert resp.status == 202
    assert (await resp.json())["status"] == "queued"
    resp = await post_job(client, key, PY, params={"wait": "61"})
    assert resp.status == 422


async def test_service_endpoints(client: TestClient, key_factory: Any) -> None:
    assert (await (await client.get("/healthz")).json()) == {"status": "ok"}
    assert (await client.get("/readyz")).status == 200
    spec = await (await client.get("/openapi.json")).json()
    assert spec["openapi"].startswith("3.")
    assert "/v1/jobs" in spec["paths"]
    key = await key_factory()
    await post_job(client, key, PY)
    text = await (await client.get("/metrics")).text()
    assert 'bulkhead_jobs{status="queued"} 1' in text
    assert "bulkhead_queue_depth 1" in text
    assert 'bulkhead_job_duration_seconds_bucket{le="+Inf"} 0' in text
    missing = await client.get("/v1/nothing", headers=auth(key))
    assert missing.status == 404
    assert (await missing.json())["error"]["code"] == "not_found"


async def test_usage_and_account_shape(client: TestClient, key_factory: Any) -> None:
    key = await key_factory()
    usage = await (await client.get("/v1/usage", headers=auth(key))).json()
    assert usage["totals"]["sandbox_seconds"] == 0
    assert usage["quota"]["plan"] == "free"
    assert usage["quota"]["included_hours"] == 100.0
    csv = await (await client.get("/v1/usage?format=csv", headers=auth(key))).text()
    assert csv.splitlines()[0].startswith("start,sandbox_seconds")
    bad = await client.get("/v1/usage?from=2026-02-01&to=2026-01-01", headers=auth(key))
    assert bad.status == 422
    account = await (await client.get("/v1/account", headers=auth(key))).json()
    assert account["plan"] == "free" and account["quota"]["remaining_hours"] == 100.0


async def test_concurrent_admissions_share_batches_safely(
    client: TestClient, key_factory: Any, redis: Redis
) -> None:
    """Group commit: a racing Idempotency-Key in a batch fails only its own request."""
    key = await key_factory(plan="pro")  # 30 jobs in flight: over the free plan's 20
    same = [post_job(client, key, PY, headers={"Idempotency-Key": "race"}) for _ in range(10)]
    others = [post_job(client, key, {**PY, "code": f"print({i})"}) for i in range(20)]
    responses = await asyncio.gather(*same, *others)
    bodies = [await r.json() for r in responses]
    raced = {b["id"] for b in bodies[:10]}
    assert len(raced) == 1, bodies[:10]
    assert sorted(r.status for r in responses[:10]) == [200] * 9 + [202]
    assert all(r.status == 202 for r in responses[10:])
    assert len({b["id"] for b in bodies[10:]}) == 20
    assert await redis.zcard("bulkhead:test") == 21
