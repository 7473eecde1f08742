"""Held-open sandbox benchmarks (not a test), per isolation, next to floors of the same run.

    .venv/bin/python bench/sandbox_api.py [--n 50] [--mib 50] [--isolation namespace,microvm]

Starts ``bulkhead up`` in a temporary directory (SQLite, or BULKHEAD_DATABASE_URL) and
measures through the public API:

1. create → first command: ``POST /v1/sandboxes`` then ``POST …/commands {"cmd": "true"}``
   until its ``exit`` event (p50/p99), next to a bare ``bwrap … /bin/true`` (the floor);
   creates ``--gap`` seconds apart (the warm pool has refilled) and back to back (it has
   not: cold starts).
   DESIGN §5: sandbox ready p50 ≤ 30 ms on bwrap, ≤ 300 ms restored from a snapshot on qemu.
2. command round trip in an open sandbox (p50/p99), next to a bare fork+exec of /bin/true.
3. files: ``PUT`` then ``GET`` of a random file of ``--mib`` MiB (MB/s), next to writing
   and reading the same bytes to a local file.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import signal
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from jobs import BARE, free_port, make_key, pct, start_up, summary  # noqa: E402

BARE_TRUE = [*BARE[: BARE.index("--new-session") + 1], "/usr/bin/true"]


async def timed_process(argv: list[str]) -> float:
    started = time.perf_counter()
    proc = await asyncio.create_subprocess_exec(*argv)
    assert await proc.wait() == 0
    return (time.perf_counter() - started) * 1000


async def command(http: aiohttp.ClientSession, url: str, sid: str, cmd: str) -> dict:
    async with http.post(f"{url}/v1/sandboxes/{sid}/commands", json={"cmd": cmd}) as resp:
        assert resp.status == 200, await resp.text()
        lines = [json.loads(line) async for line in resp.content]
    assert lines[-1]["type"] == "exit", lines
    return lines[-1]


async def create(http: aiohttp.ClientSession, url: str, isolation: str) -> str:
    async with http.post(f"{url}/v1/sandboxes", json={"isolation": isolation}) as resp:
        body = await resp.json()
        if resp.status != 201:
            raise RuntimeError(f"cannot create a {isolation} sandbox: {body}")
    return str(body["id"])


async def ready_times(
    http: aiohttp.ClientSession, url: str, isolation: str, n: int, gap_s: float
) -> list[float]:
    """create → first command, ``gap_s`` apart (long enough for the warm pool to refill, or 0
    for back-to-back creates that outrun it)."""
    times = []
    for _ in range(n):
        started = time.perf_counter()
        sid = await create(http, url, isolation)
        await command(http, url, sid, "true")
        times.append((time.perf_counter() - started) * 1000)
        async with http.delete(f"{url}/v1/sandboxes/{sid}") as resp:
            assert resp.status == 200
        await asyncio.sleep(gap_s)
    return times


async def command_times(http: aiohttp.ClientSession, url: str, sid: str, n: int) -> list[float]:
    times = []
    for _ in range(n):
        started = time.perf_counter()
        await command(http, url, sid, "true")
        times.append((time.perf_counter() - started) * 1000)
    return times


async def file_rates(
    http: aiohttp.ClientSession, url: str, sid: str, data: bytes
) -> tuple[float, float]:
    files = f"{url}/v1/sandboxes/{sid}/files"
    started = time.perf_counter()
    async with http.put(files, params={"path": "bench.bin"}, data=data) as resp:
        assert resp.status == 201, await resp.text()
    write_s = time.perf_counter() - started
    started = time.perf_counter()
    size = 0
    async with http.get(files, params={"path": "bench.bin"}) as resp:
        async for chunk in resp.content.iter_chunked(1 << 20):
            size += len(chunk)
    read_s = time.perf_counter() - started
    assert size == len(data)
    mb = len(data) / 1e6
    return mb / write_s, mb / read_s


def local_rates(root: Path, data: bytes) -> tuple[float, float]:
    path = root / "bench-local.bin"
    started = time.perf_counter()
    with open(path, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    write_s = time.perf_counter() - started
    started = time.perf_counter()
    assert len(path.read_bytes()) == len(data)
    read_s = time.perf_counter() - started
    path.unlink()
    mb = len(data) / 1e6
    return mb / write_s, mb / read_s


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=50, help="samples per latency")
    parser.add_argument("--mib", type=int, default=50, help="file size for the files part")
    parser.add_argument("--isolation", default="namespace", help="comma list: namespace,microvm")
    parser.add_argument("--gap", type=float, default=1.0, help="seconds between creates")
    args = parser.parse_args()
    data = secrets.token_bytes(args.mib * 1024 * 1024)
    with tempfile.TemporaryDirectory(prefix="bulkhead-bench-") as tmp:
        root = Path(tmp)
        port = free_port()
        up = start_up(root, port)
        try:
            url = f"http://127.0.0.1:{port}"
            headers = {"Authorization": f"Bearer {make_key(root)}"}
            bare = [await timed_process(BARE_TRUE) for _ in range(args.n)]
            fork = [await timed_process(["/usr/bin/true"]) for _ in range(args.n)]
            local_w, local_r = local_rates(root, data)
            print(f"floor: bare bwrap /bin/true       {summary(bare)}")
            print(f"floor: fork+exec /bin/true        {summary(fork)}")
            print(f"floor: local file write {local_w:7.0f} MB/s, read {local_r:7.0f} MB/s")
            async with aiohttp.ClientSession(headers=headers) as http:
                for isolation in args.isolation.split(","):
                    try:
                        await ready_times(http, url, isolation, 2, 1.0)  # warm up
                    except RuntimeError as exc:
                        print(f"[{isolation}] skipped: {exc}")
                        continue
                    ready = await ready_times(http, url, isolation, args.n, args.gap)
                    burst = await ready_times(http, url, isolation, max(args.n // 3, 5), 0.0)
                    sid = await create(http, url, isolation)
                    await command(http, url, sid, "true")
                    rtt = await command_times(http, url, sid, args.n)
                    write, read = await file_rates(http, url, sid, data)
                    async with http.delete(f"{url}/v1/sandboxes/{sid}"):
                        pass
                    print(f"[{isolation}] create -> first command {summary(ready)}")
                    print(f"[{isolation}]   back to back        {summary(burst)}")
                    print(
                        f"[{isolation}]   ratio p50 {pct(ready, 50) / pct(bare, 50):.2f}x "
                        "bare bwrap (target: ready p50 <= 30 ms bwrap, <= 300 ms qemu)"
                    )
                    print(f"[{isolation}] command round trip     {summary(rtt)}")
                    print(
                        f"[{isolation}]   ratio p50 {pct(rtt, 50) / pct(fork, 50):.2f}x fork+exec"
                    )
                    print(
                        f"[{isolation}] files {args.mib} MiB: write {write:6.0f} MB/s "
                        f"({100 * write / local_w:.0f} % of local), read {read:6.0f} MB/s "
                        f"({100 * read / local_r:.0f} % of local)"
                    )
        finally:
            up.send_signal(signal.SIGTERM)
            up.wait(timeout=60)


if __name__ == "__main__":
    asyncio.run(main())
