"""HTTP routes of held-open sandboxes on the vmhost. Handlers only translate HTTP.

POST   /v1/sandboxes                         start one (idempotent by sandbox_id)
GET    /v1/sandboxes                         running ones and those ended in the last hour
GET    /v1/sandboxes/{sid}                   state, start, end, end reason
DELETE /v1/sandboxes/{sid}?reason=R          end it (idempotent): the real start and end
POST   /v1/sandboxes/{sid}/commands          foreground: NDJSON start/stdout/stderr/exit;
                                             background: 201 {pid}
GET    /v1/sandboxes/{sid}/commands          processes
GET    /v1/sandboxes/{sid}/commands/{pid}/output?offset=N   NDJSON replay + follow
POST   /v1/sandboxes/{sid}/commands/{pid}/stdin|signal
GET|PUT|DELETE /v1/sandboxes/{sid}/files?path=   GET …/files/list?path=&depth=
POST   /v1/sandboxes/{sid}/files/mkdir|move
POST   /v1/sandboxes/{sid}/code              NDJSON stdout/stderr/result/error/end
POST|GET /v1/sandboxes/{sid}/contexts, DELETE …/contexts/{cid}, POST …/{cid}/restart
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

from aiohttp import web

from vmhost.errors import InvalidRequest, NotFound
from vmhost.sandbox_schema import (
    parse_code,
    parse_command,
    parse_context,
    parse_json,
    parse_path_body,
    parse_sandbox,
    parse_stdin,
)
from vmhost.sandboxes.commands import parse_signal
from vmhost.sandboxes.files import FileError
from vmhost.sandboxes.manager import HeldSandbox, SandboxManager
from vmhost.settings import VmhostSettings

SANDBOXES = web.AppKey("sandboxes", SandboxManager)
CONFIG = web.AppKey("sandbox_settings", VmhostSettings)
NDJSON = {"Content-Type": "application/x-ndjson"}
END_REASONS = {"canceled", "timeout", "lifetime_exceeded", "quota_exceeded", "internal_error"}


def _held(request: web.Request) -> HeldSandbox:
    held = request.app[SANDBOXES].get(request.match_info["sid"])
    held.require_running()
    return held


async def _body(request: web.Request) -> Any:
    return parse_json(await request.read())


async def _stream(
    request: web.Request, events: AsyncIterator[dict[str, Any]]
) -> web.StreamResponse:
    response = web.StreamResponse(headers=NDJSON)
    await response.prepare(request)
    async for event in events:
        await response.write(json.dumps(event, separators=(",", ":")).encode() + b"\n")
    await response.write_eof()
    return response


def _settings(request: web.Request) -> VmhostSettings:
    return request.app[CONFIG]


# --- lifecycle -----------------------------------------------------------------
async def create_sandbox(request: web.Request) -> web.Response:
    spec = parse_sandbox(await _body(request), _settings(request))
    held, created = await request.app[SANDBOXES].create(spec)
    return web.json_response(held.describe(), status=201 if created else 200)


async def list_sandboxes(request: web.Request) -> web.Response:
    return web.json_response({"data": request.app[SANDBOXES].list()})


async def get_sandbox(request: web.Request) -> web.Response:
    return web.json_response(request.app[SANDBOXES].describe(request.match_info["sid"]))


async def delete_sandbox(request: web.Request) -> web.Response:
    reason = request.query.get("reason", "canceled")
    if reason not in END_REASONS:
        raise InvalidRequest(f"reason must be one of {', '.join(sorted(END_REASONS))}")
    record = await request.app[SANDBOXES].end(request.match_info["sid"], reason)
    return web.json_response(record)


# --- commands ------------------------------------------------------------------
async def run_command(request: web.Request) -> web.StreamResponse:
    held = _held(request)
    req = parse_command(await _body(request))
    command = await held.run_command(
        req.cmd, req.cwd, req.env, req.stdin, req.timeout_s, req.background,
        _settings(request).command_buffer_bytes,
    )  # fmt: skip
    if req.background:
        return web.json_response(command.describe(), status=201)

    async def events() -> AsyncIterator[dict[str, Any]]:
        yield {"type": "start", "pid": command.pid}
        async for event in command.follow(0):
            yield event

    return await _stream(request, events())


async def list_commands(request: web.Request) -> web.Response:
    held = _held(request)
    return web.json_response({"data": [c.describe() for c in held.commands.values()]})


def _pid(request: web.Request) -> int:
    try:
        return int(request.match_info["pid"])
    except ValueError:
        raise NotFound("process ids are integers") from None


async def command_output(request: web.Request) -> web.StreamResponse:
    command = _held(request).command(_pid(request))
    try:
        offset = int(request.query.get("offset", "0"))
    except ValueError:
        raise InvalidRequest("offset must be an integer (the next seq to receive)") from None
    if offset < 0:
        raise InvalidRequest("offset must not be negative")
    return await _stream(request, command.follow(offset))


async def command_stdin(request: web.Request) -> web.Response:
    command = _held(request).command(_pid(request))
    data, eof = parse_stdin(await _body(request))
    await command.send_stdin(data, eof)
    return web.Response(status=204)


async def command_signal(request: web.Request) -> web.Response:
    command = _held(request).command(_pid(request))
    body = await _body(request)
    if not isinstance(body, dict) or set(body) != {"signal"}:
        raise InvalidRequest('the body must be {"signal": "SIGTERM"} (a name or a number)')
    try:
        signum = parse_signal(body["signal"])
    except ValueError as exc:
        raise InvalidRequest(str(exc)) from None
    await command.signal(signum)
    return web.Response(status=204)


# --- files ---------------------------------------------------------------------
def _path(request: web.Request) -> str:
    path = request.query.get("path")
    if not path:
        raise InvalidRequest("the path query parameter is required")
    return path


async def read_file(request: web.Request) -> web.StreamResponse:
    held = _held(request)
    chunks = held.files.read(_path(request))
    first = await anext(chunks, b"")  # errors (404, not a file) before the 200 is sent
    info = await held.files.stat(_path(request), follow=True)
    response = web.StreamResponse(
        headers={"Content-Type": "application/octet-stream", "Content-Length": str(info["size"])}
    )
    await response.prepare(request)
    await response.write(first)
    async for chunk in chunks:
        await response.write(chunk)
    await response.write_eof()
    return response


async def write_file(request: web.Request) -> web.Response:
    held = _held(request)
    cap = _settings(request).max_upload_bytes
    if request.content_length is not None and request.content_length > cap:
        raise FileError(413, "file_too_large", f"files are limited to {cap} bytes")

    async def body() -> AsyncIterator[bytes]:
        total = 0
        async for chunk in request.content.iter_chunked(1024 * 1024):
            total += len(chunk)
            if total > cap:
                raise FileError(413, "file_too_large", f"files are limited to {cap} bytes")
            yield chunk

    await held.files.write(_path(request), body(), None)
    return web.json_response(await held.files.stat(_path(request)), status=201)


async def delete_file(request: web.Request) -> web.Response:
    await _held(request).files.remove(_path(request))
    return web.Response(status=204)


async def list_files(request: web.Request) -> web.Response:
    try:
        depth = int(request.query.get("depth", "1"))
    except ValueError:
        raise InvalidRequest("depth must be an integer") from None
    entries = await _held(request).files.list(request.query.get("path", "."), depth)
    return web.json_response({"data": entries})


async def make_dir(request: web.Request) -> web.Response:
    (path,) = parse_path_body(await _body(request), ("path",))
    return web.json_response(await _held(request).files.mkdir(path), status=201)


async def move_file(request: web.Request) -> web.Response:
    source, destination = parse_path_body(await _body(request), ("source", "destination"))
    return web.json_response(await _held(request).files.move(source, destination))


# --- code interpreter ----------------------------------------------------------
async def run_code(request: web.Request) -> web.StreamResponse:
    held = _held(request)
    code, language, context_id, timeout_s = parse_code(await _body(request))
    interpreter = held.interpreter
    if context_id is not None:
        context = interpreter.get(context_id)
    else:
        context = await interpreter.default(language or "python")
    return await _stream(request, interpreter.run(context, code, timeout_s))


async def create_context(request: web.Request) -> web.Response:
    language, cwd = parse_context(await _body(request))
    held = _held(request)
    context = await held.interpreter.create(language, held.files.resolve(cwd) if cwd else None)
    return web.json_response(context.describe(), status=201)


async def list_contexts(request: web.Request) -> web.Response:
    contexts = _held(request).interpreter.contexts.values()
    return web.json_response({"data": [c.describe() for c in contexts]})


async def delete_context(request: web.Request) -> web.Response:
    await _held(request).interpreter.delete(request.match_info["cid"])
    return web.Response(status=204)


async def restart_context(request: web.Request) -> web.Response:
    context = await _held(request).interpreter.restart(request.match_info["cid"])
    return web.json_response(context.describe())


def add_routes(app: web.Application) -> None:
    r = app.router
    base = "/v1/sandboxes/{sid}"
    r.add_post("/v1/sandboxes", create_sandbox)
    r.add_get("/v1/sandboxes", list_sandboxes)
    r.add_get(base, get_sandbox)
    r.add_delete(base, delete_sandbox)
    r.add_post(f"{base}/commands", run_command)
    r.add_get(f"{base}/commands", list_commands)
    r.add_get(f"{base}/commands/{{pid}}/output", command_output)
    r.add_post(f"{base}/commands/{{pid}}/stdin", command_stdin)
    r.add_post(f"{base}/commands/{{pid}}/signal", command_signal)
    r.add_get(f"{base}/files", read_file)
    r.add_put(f"{base}/files", write_file)
    r.add_delete(f"{base}/files", delete_file)
    r.add_get(f"{base}/files/list", list_files)
    r.add_post(f"{base}/files/mkdir", make_dir)
    r.add_post(f"{base}/files/move", move_file)
    r.add_post(f"{base}/code", run_code)
    r.add_post(f"{base}/contexts", create_context)
    r.add_get(f"{base}/contexts", list_contexts)
    r.add_delete(f"{base}/contexts/{{cid}}", delete_context)
    r.add_post(f"{base}/contexts/{{cid}}/restart", restart_context)
