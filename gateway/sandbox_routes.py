"""HTTP handlers of held-open sandboxes: lifecycle here, the rest relayed to the vmhost.

Lifecycle requests (create, list, get, delete, timeout) are served from the database by
``SandboxService``. Commands, files and code run on the vmhost holding the sandbox: after
the ownership check the request is relayed there and the answer streamed back unchanged
(NDJSON event streams chunk by chunk, file bodies in both directions without buffering).
The vmhost validates those bodies and answers errors in the same ``{"error": …}`` shape.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web

from bulkhead import telemetry
from gateway import schemas
from gateway.context import KEY, SANDBOXES, SETTINGS
from gateway.errors import NotFoundError, Unavailable, Unprocessable
from gateway.routes import page_limit

STATES = ("starting", "running", "ended")
METADATA_PARAM = re.compile(r"^metadata\[(.{1,64})\]$")
RELAYED_HEADERS = ("Content-Type", "Content-Length")


async def create_sandbox(request: web.Request) -> web.Response:
    raw = await request.read()
    req = schemas.parse(schemas.SandboxCreate, raw)
    row, created = await request.app[SANDBOXES].create(
        request[KEY], req, request.headers.get("Idempotency-Key"), schemas.body_hash(raw)
    )
    return web.json_response(row.public(), status=201 if created else 200)


async def list_sandboxes(request: web.Request) -> web.Response:
    state = request.query.get("state")
    if state is not None and state not in STATES:
        raise Unprocessable(f"state must be one of {', '.join(STATES)}")
    metadata: dict[str, str] = {}
    for name, value in request.query.items():
        match = METADATA_PARAM.match(name)
        if match:
            metadata[match.group(1)] = value
        elif name not in ("state", "limit", "cursor"):
            raise Unprocessable(f"unknown query parameter {name!r}")
    limit = page_limit(request)
    rows, cursor = await request.app[SANDBOXES].list(
        request[KEY], state, metadata, limit, request.query.get("cursor")
    )
    return web.json_response(
        {"data": [r.public() for r in rows], "next_cursor": cursor, "has_more": cursor is not None}
    )


async def get_sandbox(request: web.Request) -> web.Response:
    row = await request.app[SANDBOXES].get(request[KEY], request.match_info["sandbox_id"])
    return web.json_response(row.public())


async def delete_sandbox(request: web.Request) -> web.Response:
    row = await request.app[SANDBOXES].delete(request[KEY], request.match_info["sandbox_id"])
    return web.json_response(row.public())


async def set_timeout(request: web.Request) -> web.Response:
    req = schemas.parse(schemas.SandboxTimeout, await request.read())
    if req.timeout_s > request.app[SETTINGS].max_timeout_s:
        raise Unprocessable(
            f"timeout_s must be at most {request.app[SETTINGS].max_timeout_s:g} seconds"
        )
    row = await request.app[SANDBOXES].set_timeout(
        request[KEY], request.match_info["sandbox_id"], req.timeout_s
    )
    return web.json_response(row.public())


async def relay(request: web.Request) -> web.StreamResponse:
    """Pass a commands/files/code/contexts request to the sandbox's vmhost."""
    service = request.app[SANDBOXES]
    sandbox_id = request.match_info["sandbox_id"]
    tail = request.match_info["tail"]
    if any(part in ("", ".", "..") for part in tail.split("/")):
        raise NotFoundError(f"no route for {request.path}")
    row = await service.running(request[KEY], sandbox_id)
    assert row.vmhost_url is not None
    target = f"{row.vmhost_url}/v1/sandboxes/{sandbox_id}/{tail}"
    data: AsyncIterator[bytes] | bytes | None
    if request.method == "PUT":
        data = _body_stream(request)
    else:
        data = await request.read()
    headers = {
        "Content-Type": request.headers.get("Content-Type", "application/json"),
        **telemetry.inject(),  # the vmhost continues this request's trace
    }
    if request.content_length is not None and request.method == "PUT":
        headers["Content-Length"] = str(request.content_length)
    try:
        async with service.vmhosts.session.request(
            request.method, target, params=request.query, data=data, headers=headers
        ) as upstream:
            if upstream.status >= 500:
                text = await upstream.text()
                raise Unavailable(f"the sandbox's vmhost failed: {text[:500]}", "vmhost_error")
            response = web.StreamResponse(status=upstream.status)
            for name in RELAYED_HEADERS:
                if name in upstream.headers:
                    response.headers[name] = upstream.headers[name]
            await response.prepare(request)
            async for chunk in upstream.content.iter_any():
                await response.write(chunk)
            await response.write_eof()
            return response
    except aiohttp.ClientError as exc:
        raise Unavailable(
            f"the sandbox's vmhost cannot be reached: {exc}", "vmhost_unavailable"
        ) from exc


async def _body_stream(request: web.Request) -> AsyncIterator[bytes]:
    async for chunk in request.content.iter_chunked(1024 * 1024):
        yield chunk


def add_routes(app: web.Application) -> None:
    r = app.router
    r.add_post("/v1/sandboxes", create_sandbox)
    r.add_get("/v1/sandboxes", list_sandboxes)
    r.add_get("/v1/sandboxes/{sandbox_id}", get_sandbox)
    r.add_delete("/v1/sandboxes/{sandbox_id}", delete_sandbox)
    r.add_post("/v1/sandboxes/{sandbox_id}/timeout", set_timeout)
    tail = "/v1/sandboxes/{sandbox_id}/{tail:(commands|files|code|contexts).*}"
    for method in ("GET", "POST", "PUT", "DELETE"):
        r.add_route(method, tail, relay)
