"""The aiohttp app and the :class:`FakeStripe` handle (start/close, faults, inspection)."""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import json
import logging
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from . import resources
from .errors import StripeError, api_error, authentication, invalid, unrecognized_url
from .faults import Fault, fault_error, parse_fault_spec, random_id
from .form import FormDecodeError, decode_form
from .state import IdempotencyEntry, RequestRecord, Store

log = logging.getLogger(__name__)

API_VERSION = "2026-10-28.endive"  # what stripe 16.1.0 sends
MAX_IDEMPOTENCY_KEY = 255
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
PARAMS = web.RequestKey("params", dict[str, Any])


def _json(body: Any, status: int = 200) -> web.Response:
    return web.json_response(body, status=status, dumps=lambda o: json.dumps(o, indent=2))


def _redact(key: str) -> str:
    if len(key) <= 12:
        return "*" * len(key)
    return key[:8] + "*" * (len(key) - 12) + key[-4:]


class FakeStripe:
    """A fake Stripe API on a real socket: ``url = await fake.start()``, ``await fake.close()``.

    ``secret_key`` (default: a fresh ``sk_test_…``) must come as ``Authorization: Bearer`` (or
    HTTP Basic, as ``curl -u key:`` sends). ``clock`` returns Unix seconds; pass your own to
    move time (identifier and idempotency windows, timestamp checks).

    Idempotency (POST only, keys kept 24 h): a 2xx answer is saved and replayed with
    ``Idempotent-Replayed: true`` and ``Original-Request``; another endpoint or other params
    with the key is a 400 ``idempotency_error``; a key still in flight is a 409. Error answers
    (validation and injected faults) are not saved, so a retry runs again — except that an
    ``after_apply`` fault saves the real answer first, so the retry gets the replay.
    ``/_fake/*`` needs no key and is not logged in :attr:`requests`.
    """

    def __init__(
        self,
        secret_key: str | None = None,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.secret_key = secret_key or random_id("sk_test_", 32)
        self.store = Store(clock)
        self.app = self._build_app()
        self.url: str | None = None
        self._runner: web.AppRunner | None = None
        self._thread: threading.Thread | None = None
        self._thread_loop: asyncio.AbstractEventLoop | None = None

    # -- lifecycle ------------------------------------------------------------------------

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        """Listen on ``host:port`` (0: a free port); returns the base URL."""
        if self._runner is not None:
            raise RuntimeError("FakeStripe already started")
        runner = web.AppRunner(self.app, access_log=None, shutdown_timeout=1.0)
        await runner.setup()
        site = web.TCPSite(runner, host, port)
        try:
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        bound_host, bound_port = runner.addresses[0][:2]
        self._runner = runner
        self.url = f"http://{bound_host}:{bound_port}"
        return self.url

    async def close(self) -> None:
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()

    def start_in_thread(self, host: str = "127.0.0.1", port: int = 0) -> str:
        """Serve from a background thread with its own event loop (for synchronous code)."""
        started: dict[str, Any] = {}
        ready = threading.Event()

        def serve() -> None:
            loop = asyncio.new_event_loop()
            self._thread_loop = loop
            try:
                started["url"] = loop.run_until_complete(self.start(host, port))
            except BaseException as exc:  # handed to the caller
                started["error"] = exc
                ready.set()
                loop.close()
                return
            ready.set()
            loop.run_forever()
            loop.run_until_complete(self.close())
            loop.close()

        self._thread = threading.Thread(target=serve, name="fake-stripe", daemon=True)
        self._thread.start()
        ready.wait()
        if "error" in started:
            raise started["error"]
        return str(started["url"])

    def stop_thread(self) -> None:
        if self._thread is None or self._thread_loop is None:
            return
        self._thread_loop.call_soon_threadsafe(self._thread_loop.stop)
        self._thread.join()
        self._thread = self._thread_loop = None

    # -- faults and inspection ------------------------------------------------------------

    def inject(
        self,
        status: int | None = 500,
        count: int = 1,
        delay_s: float = 0.0,
        path_prefix: str = "/v1/billing/meter_events",
        after_apply: bool = False,
        *,
        method: str | None = None,
        code: str | None = None,
        should_retry: bool | None = None,
        retry_after: int | None = None,
    ) -> Fault:
        """Fail the next ``count`` requests under ``path_prefix``; see :class:`Fault`."""
        fault = Fault(
            status=status,
            count=count,
            delay_s=delay_s,
            path_prefix=path_prefix,
            after_apply=after_apply,
            method=method,
            code=code,
            should_retry=should_retry,
            retry_after=retry_after,
        )
        self.store.faults.append(fault)
        return fault

    def clear_faults(self) -> None:
        self.store.faults.clear()

    def reset(self) -> None:
        """Forget every object, event, key, fault and logged request (keeps the secret key)."""
        self.store.reset()

    def create_customer(self, **params: Any) -> dict[str, Any]:
        """A customer made directly (params as the API takes them, e.g. ``email=``)."""
        return resources.create_customer(self.store, params)

    @property
    def customers(self) -> list[dict[str, Any]]:
        return list(self.store.customers.values())

    @property
    def meters(self) -> list[dict[str, Any]]:
        return list(self.store.meters.values())

    @property
    def meter_events(self) -> list[dict[str, Any]]:
        """Every accepted ``billing.meter_event`` object, in arrival order."""
        return [record.event for record in self.store.events]

    @property
    def requests(self) -> list[dict[str, Any]]:
        """Every ``/v1`` request: method, path, query, params, status, key, replayed, fault."""
        return [record.to_dict() for record in self.store.log]

    def totals(self) -> dict[tuple[str, str], int]:
        """Sum of meter event values per ``(customer, event_name)``."""
        return {(row["customer"], row["event_name"]): row["value"] for row in self.store.summary()}

    # -- the app --------------------------------------------------------------------------

    def _build_app(self) -> web.Application:
        app = web.Application(middlewares=[self._middleware])
        app.router.add_post("/v1/customers", self._create_customer)
        app.router.add_get("/v1/customers/{id}", self._retrieve_customer)
        app.router.add_post("/v1/billing/meters", self._create_meter)
        app.router.add_get("/v1/billing/meters", self._list_meters)
        app.router.add_get("/v1/billing/meters/{id}", self._retrieve_meter)
        app.router.add_post("/v1/billing/meter_events", self._create_meter_event)
        app.router.add_get("/_fake/meter_events", self._fake_meter_events)
        app.router.add_get("/_fake/summary", self._fake_summary)
        app.router.add_get("/_fake/requests", self._fake_requests)
        app.router.add_post("/_fake/reset", self._fake_reset)
        app.router.add_get("/_fake/faults", self._fake_faults)
        app.router.add_post("/_fake/faults", self._fake_add_fault)
        app.router.add_delete("/_fake/faults", self._fake_clear_faults)
        return app

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        request_id = random_id("req_", 14)
        if request.path.startswith("/_fake/"):
            try:
                response = await handler(request)
            except StripeError as exc:
                response = _json(exc.body(), exc.status)
            response.headers["Request-Id"] = request_id
            return response
        record = RequestRecord(
            id=request_id,
            method=request.method,
            path=request.path,
            query={},
            params={},
            status=0,
            time=self.store.clock(),
        )
        try:
            response = await self._serve_api(request, handler, record)
        except StripeError as exc:
            response = _json(exc.body(), exc.status)
            response.headers.update(exc.headers)
            record.error = exc.body()["error"]
        except Exception:
            log.exception("fake stripe: %s %s failed", request.method, request.path)
            failure = api_error()
            response = _json(failure.body(), failure.status)
            record.error = failure.body()["error"]
        response.headers["Request-Id"] = request_id
        response.headers["Stripe-Version"] = request.headers.get("Stripe-Version", API_VERSION)
        record.status = response.status
        self.store.log.append(record)
        return response

    async def _serve_api(
        self, request: web.Request, handler: Handler, record: RequestRecord
    ) -> web.StreamResponse:
        try:
            record.query = decode_form(request.query_string)
            body = await request.text() if request.can_read_body else ""
            content_type = request.content_type
            if body and content_type != "application/x-www-form-urlencoded":
                raise invalid(
                    f"Invalid request: unsupported Content-Type {content_type}. "
                    "Stripe's v1 API takes application/x-www-form-urlencoded bodies."
                )
            record.params = decode_form(body) if body else dict(record.query)
        except FormDecodeError as exc:
            raise invalid(str(exc), param=exc.param) from exc
        self._authenticate(request)
        request[PARAMS] = record.params

        fault = self.store.find_fault(request.method, request.path)
        slow_s = 0.0
        if fault is not None and not fault.after_apply:
            self.store.consume_fault(fault)
            record.fault = fault.id
            if fault.status is None:
                slow_s = fault.delay_s  # a slow request: keeps its idempotency key busy
            else:
                await asyncio.sleep(fault.delay_s)
                raise fault_error(fault)
            fault = None

        key = request.headers.get("Idempotency-Key") if request.method == "POST" else None
        response = await self._idempotent(request, handler, record, key, slow_s)

        if fault is not None and 200 <= response.status < 300 and fault.count > 0:
            self.store.consume_fault(fault)
            record.fault = fault.id
            await asyncio.sleep(fault.delay_s)
            raise fault_error(fault)
        return response

    def _authenticate(self, request: web.Request) -> None:
        header = request.headers.get("Authorization", "")
        key = ""
        scheme, _, credentials = header.partition(" ")
        if scheme.lower() == "bearer":
            key = credentials.strip()
        elif scheme.lower() == "basic":
            try:
                key = base64.b64decode(credentials.strip()).decode().partition(":")[0]
            except (binascii.Error, UnicodeDecodeError):
                key = ""
        if not key:
            raise authentication(
                "You did not provide an API key. You need to provide your API key in the "
                "Authorization header, using Bearer auth (e.g. 'Authorization: Bearer "
                "YOUR_SECRET_KEY'). See https://stripe.com/docs/api#authentication for "
                "details, or we can help at https://support.stripe.com/."
            )
        if not hmac.compare_digest(key.encode(), self.secret_key.encode()):
            raise authentication(f"Invalid API Key provided: {_redact(key)}")

    async def _idempotent(
        self,
        request: web.Request,
        handler: Handler,
        record: RequestRecord,
        key: str | None,
        slow_s: float,
    ) -> web.StreamResponse:
        if key is None:
            await asyncio.sleep(slow_s)
            return await self._run(request, handler)
        record.idempotency_key = key
        if len(key) > MAX_IDEMPOTENCY_KEY:
            raise invalid(
                f"Invalid Idempotency-Key: must be at most {MAX_IDEMPOTENCY_KEY} characters.",
                param="Idempotency-Key",
            )
        endpoint = f"{request.method} {request.path}"
        entry = self.store.idempotency_entry(key)
        if entry is not None:
            if entry.status == 0:
                raise StripeError(
                    409,
                    "idempotency_error",
                    "There is currently another in-progress request using this Idempotency "
                    "Key (that probably means you submitted twice, and the other request is "
                    "still going through): " + key + ". Please try again later.",
                    code="idempotency_key_in_use",
                )
            if f"{entry.method} {entry.path}" != endpoint:
                raise StripeError(
                    400,
                    "idempotency_error",
                    "Keys for idempotent requests can only be used for the same endpoint they "
                    f"were first used for ('{entry.method} {entry.path}' vs '{endpoint}'). "
                    f"Try using a key other than '{key}' if you meant to execute a different "
                    "request.",
                )
            if entry.params != record.params:
                raise StripeError(
                    400,
                    "idempotency_error",
                    "Keys for idempotent requests can only be used with the same parameters "
                    f"they were first used with. Try using a key other than '{key}' if you "
                    "meant to execute a different request.",
                )
            record.replayed = True
            replay = web.Response(
                body=entry.body, status=entry.status, content_type="application/json"
            )
            replay.headers["Idempotent-Replayed"] = "true"
            replay.headers["Original-Request"] = entry.request_id
            replay.headers["Idempotency-Key"] = key
            return replay

        entry = IdempotencyEntry(
            method=request.method,
            path=request.path,
            params=record.params,
            created=self.store.clock(),
            request_id=record.id,
        )
        self.store.start_idempotent(key, entry)
        try:
            await asyncio.sleep(slow_s)
            response = await self._run(request, handler)
        except BaseException:
            self.store.forget_idempotent(key)
            raise
        if (
            200 <= response.status < 300
            and isinstance(response, web.Response)
            and isinstance(response.body, bytes)
        ):
            # Like Stripe, only results of requests that ran are saved; errors are not.
            entry.status, entry.body = response.status, response.body
        else:
            self.store.forget_idempotent(key)
        response.headers["Idempotency-Key"] = key
        response.headers["Original-Request"] = record.id
        return response

    async def _run(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except (web.HTTPNotFound, web.HTTPMethodNotAllowed) as exc:
            raise unrecognized_url(request.method, request.path) from exc

    # -- /v1 handlers ---------------------------------------------------------------------

    async def _create_customer(self, request: web.Request) -> web.Response:
        return _json(resources.create_customer(self.store, request[PARAMS]))

    async def _retrieve_customer(self, request: web.Request) -> web.Response:
        return _json(resources.retrieve_customer(self.store, request.match_info["id"]))

    async def _create_meter(self, request: web.Request) -> web.Response:
        return _json(resources.create_meter(self.store, request[PARAMS]))

    async def _list_meters(self, request: web.Request) -> web.Response:
        return _json(resources.list_meters(self.store))

    async def _retrieve_meter(self, request: web.Request) -> web.Response:
        return _json(resources.retrieve_meter(self.store, request.match_info["id"]))

    async def _create_meter_event(self, request: web.Request) -> web.Response:
        return _json(resources.create_meter_event(self.store, request[PARAMS]))

    # -- /_fake handlers (no auth) --------------------------------------------------------

    async def _fake_meter_events(self, request: web.Request) -> web.Response:
        records = self.store.select_events(
            request.query.get("customer"), request.query.get("event_name")
        )
        return _json({"object": "list", "data": [record.event for record in records]})

    async def _fake_summary(self, request: web.Request) -> web.Response:
        return _json({"object": "list", "data": self.store.summary()})

    async def _fake_requests(self, request: web.Request) -> web.Response:
        return _json({"object": "list", "data": self.requests})

    async def _fake_reset(self, request: web.Request) -> web.Response:
        self.reset()
        return _json({"reset": True})

    async def _fake_faults(self, request: web.Request) -> web.Response:
        return _json({"object": "list", "data": [f.to_dict() for f in self.store.faults]})

    async def _fake_clear_faults(self, request: web.Request) -> web.Response:
        self.clear_faults()
        return _json({"object": "list", "data": []})

    async def _fake_add_fault(self, request: web.Request) -> web.Response:
        try:
            spec = await request.json()
        except ValueError as exc:
            raise invalid("The body must be a JSON object.") from exc
        spec = parse_fault_spec(spec)
        try:
            fault = self.inject(**spec)
        except ValueError as exc:
            raise invalid(str(exc)) from exc
        return _json(fault.to_dict())
