"""The vmhost HTTP API (aiohttp). Handlers only translate HTTP <-> typed driver calls.

    GET    /healthz                 {"status": "ok"}                       (no auth)
    GET    /v1/info                 driver, drivers, languages, cgroups, active_runs
    POST   /v1/runs                 NDJSON stream: started, stdout/stderr..., result
    DELETE /v1/runs/{run_id}        cancel a run (204; 404 not_found)
    /v1/sandboxes...                held-open sandboxes (see vmhost/sandbox_routes.py)

Every /v1 route needs ``Authorization: Bearer <BULKHEAD_VMHOST_TOKEN>``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import signal
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any

from aiohttp import web
from opentelemetry import propagate, trace

from vmhost import sandbox_routes
from vmhost.drivers import ISOLATIONS, Driver, Drivers, select_drivers
from vmhost.drivers.base import isoformat
from vmhost.errors import InvalidRequest, NotFound, Unauthorized, VmhostError
from vmhost.registry import RunRegistry
from vmhost.sandboxes.manager import SandboxManager
from vmhost.schema import parse_run_request
from vmhost.settings import VmhostSettings

log = logging.getLogger("vmhost.app")

SETTINGS = web.AppKey("settings", VmhostSettings)
DRIVER = web.AppKey("driver", Driver)  # the default driver
DRIVERS = web.AppKey("drivers", Drivers)
RUNS = web.AppKey("runs", RunRegistry)
TRACER = web.AppKey("tracer", trace.Tracer)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def error_response(status: int, code: str, message: str) -> web.Response:
    return web.json_response({"error": {"code": code, "message": message}}, status=status)


@web.middleware
async def errors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        if request.path.startswith("/v1/"):
            expected = request.app[SETTINGS].token.encode()
            given = request.headers.get("Authorization", "").encode()
            if not hmac.compare_digest(given, b"Bearer " + expected):
                raise Unauthorized("missing or wrong bearer token")
        return await handler(request)
    except VmhostError as exc:
        return error_response(exc.http_status, exc.code, exc.message)
    except web.HTTPRequestEntityTooLarge as exc:
        return error_response(413, "request_too_large", exc.text or "request body too large")
    except web.HTTPNotFound:
        return error_response(404, "not_found", f"no route for {request.path}")
    except web.HTTPMethodNotAllowed:
        return error_response(405, "method_not_allowed", f"{request.method} is not allowed here")


class NdjsonStream:
    """A RunSink writing NDJSON lines to the streaming HTTP response."""

    def __init__(self, request: web.Request, run_id: str) -> None:
        self.request = request
        self.run_id = run_id
        self.response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})

    async def send(self, line: dict[str, Any]) -> None:
        await self.response.write(json.dumps(line, separators=(",", ":")).encode() + b"\n")

    async def started(self, started_at: datetime) -> None:
        await self.response.prepare(self.request)
        await self.send(
            {"type": "started", "run_id": self.run_id, "started_at": isoformat(started_at)}
        )

    async def output(self, stream: str, text: str) -> None:
        await self.send({"type": stream, "data": text})


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def info(request: web.Request) -> web.Response:
    driver = request.app[DRIVER]
    drivers = request.app[DRIVERS]
    return web.json_response(
        {
            "driver": driver.name,
            "drivers": drivers.describe(),
            "languages": driver.languages(),
            "cgroups": driver.cgroups,
            "active_runs": len(request.app[RUNS]),
            "active_sandboxes": request.app[sandbox_routes.SANDBOXES].running,
            "warm_pool_ready": sum(d.warm_ready() for d in drivers.values()),
        }
    )


async def create_run(request: web.Request) -> web.StreamResponse:
    try:
        body = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InvalidRequest(f"the body is not valid JSON: {exc}") from exc
    spec = parse_run_request(body, request.app[SETTINGS])
    driver = await _driver_for(request.app[DRIVERS], spec.isolation)
    runs = request.app[RUNS]
    cancel = runs.reserve(spec.run_id)
    context = propagate.extract(request.headers)
    tracer = request.app[TRACER]
    try:
        with tracer.start_as_current_span(
            "vmhost.run",
            context=context,
            kind=trace.SpanKind.SERVER,
            attributes={"bulkhead.run_id": spec.run_id, "bulkhead.driver": driver.name},
        ) as span:
            stream = NdjsonStream(request, spec.run_id)
            result = await driver.run(spec, stream, cancel)
            span.set_attribute("bulkhead.termination_reason", result.outcome.termination_reason)
            await stream.send(result.to_dict())
            await stream.response.write_eof()
            return stream.response
    finally:
        runs.release(spec.run_id)


async def _driver_for(drivers: Drivers, isolation: str) -> Driver:
    try:
        return await drivers.use(isolation)
    except KeyError:
        reason = drivers.reasons.get(isolation, "not configured")
        raise InvalidRequest(
            f"isolation {isolation!r} is not available on this vmhost: {reason} "
            "(see `bulkhead doctor`)",
            "isolation_unavailable",
        ) from None


async def delete_run(request: web.Request) -> web.Response:
    run_id = request.match_info["run_id"]
    if not request.app[RUNS].cancel(run_id):
        raise NotFound(f"no active run {run_id!r}")
    return web.Response(status=204)


def create_app(settings: VmhostSettings, driver: Driver | None = None) -> web.Application:
    """Build the application (starting the configured driver unless one is given)."""
    app = web.Application(
        middlewares=[errors_middleware], client_max_size=settings.max_request_bytes
    )
    app[SETTINGS] = settings
    if driver is not None:  # tests: exactly this driver
        isolation = {name: iso for iso, name in ISOLATIONS.items()}.get(driver.name, "namespace")
        app[DRIVERS] = Drivers({isolation: driver}, driver, {})
    else:
        app[DRIVERS] = select_drivers(settings)
    app[DRIVER] = app[DRIVERS].default
    app[RUNS] = RunRegistry(settings.max_runs)
    app[TRACER] = trace.get_tracer("bulkhead.vmhost")
    app[sandbox_routes.CONFIG] = settings
    app[sandbox_routes.SANDBOXES] = SandboxManager(app[DRIVERS], settings.max_sandboxes)
    sandbox_routes.add_routes(app)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/v1/info", info)
    app.router.add_post("/v1/runs", create_run)
    app.router.add_delete("/v1/runs/{run_id}", delete_run)

    async def startup(app: web.Application) -> None:
        await app[DRIVERS].start()

    app.on_startup.append(startup)

    async def shutdown(app: web.Application) -> None:
        app[RUNS].cancel_all()
        await app[sandbox_routes.SANDBOXES].close()
        await app[DRIVERS].close()

    app.on_shutdown.append(shutdown)
    return app


async def serve(
    settings: VmhostSettings,
    host: str = "127.0.0.1",
    port: int = 8700,
    stop: asyncio.Event | None = None,
) -> None:
    """Serve until ``stop`` is set (or forever); sandboxes die with their requests."""
    app = create_app(settings)
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
        log.info("vmhost listening on %s:%s (driver %s)", host, port, app[DRIVER].name)
        await (stop or asyncio.Event()).wait()
    finally:
        await runner.cleanup()


def run(settings: VmhostSettings, host: str = "127.0.0.1", port: int = 8700) -> None:
    """Blocking entry point; SIGINT/SIGTERM shut down cleanly (killing active sandboxes)."""

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError):
                loop.add_signal_handler(signum, stop.set)
        await serve(settings, host, port, stop)

    asyncio.run(main())
