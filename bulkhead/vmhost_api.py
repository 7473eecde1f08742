"""Client of the vmhosts' held-open sandbox API, shared by the gateway and the workers.

The gateway creates sandboxes and proxies commands, files and code to the vmhost that holds
each one; the workers' reaper ends them and reconciles with what the vmhosts report.
Errors the vmhost answers with (4xx) are returned as ``VmhostReply`` for the caller to relay;
a vmhost that cannot be reached, or answers 5xx, raises ``VmhostDown``.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import aiohttp

from bulkhead import telemetry

CONNECT_TIMEOUT_S = 5.0
CONTROL_TIMEOUT_S = 120.0  # create (a cold microVM start) and end (cleanup)


class VmhostDown(Exception):
    def __init__(self, url: str, message: str, code: str = "vmhost_unavailable") -> None:
        super().__init__(f"{url}: {message}")
        self.url = url
        self.message = message
        self.code = code  # the vmhost's own error code when it answered one


@dataclass(frozen=True)
class VmhostReply:
    status: int
    body: dict[str, Any]

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300

    @property
    def error(self) -> dict[str, str]:
        error = self.body.get("error") if isinstance(self.body, dict) else None
        if isinstance(error, dict):
            return {"code": str(error.get("code")), "message": str(error.get("message"))}
        return {"code": "vmhost_error", "message": f"vmhost answered HTTP {self.status}"}


def parse_time(value: Any) -> datetime | None:
    """An ISO time the vmhost sent (``…Z``), or None when absent."""
    if not isinstance(value, str) or not value:
        return None
    return datetime.fromisoformat(value.replace("Z", "+00:00")).astimezone(UTC)


class VmhostClient:
    def __init__(self, urls: list[str], token: str) -> None:
        self.urls = [u.rstrip("/") for u in urls]
        self._next = itertools.cycle(range(max(len(self.urls), 1)))
        self.headers = {"Authorization": f"Bearer {token}"}
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=CONNECT_TIMEOUT_S)
        self._session = aiohttp.ClientSession(timeout=timeout, headers=self.headers)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    @property
    def session(self) -> aiohttp.ClientSession:
        assert self._session is not None, "VmhostClient.start() was not awaited"
        return self._session

    def candidates(self) -> list[str]:
        """The vmhost URLs in the order to try them (round robin over calls)."""
        if not self.urls:
            return []
        first = next(self._next)
        return self.urls[first:] + self.urls[:first]

    async def call(
        self, method: str, url: str, path: str, json: Any = None, params: Any = None
    ) -> VmhostReply:
        timeout = aiohttp.ClientTimeout(total=CONTROL_TIMEOUT_S, sock_connect=CONNECT_TIMEOUT_S)
        try:
            async with self.session.request(
                method, f"{url}{path}", json=json, params=params, headers=telemetry.inject(),
                timeout=timeout,
            ) as resp:  # fmt: skip
                try:
                    body = await resp.json(content_type=None)
                except ValueError:
                    body = {}
                if resp.status >= 500:
                    error = VmhostReply(resp.status, body).error
                    raise VmhostDown(url, f"HTTP {resp.status}: {error['message']}", error["code"])
                return VmhostReply(resp.status, body if isinstance(body, dict) else {})
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise VmhostDown(url, f"unreachable: {exc or type(exc).__name__}") from exc

    async def end(self, url: str, sandbox_id: str, reason: str) -> dict[str, Any] | None:
        """End the sandbox; its record, or None when the vmhost does not know it."""
        reply = await self.call(
            "DELETE", url, f"/v1/sandboxes/{sandbox_id}", params={"reason": reason}
        )
        if reply.status == 404:
            return None
        if not reply.ok:
            raise VmhostDown(url, f"HTTP {reply.status}: {reply.error['message']}")
        return reply.body

    async def list(self, url: str) -> list[dict[str, Any]]:
        reply = await self.call("GET", url, "/v1/sandboxes")
        data = reply.body.get("data", [])
        return data if isinstance(data, list) else []
