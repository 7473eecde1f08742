"""The gateway's aiohttp application: resources, middlewares and the process entry point."""

from __future__ import annotations

import asyncio
import hmac
import logging
from collections.abc import Awaitable, Callable

from aiohttp import web
from arq.connections import RedisSettings, create_pool
from opentelemetry import trace

from bulkhead import telemetry
from bulkhead.db import Database
from bulkhead.errors import BulkheadError, TooLarge
from bulkhead.vmhost_api import VmhostClient
from gateway import errors, routes, sandbox_routes
from gateway.batcher import JobBatcher
from gateway.context import DB, JOBS, KEY, KEYS, REDIS, SANDBOXES, SETTINGS
from gateway.jobs import JobService
from gateway.keycache import KeyCache
from gateway.sandboxes import SandboxService
from gateway.settings import GatewaySettings
from gateway.subscriber import Subscriber
from gateway.waiter import JobWaiter

log = logging.getLogger("bulkhead.gateway")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

PUBLIC_PATHS = frozenset({"/healthz", "/readyz", "/metrics", "/openapi.json"})
HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 413: "payload_too_large"}


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except errors.ApiError as exc:
        return web.json_response(exc.body(), status=exc.status)
    except TooLarge as exc:
        return web.json_response(errors.PayloadTooLarge(exc.message, exc.code).body(), status=413)
    except BulkheadError as exc:
        err = errors.from_domain(exc)
        return web.json_response(err.body(), status=err.status)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = HTTP_CODES.get(exc.status, "http_error")
        body = {"error": {"code": code, "message": exc.reason}}
        return web.json_response(body, status=exc.status)
    except ConnectionResetError:  # the client went away mid-request; nobody reads this
        body = {"error": {"code": "client_disconnected", "message": "connection lost"}}
        return web.json_response(body, status=400)
    except asyncio.CancelledError:
        raise
    except Exception:
        log.exception("unhandled error on %s %s", request.method, request.path)
        body = {"error": {"code": "internal_error", "message": "internal error"}}
        return web.json_response(body, status=500)


@web.middleware
async def trace_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    ctx = telemetry.extract(request.headers)
    route = request.match_info.route.resource
    name = f"{request.method} {route.canonical if route is not None else request.path}"
    span_kind = trace.SpanKind.SERVER
    with telemetry.tracer("bulkhead.gateway").start_as_current_span(
        name, context=ctx, kind=span_kind
    ):
        return await handler(request)


@web.middleware
async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    if request.path in PUBLIC_PATHS:
        return await handler(request)
    if request.path.startswith("/v1/admin/"):
        token = request.app[SETTINGS].admin_token
        given = _bearer(request)
        if token is None:
            raise errors.NotFoundError("the admin API is off (set BULKHEAD_ADMIN_TOKEN)")
        if given is None or not hmac.compare_digest(given.encode(), token.encode()):
            raise errors.Unauthorized("a valid admin token is required")
        return await handler(request)
    secret = _bearer(request) or request.headers.get("X-API-Key")
    if not secret:
        raise errors.Unauthorized("missing API key: send 'Authorization: Bearer bk_…'")
    key = await request.app[KEYS].authenticate(secret.strip())
    if key is None:
        raise errors.Unauthorized("invalid or revoked API key")
    request[KEY] = key
    return await handler(request)


def _bearer(request: web.Request) -> str | None:
    header = request.headers.get("Authorization", "")
    if header[:7].lower() == "bearer ":
        return header[7:].strip()
    return None


def create_app(settings: GatewaySettings) -> web.Application:
    app = web.Application(
        client_max_size=settings.max_body_bytes,
        middlewares=[error_middleware, trace_middleware, auth_middleware],
    )
    app[SETTINGS] = settings
    app.cleanup_ctx.append(_resources)
    routes.add_routes(app)
    sandbox_routes.add_routes(app)
    return app


async def _resources(app: web.Application):  # type: ignore[no-untyped-def]
    settings = app[SETTINGS]
    db = Database(settings.common.database_url)
    await db.migrate()
    redis = await create_pool(
        RedisSettings.from_dsn(settings.common.redis_url),
        default_queue_name=settings.common.queue_name,
    )
    subscriber = Subscriber(redis)
    waiter = JobWaiter(subscriber)
    app[KEYS] = KeyCache(db, redis)
    await subscriber.start()
    app[DB] = db
    app[REDIS] = redis
    batcher = JobBatcher(db)
    await batcher.start()
    app[JOBS] = JobService(settings, db, redis, waiter, batcher)
    vmhosts = VmhostClient(settings.vmhost_urls, settings.vmhost_token or "")
    await vmhosts.start()
    app[SANDBOXES] = SandboxService(settings, db, redis, vmhosts)
    yield
    await vmhosts.close()
    await batcher.close()
    await subscriber.close()
    await redis.aclose()
    await db.close()


def run(settings: GatewaySettings) -> None:
    """Serve the gateway until SIGINT/SIGTERM."""
    provider = telemetry.setup_tracing("gateway")
    web.run_app(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        access_log=None,
        print=lambda *_: log.info("gateway on http://%s:%s", settings.host, settings.port),
    )
    if provider is not None:
        provider.shutdown()
