"""Held-open sandboxes checked against gateway/openapi.json, through a real vmhost (bwrap).

Lifecycle answers come from the gateway, the rest is relayed unchanged from the vmhost; both
are validated against the documented schemas (NDJSON streams line by line). The relay is one
regex route on the gateway, so the documented concrete paths are also checked against the
vmhost's real routes.
"""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import ClientResponse, web
from aiohttp.test_utils import TestClient, TestServer
from jsonschema import Draft202012Validator

from bulkhead.keys import CreatedKey
from bulkhead.models import SANDBOX_STATES, TERMINATION_REASONS
from gateway.app import create_app
from gateway.settings import GatewaySettings
from tests.gateway.conftest import auth, make_settings
from tests.gateway.test_openapi_contract import SPEC, check
from tests.vmhost.conftest import TOKEN, Vmhost, _serve, bwrap_skip_reason
from vmhost import sandbox_routes as vmhost_sandbox_routes
from vmhost.sandboxes.commands import SIGNALS
from vmhost.settings import VmhostSettings

SBX = "/v1/sandboxes/{sandbox_id}"
METHODS = {"get", "put", "post", "delete", "patch", "head", "options", "trace"}


@pytest.fixture
async def vmhost() -> AsyncIterator[Vmhost]:
    reason = bwrap_skip_reason()
    if reason:
        pytest.skip(reason)
    env = {
        "BULKHEAD_VMHOST_TOKEN": TOKEN,
        "BULKHEAD_VMHOST_WORK_DIR": f"/var/lib/bulkhead/vmhost-test-{secrets.token_hex(4)}",
        "BULKHEAD_SANDBOX_POOL": "0",
    }
    async for host in _serve(VmhostSettings.from_env(env)):
        yield host


@pytest.fixture
async def client(
    database_url: str, redis_url: str, redis: Any, vmhost: Vmhost
) -> AsyncIterator[TestClient]:
    """The gateway (overrides conftest's ``client``) with sandboxes on the test vmhost."""
    settings = make_settings(database_url, redis_url, vmhost_urls=[vmhost.url], vmhost_token=TOKEN)
    async with TestClient(TestServer(create_app(settings))) as test_client:
        yield test_client


def line_validator(path: str, method: str, status: int = 200) -> Draft202012Validator:
    """The documented schema of ONE line of an ``application/x-ndjson`` answer."""
    content = SPEC["paths"][path][method]["responses"][str(status)]["content"]
    schema = content["application/x-ndjson"]["schema"]
    return Draft202012Validator({**schema, "components": SPEC["components"]})


async def ndjson(resp: ClientResponse, path: str, method: str) -> list[dict[str, Any]]:
    """Read an NDJSON answer, validating each line against the spec."""
    assert resp.status == 200, await resp.text()
    assert resp.content_type == "application/x-ndjson"
    validator = line_validator(path, method)
    lines: list[dict[str, Any]] = []
    async for raw in resp.content:
        line = json.loads(raw)
        errors = [e.message for e in validator.iter_errors(line)]
        assert not errors, (method, path, line, errors)
        lines.append(line)
    return lines


def documented_fields(schema: str) -> set[str]:
    return set(SPEC["components"]["schemas"][schema]["properties"])


async def create(client: TestClient, key: CreatedKey, **body: Any) -> dict[str, Any]:
    resp = await client.post("/v1/sandboxes", json=body, headers=auth(key))
    sandbox: dict[str, Any] = await resp.json()
    assert resp.status == 201, sandbox
    check("/v1/sandboxes", "post", 201, sandbox)
    return sandbox


async def test_lifecycle_follows_the_spec(client: TestClient, key_factory: Any) -> None:
    key, other = await key_factory(), await key_factory("other")
    body = {"metadata": {"suite": "contract"}, "env": {"GREETING": "hi"}, "timeout_s": 120}
    idem = {**auth(key), "Idempotency-Key": secrets.token_hex(8)}
    resp = await client.post("/v1/sandboxes", json=body, headers=idem)
    sandbox = await resp.json()
    assert resp.status == 201, sandbox
    check("/v1/sandboxes", "post", 201, sandbox)
    assert set(sandbox) == documented_fields("Sandbox"), "Sandbox.public() and the spec differ"
    assert sandbox["state"] == "running" and sandbox["env_keys"] == ["GREETING"]
    sid = sandbox["id"]

    resp = await client.post("/v1/sandboxes", json=body, headers=idem)
    assert resp.status == 200
    repeat = await resp.json()
    check("/v1/sandboxes", "post", 200, repeat)
    assert repeat["id"] == sid
    resp = await client.post("/v1/sandboxes", json={**body, "timeout_s": 60}, headers=idem)
    assert resp.status == 409
    check("/v1/sandboxes", "post", 409, await resp.json())

    resp = await client.get(f"/v1/sandboxes/{sid}", headers=auth(key))
    assert resp.status == 200
    check(SBX, "get", 200, await resp.json())
    query = "state=running&limit=1&metadata[suite]=contract"
    resp = await client.get(f"/v1/sandboxes?{query}", headers=auth(key))
    listing = await resp.json()
    check("/v1/sandboxes", "get", resp.status, listing)
    assert [s["id"] for s in listing["data"]] == [sid] and listing["has_more"] is False

    resp = await client.post(
        f"/v1/sandboxes/{sid}/timeout", json={"timeout_s": 600}, headers=auth(key)
    )
    extended = await resp.json()
    assert resp.status == 200, extended
    check(f"{SBX}/timeout", "post", 200, extended)
    assert sandbox["expires_at"] < extended["expires_at"] <= extended["lifetime_ends_at"]

    Case = tuple[str, str, str, Any]  # method, path, documented path, JSON body
    invalid: list[Case] = [
        ("post", "/v1/sandboxes", "/v1/sandboxes", {"nope": 1}),
        ("post", "/v1/sandboxes", "/v1/sandboxes", {"limits": {"vcpus": 99}}),
        ("post", f"/v1/sandboxes/{sid}/timeout", f"{SBX}/timeout", {"timeout_s": 1, "x": 1}),
        ("post", f"/v1/sandboxes/{sid}/commands", f"{SBX}/commands", {"cmd": "id", "x": 1}),
        ("get", "/v1/sandboxes?state=paused", "/v1/sandboxes", None),
        ("get", "/v1/sandboxes?owner=me", "/v1/sandboxes", None),
    ]
    for method, path, spec_path, payload in invalid:
        resp = await client.request(method, path, json=payload, headers=auth(key))
        error = await resp.json()
        assert resp.status == 422, (path, payload, error)
        check(spec_path, method, 422, error)
    resp = await client.post("/v1/sandboxes", json={"nope": 1}, headers=auth(key))
    assert "unknown field 'nope'" in (await resp.json())["error"]["message"]

    # another tenant's sandbox does not exist for them, relayed paths included
    foreign: list[Case] = [
        ("get", f"/v1/sandboxes/{sid}", SBX, None),
        ("delete", f"/v1/sandboxes/{sid}", SBX, None),
        ("post", f"/v1/sandboxes/{sid}/timeout", f"{SBX}/timeout", {"timeout_s": 10}),
        ("post", f"/v1/sandboxes/{sid}/commands", f"{SBX}/commands", {"cmd": "id"}),
        ("get", f"/v1/sandboxes/{sid}/files?path=x", f"{SBX}/files", None),
    ]
    for method, path, spec_path, payload in foreign:
        resp = await client.request(method, path, json=payload, headers=auth(other))
        error = await resp.json()
        assert resp.status == 404, (method, path, error)
        assert error["error"]["code"] == "not_found"
        check(spec_path, method, 404, error)
    resp = await client.get("/v1/sandboxes", headers=auth(other))
    check("/v1/sandboxes", "get", resp.status, await resp.json())
    resp = await client.get("/v1/sandboxes")
    assert resp.status == 401
    check("/v1/sandboxes", "get", 401, await resp.json())

    resp = await client.delete(f"/v1/sandboxes/{sid}", headers=auth(key))
    ended = await resp.json()
    assert resp.status == 200, ended
    check(SBX, "delete", 200, ended)
    assert ended["state"] == "ended" and ended["termination_reason"] == "canceled"
    resp = await client.delete(f"/v1/sandboxes/{sid}", headers=auth(key))
    assert resp.status == 200 and await resp.json() == ended
    after_end: list[Case] = [
        ("post", f"/v1/sandboxes/{sid}/timeout", f"{SBX}/timeout", {"timeout_s": 10}),
        ("post", f"/v1/sandboxes/{sid}/commands", f"{SBX}/commands", {"cmd": "id"}),
        ("post", f"/v1/sandboxes/{sid}/code", f"{SBX}/code", {"code": "1"}),
    ]
    for method, path, spec_path, payload in after_end:
        resp = await client.request(method, path, json=payload, headers=auth(key))
        error = await resp.json()
        assert resp.status == 409 and error["error"]["code"] == "sandbox_not_running", error
        check(spec_path, method, 409, error)


async def test_relayed_endpoints_follow_the_spec(client: TestClient, key_factory: Any) -> None:
    key = await key_factory()
    sid = (await create(client, key))["id"]
    base = f"/v1/sandboxes/{sid}"
    headers = auth(key)

    # commands: a foreground stream, a background process, stdin, signals, replay
    cmd = "echo out; echo err >&2; exit 3"
    resp = await client.post(f"{base}/commands", json={"cmd": cmd}, headers=headers)
    lines = await ndjson(resp, f"{SBX}/commands", "post")
    assert len(lines) == 4 and lines[0]["type"] == "start" and lines[-1]["type"] == "exit"
    assert lines[-1]["exit_code"] == 3 and lines[-1]["pid"] == lines[0]["pid"]
    assert {(e["type"], e["data"]) for e in lines[1:-1]} == {
        ("stdout", "out\n"),
        ("stderr", "err\n"),
    }

    resp = await client.post(
        f"{base}/commands", json={"cmd": "cat", "background": True}, headers=headers
    )
    process = await resp.json()
    assert resp.status == 201, process
    check(f"{SBX}/commands", "post", 201, process)
    pid = process["pid"]
    resp = await client.post(
        f"{base}/commands/{pid}/stdin", json={"data": "typed\n", "eof": True}, headers=headers
    )
    assert resp.status == 204, await resp.text()
    resp = await client.get(f"{base}/commands/{pid}/output?offset=0", headers=headers)
    lines = await ndjson(resp, f"{SBX}/commands/{{pid}}/output", "get")
    assert lines == [
        {"type": "stdout", "data": "typed\n", "seq": 0},
        {**lines[-1], "type": "exit", "exit_code": 0},
    ]
    resp = await client.post(f"{base}/commands/{pid}/stdin", json={"data": "late"}, headers=headers)
    assert resp.status == 422
    check(f"{SBX}/commands/{{pid}}/stdin", "post", 422, await resp.json())

    resp = await client.post(
        f"{base}/commands", json={"cmd": "sleep 30", "background": True}, headers=headers
    )
    sleeper = (await resp.json())["pid"]
    resp = await client.post(
        f"{base}/commands/{sleeper}/signal", json={"signal": "term"}, headers=headers
    )
    assert resp.status == 204, await resp.text()
    resp = await client.get(f"{base}/commands/{sleeper}/output", headers=headers)
    lines = await ndjson(resp, f"{SBX}/commands/{{pid}}/output", "get")
    assert lines[-1]["signal"] == 15 or lines[-1]["exit_code"] == 143, lines
    resp = await client.get(f"{base}/commands", headers=headers)
    processes = await resp.json()
    check(f"{SBX}/commands", "get", resp.status, processes)
    assert {p["pid"] for p in processes["data"]} >= {pid, sleeper}
    resp = await client.get(f"{base}/commands/999999/output", headers=headers)
    assert resp.status == 404
    check(f"{SBX}/commands/{{pid}}/output", "get", 404, await resp.json())

    # files
    files = f"{base}/files"
    resp = await client.put(f"{files}?path=docs/a.txt", data=b"hello\n", headers=headers)
    entry = await resp.json()
    assert resp.status == 201, entry
    check(f"{SBX}/files", "put", 201, entry)
    assert entry["path"] == "/home/user/docs/a.txt" and entry["size"] == 6
    assert set(entry) == documented_fields("FileEntry")
    resp = await client.get(f"{files}?path=docs/a.txt", headers=headers)
    assert resp.status == 200 and resp.content_type == "application/octet-stream"
    assert await resp.read() == b"hello\n"
    resp = await client.post(f"{files}/mkdir", json={"path": "docs/sub"}, headers=headers)
    assert resp.status == 201
    check(f"{SBX}/files/mkdir", "post", 201, await resp.json())
    move = {"source": "docs/a.txt", "destination": "docs/sub/b.txt"}
    resp = await client.post(f"{files}/move", json=move, headers=headers)
    assert resp.status == 200
    check(f"{SBX}/files/move", "post", 200, await resp.json())
    resp = await client.get(f"{files}/list?path=docs&depth=2", headers=headers)
    listing = await resp.json()
    check(f"{SBX}/files/list", "get", resp.status, listing)
    assert [(e["path"], e["type"]) for e in listing["data"]] == [
        ("/home/user/docs/sub", "dir"),
        ("/home/user/docs/sub/b.txt", "file"),
    ]
    resp = await client.delete(f"{files}?path=docs", headers=headers)
    assert resp.status == 204
    resp = await client.get(f"{files}?path=docs/sub/b.txt", headers=headers)
    assert resp.status == 404
    check(f"{SBX}/files", "get", 404, await resp.json())
    resp = await client.get(files, headers=headers)
    assert resp.status == 422
    check(f"{SBX}/files", "get", 422, await resp.json())

    # code: a cell's stream, contexts
    resp = await client.post(
        f"{base}/code", json={"code": "x = 6\nprint('hi')\nx * 7"}, headers=headers
    )
    lines = await ndjson(resp, f"{SBX}/code", "post")
    assert "".join(e["text"] for e in lines if e["type"] == "stdout") == "hi\n"
    assert [e["type"] for e in lines if e["type"] != "stdout"] == ["result", "end"], lines
    assert lines[-2]["data"]["text/plain"] == "42" and lines[-2]["is_main_result"] is True
    resp = await client.post(f"{base}/code", json={"code": "1 / x"}, headers=headers)
    lines = await ndjson(resp, f"{SBX}/code", "post")
    assert lines[-1] == {"type": "end", "execution_count": 2}
    resp = await client.post(f"{base}/code", json={"code": "1 / 0"}, headers=headers)
    lines = await ndjson(resp, f"{SBX}/code", "post")
    assert [e["type"] for e in lines] == ["error", "end"] and lines[0]["traceback"]
    resp = await client.post(f"{base}/contexts", json={"language": "python"}, headers=headers)
    context = await resp.json()
    assert resp.status == 201, context
    check(f"{SBX}/contexts", "post", 201, context)
    resp = await client.get(f"{base}/contexts", headers=headers)
    contexts = await resp.json()
    check(f"{SBX}/contexts", "get", resp.status, contexts)
    assert context["id"] in [c["id"] for c in contexts["data"]]
    restart = f"{base}/contexts/{context['id']}/restart"
    resp = await client.post(restart, headers=headers)
    assert resp.status == 200
    check(f"{SBX}/contexts/{{context_id}}/restart", "post", 200, await resp.json())
    resp = await client.delete(f"{base}/contexts/{context['id']}", headers=headers)
    assert resp.status == 204
    resp = await client.post(
        f"{base}/code", json={"code": "1", "context_id": context["id"]}, headers=headers
    )
    assert resp.status == 404
    check(f"{SBX}/code", "post", 404, await resp.json())


def _sample(path: str) -> str:
    """A path template with every ``{param}`` filled in, to match against route regexes."""
    return re.sub(r"\{[^}]+\}", "x", path)


def _routes(app: web.Application) -> list[tuple[str, str, re.Pattern[str] | None]]:
    """(method, canonical path, the route's regex when it has one) of ``app``."""
    found = []
    for route in app.router.routes():
        if route.resource is None or route.method == "HEAD":
            continue
        pattern = route.resource.get_info().get("pattern")
        found.append((route.method.lower(), route.resource.canonical, pattern))
    return found


def _relay_patterns() -> dict[str, re.Pattern[str]]:
    """The gateway relay's regex route, by method."""
    app = create_app(GatewaySettings.from_env({}))
    return {m: pattern for m, path, pattern in _routes(app) if pattern and "{tail}" in path}


DOCUMENTED = {(m, p) for p, item in SPEC["paths"].items() for m in item if m in METHODS}


def test_every_route_is_documented_with_the_relay_expanded() -> None:
    """Like test_every_route_is_documented, but the relay's regex route stands for the
    concrete paths it serves: every documented path it matches, for its methods."""
    routes: set[tuple[str, str]] = set()
    for method, canonical, pattern in _routes(create_app(GatewaySettings.from_env({}))):
        if pattern is None or "{tail}" not in canonical:
            routes.add((method, canonical))
            continue
        served = {(m, p) for m, p in DOCUMENTED if m == method and pattern.fullmatch(_sample(p))}
        assert served, f"nothing documented for the relay's {method.upper()} {canonical}"
        routes |= served
    assert routes == DOCUMENTED


def test_relayed_paths_are_the_vmhost_routes() -> None:
    """What the relay forwards and the spec documents is exactly what the vmhost serves."""
    relay = _relay_patterns()

    def relayed(pairs: set[tuple[str, str]]) -> set[tuple[str, str]]:
        return {
            (m, re.sub(r"\{[^}]+\}", "{}", p))
            for m, p in pairs
            if m in relay and relay[m].fullmatch(_sample(p))
        }

    app = web.Application()
    vmhost_sandbox_routes.add_routes(app)
    vmhost = relayed({(m, p) for m, p, _ in _routes(app)})
    assert vmhost and relayed(DOCUMENTED) == vmhost


def test_enums_follow_the_code() -> None:
    props = SPEC["components"]["schemas"]["Sandbox"]["properties"]
    assert props["state"]["enum"] == list(SANDBOX_STATES)
    assert props["termination_reason"]["enum"] == [*TERMINATION_REASONS, None]
    signal = SPEC["components"]["schemas"]["SignalSend"]["properties"]["signal"]
    assert signal["oneOf"][1]["enum"] == sorted(SIGNALS.values())


def test_spec_refs_resolve_and_schemas_are_valid() -> None:
    """Every ``$ref`` points somewhere and every component schema is valid JSON Schema."""
    refs: list[str] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            refs.extend(v for k, v in node.items() if k == "$ref")
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(SPEC)
    for ref in refs:
        node: Any = SPEC
        for part in ref.removeprefix("#/").split("/"):
            assert isinstance(node, dict) and part in node, f"dangling $ref {ref}"
            node = node[part]
    for schema in SPEC["components"]["schemas"].values():
        Draft202012Validator.check_schema(schema)
