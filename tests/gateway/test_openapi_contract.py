"""Real responses checked against gateway/openapi.json (the contract is a file in the repo)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from aiohttp.test_utils import TestClient
from jsonschema import Draft202012Validator

from tests.gateway.conftest import auth

SPEC = json.loads((Path(__file__).parents[2] / "gateway" / "openapi.json").read_text())


def check(path: str, method: str, status: int, body: Any) -> None:
    """Validate ``body`` against the documented response of (path, method, status)."""
    responses = SPEC["paths"][path][method]["responses"]
    assert str(status) in responses, f"{method.upper()} {path} does not document {status}"
    response = responses[str(status)]
    if "$ref" in response:
        response = SPEC["components"]["responses"][response["$ref"].rsplit("/", 1)[1]]
    schema = response.get("content", {}).get("application/json", {}).get("schema")
    if schema is None:
        return
    validator = Draft202012Validator({**schema, "components": SPEC["components"]})
    errors = [e.message for e in validator.iter_errors(body)]
    assert not errors, (method, path, status, errors)


async def test_responses_follow_the_spec(client: TestClient, key_factory: Any) -> None:
    key = await key_factory()
    body = {"language": "python", "code": "print(1)", "metadata": {"a": "b"}}
    resp = await client.post("/v1/jobs", json=body, headers=auth(key))
    job = await resp.json()
    check("/v1/jobs", "post", resp.status, job)
    resp = await client.get(f"/v1/jobs/{job['id']}", headers=auth(key))
    check("/v1/jobs/{job_id}", "get", resp.status, await resp.json())
    resp = await client.get("/v1/jobs?limit=1", headers=auth(key))
    check("/v1/jobs", "get", resp.status, await resp.json())
    resp = await client.get(f"/v1/jobs/{job['id']}/deliveries", headers=auth(key))
    check("/v1/jobs/{job_id}/deliveries", "get", resp.status, await resp.json())
    resp = await client.delete(f"/v1/jobs/{job['id']}", headers=auth(key))
    check("/v1/jobs/{job_id}", "delete", resp.status, await resp.json())
    resp = await client.get("/v1/usage", headers=auth(key))
    check("/v1/usage", "get", resp.status, await resp.json())
    for method, path, spec_path, payload in (
        ("post", "/v1/jobs", "/v1/jobs", {"nope": 1}),
        ("get", "/v1/jobs/job_missing", "/v1/jobs/{job_id}", None),
        ("get", "/v1/jobs?limit=0", "/v1/jobs", None),
    ):
        resp = await client.request(method, path, json=payload, headers=auth(key))
        check(spec_path, method, resp.status, await resp.json())
    resp = await client.get("/v1/jobs")
    check("/v1/jobs", "get", resp.status, await resp.json())
