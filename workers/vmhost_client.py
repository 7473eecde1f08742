"""Client for the vmhost HTTP API (``POST /v1/runs`` streams NDJSON, ``DELETE`` kills).

Runs are spread round-robin over ``BULKHEAD_VMHOST_URLS``; a vmhost that refuses the
connection is skipped for the next one. Dropping the stream kills the run on the vmhost.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

import aiohttp

from bulkhead import telemetry
from bulkhead.vmhost_api import VmhostClient
from workers.errors import VmhostRejected, VmhostUnavailable


class VmhostPool(VmhostClient):
    """The shared vmhost client (session, round robin, the sandbox calls the reaper makes)
    plus one-shot runs."""

    def __init__(self, urls: list[str], token: str) -> None:
        if not urls:
            raise ValueError("at least one vmhost URL is needed")
        super().__init__(urls, token)

    async def run(
        self, spec: dict[str, Any], on_host: Callable[[str], None], retry_for_s: float = 20.0
    ) -> tuple[str, dict[str, Any]]:
        """Run ``spec`` on a vmhost; returns (vmhost url, final result event).

        ``on_host`` is told which vmhost is being tried, so the caller can kill the run there.
        While no vmhost answers (starting, restarting), tries again with backoff for
        ``retry_for_s`` seconds before giving up with VmhostUnavailable.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + retry_for_s
        delay = 0.1
        while True:
            errors: list[str] = []
            for _ in range(len(self.urls)):
                url = self.urls[next(self._next)]
                on_host(url)
                try:
                    return url, await self._run_on(url, spec)
                except VmhostUnavailable as exc:
                    errors.append(f"{url}: {exc.message}")
            if loop.time() + delay > deadline:
                raise VmhostUnavailable("; ".join(errors))
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)

    async def _run_on(self, url: str, spec: dict[str, Any]) -> dict[str, Any]:
        headers = telemetry.inject()
        try:
            async with self.session.post(f"{url}/v1/runs", json=spec, headers=headers) as resp:
                if resp.status >= 500:
                    raise VmhostUnavailable(f"HTTP {resp.status}: {await resp.text()}")
                if resp.status != 200:
                    body = await resp.text()
                    raise VmhostRejected(f"vmhost refused the run: HTTP {resp.status}: {body}")
                result: dict[str, Any] | None = None
                async for line in resp.content:
                    if not line.strip():
                        continue
                    event = json.loads(line)
                    if event.get("type") == "result":
                        result = event
        except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, TimeoutError) as exc:
            raise VmhostUnavailable(f"{type(exc).__name__}: {exc}") from exc
        if result is None:
            raise VmhostUnavailable("the run's stream ended without a result")
        return result

    async def kill(self, url: str, run_id: str) -> None:
        try:
            async with self.session.delete(f"{url}/v1/runs/{run_id}") as resp:
                await resp.read()
        except aiohttp.ClientError:
            pass  # the run ends anyway when our stream is dropped
