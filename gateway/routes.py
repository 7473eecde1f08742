"""HTTP handlers: each turns a request into a typed call and the result into JSON."""

from __future__ import annotations

import json
from pathlib import Path

from aiohttp import web

from billing import usage
from billing.accounts import create_account_key
from bulkhead import keys
from bulkhead.metrics import DURATION_KEY, render_histogram
from bulkhead.models import JOB_STATUSES, utcnow
from gateway import schemas
from gateway.context import DB, JOBS, KEY, REDIS, SETTINGS
from gateway.errors import Unavailable, Unprocessable

OPENAPI_PATH = Path(__file__).with_name("openapi.json")
MAX_PAGE = 100


def _float_param(request: web.Request, name: str, default: float) -> float:
    raw = request.query.get(name)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError as exc:
        raise Unprocessable(f"query parameter {name} must be a number") from exc
    if value < 0:
        raise Unprocessable(f"query parameter {name} must not be negative")
    return value


def page_limit(request: web.Request) -> int:
    try:
        limit = int(request.query.get("limit", "20"))
    except ValueError as exc:
        raise Unprocessable("limit must be an integer") from exc
    if not 1 <= limit <= MAX_PAGE:
        raise Unprocessable(f"limit must be between 1 and {MAX_PAGE}")
    return limit


async def create_job(request: web.Request) -> web.Response:
    settings = request.app[SETTINGS]
    wait_s = _float_param(request, "wait", 0.0)
    if wait_s > settings.max_wait_s:
        raise Unprocessable(f"wait must be at most {settings.max_wait_s:g} seconds")
    raw = await request.read()
    req = schemas.parse(schemas.JobCreate, raw)
    service = request.app[JOBS]
    key = request[KEY]
    job, created = await service.create(
        key, req, request.headers.get("Idempotency-Key"), schemas.body_hash(raw)
    )
    if "wait" in request.query:
        job = await service.wait(key, job, wait_s)
        finished = job.finished_at is not None
        return web.json_response(job.public(), status=200 if finished else 202)
    return web.json_response(job.public(), status=202 if created else 200)


async def get_job(request: web.Request) -> web.Response:
    service = request.app[JOBS]
    job = await service.get(request[KEY], request.match_info["job_id"])
    if "wait" in request.query:
        wait_s = min(_float_param(request, "wait", 0.0), request.app[SETTINGS].max_wait_s)
        job = await service.wait(request[KEY], job, wait_s)
    return web.json_response(job.public())


async def list_jobs(request: web.Request) -> web.Response:
    status = request.query.get("status")
    if status is not None and status not in JOB_STATUSES:
        raise Unprocessable(f"status must be one of {', '.join(JOB_STATUSES)}")
    limit = page_limit(request)
    page = await request.app[JOBS].page(request[KEY], status, limit, request.query.get("cursor"))
    return web.json_response(page.public())


async def cancel_job(request: web.Request) -> web.Response:
    job = await request.app[JOBS].cancel(request[KEY], request.match_info["job_id"])
    return web.json_response(job.public())


async def list_deliveries(request: web.Request) -> web.Response:
    rows = await request.app[JOBS].deliveries(request[KEY], request.match_info["job_id"])
    return web.json_response({"object": "list", "data": rows})


async def redeliver(request: web.Request) -> web.Response:
    event = await request.app[JOBS].redeliver(request[KEY], request.match_info["job_id"])
    return web.json_response({"event_id": event.id, "status": "queued"}, status=202)


async def get_usage(request: web.Request) -> web.Response:
    now = utcnow()
    period = usage.parse_range(request.query.get("from"), request.query.get("to"), now)
    fmt = request.query.get("format", "json")
    if fmt not in ("json", "csv"):
        raise Unprocessable("format must be json or csv")
    key = request[KEY]
    plan = request.app[SETTINGS].plans.get(key.plan)
    report = await usage.report(
        request.app[DB], key, plan, period, request.query.get("granularity", "day"), now
    )
    if fmt == "csv":
        return web.Response(text=usage.to_csv(report), content_type="text/csv")
    return web.json_response(report)


async def get_account(request: web.Request) -> web.Response:
    key = request[KEY]
    plan = request.app[SETTINGS].plans.get(key.plan)
    quota = await usage.quota(request.app[DB], key, plan, utcnow())
    return web.json_response({"object": "account", **key.public(), "quota": quota})


async def admin_list_keys(request: web.Request) -> web.Response:
    rows = await keys.list_keys(request.app[DB])
    return web.json_response({"object": "list", "data": [r.public() for r in rows]})


async def admin_create_key(request: web.Request) -> web.Response:
    req = schemas.parse(schemas.KeyCreate, await request.read())
    created = await create_account_key(
        request.app[DB], request.app[SETTINGS].plans, req.name, req.plan, req.stripe_customer_id
    )
    return web.json_response(created.public(), status=201)


async def admin_update_key(request: web.Request) -> web.Response:
    req = schemas.parse(schemas.KeyUpdate, await request.read())
    row = await keys.link_stripe_customer(
        request.app[DB], request.match_info["key_id"], req.stripe_customer_id
    )
    return web.json_response(row.public())


async def put_account_webhook(request: web.Request) -> web.Response:
    req = schemas.parse(schemas.AccountWebhook, await request.read())
    row = await keys.set_webhook_url(request.app[DB], request[KEY].id, req.url)
    return web.json_response({"object": "account", **row.public()})


async def list_usage_records(request: web.Request) -> web.Response:
    limit = page_limit(request)
    page = await usage.records(request.app[DB], request[KEY], limit, request.query.get("cursor"))
    return web.json_response(page)


async def admin_revoke_key(request: web.Request) -> web.Response:
    row = await keys.revoke_key(request.app[DB], request.match_info["key_id"])
    await keys.announce_revocation(request.app[REDIS])
    return web.json_response(row.public())


async def healthz(_request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    try:
        await request.app[DB].ping()
        await request.app[REDIS].ping()
    except Exception as exc:
        raise Unavailable(f"not ready: {type(exc).__name__}: {exc}") from exc
    return web.json_response({"status": "ready"})


async def metrics(request: web.Request) -> web.Response:
    counts = await request.app[JOBS].counts_by_status()
    redis = request.app[REDIS]
    depth = await redis.zcard(request.app[SETTINGS].common.queue_name)
    lines = ["# HELP bulkhead_jobs Jobs in the database by status.", "# TYPE bulkhead_jobs gauge"]
    lines += [f'bulkhead_jobs{{status="{s}"}} {counts.get(s, 0)}' for s in JOB_STATUSES]
    lines += [
        "# HELP bulkhead_queue_depth arq jobs waiting in the queue (incl. deferred retries).",
        "# TYPE bulkhead_queue_depth gauge",
        f"bulkhead_queue_depth {depth}",
    ]
    raw: dict[bytes, bytes] = await redis.hgetall(DURATION_KEY)  # type: ignore[misc]
    lines += render_histogram(
        "bulkhead_job_duration_seconds", "Sandbox run time of finished jobs.", raw
    )
    return web.Response(
        text="\n".join(lines) + "\n",
        content_type="text/plain",
        headers={"X-Content-Format": "prometheus-0.0.4"},
    )


async def openapi(_request: web.Request) -> web.Response:
    return web.json_response(json.loads(OPENAPI_PATH.read_text()))


def add_routes(app: web.Application) -> None:
    app.router.add_post("/v1/jobs", create_job)
    app.router.add_get("/v1/jobs", list_jobs)
    app.router.add_get("/v1/jobs/{job_id}", get_job)
    app.router.add_delete("/v1/jobs/{job_id}", cancel_job)
    app.router.add_get("/v1/jobs/{job_id}/deliveries", list_deliveries)
    app.router.add_post("/v1/jobs/{job_id}/redeliver", redeliver)
    app.router.add_get("/v1/usage", get_usage)
    app.router.add_get("/v1/usage/sandboxes", list_usage_records)
    app.router.add_get("/v1/account", get_account)
    app.router.add_put("/v1/account/webhook", put_account_webhook)
    app.router.add_get("/v1/admin/keys", admin_list_keys)
    app.router.add_post("/v1/admin/keys", admin_create_key)
    app.router.add_delete("/v1/admin/keys/{key_id}", admin_revoke_key)
    app.router.add_patch("/v1/admin/keys/{key_id}", admin_update_key)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/openapi.json", openapi)
