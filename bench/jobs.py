"""Job benchmarks (not a test): numbers next to floors measured in the same run.

    .venv/bin/python bench/jobs.py [--n 100] [--burst 200] [--seconds 10] [--parts …]

Runs on the default SQLite file, or on PostgreSQL when BULKHEAD_DATABASE_URL is set.

1. Round trip: ``POST /v1/jobs?wait=30`` of ``print(1)`` (p50/p99), next to a bare
   ``bwrap … /usr/bin/python3 -c 'print(1)'`` run in the same way (ratio).
2. Throughput: a burst of trivial jobs, jobs/s until all ended, next to bare bwrap runs/s at
   the same parallelism.
3. Admission: ``POST /v1/jobs`` (no wait) req/s with wrk, next to a bare aiohttp hello-world
   measured with the same wrk settings. This uses a second gateway on a queue no worker
   reads, so the admitted jobs are not run.

4. Webhook latency: from a job's ``finished_at`` to its signed webhook reaching a receiver
   on loopback.

DESIGN §5 targets: p50 ≤ 4× and p99 ≤ 10× the bare run; throughput ≥ 60 % of bare runs/s;
admission ≥ 20 % of the hello-world; webhook ≤ 50 ms p50 after the job finishes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import aiohttp
from aiohttp import web

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent / "bulkhead"
PYTHON = os.path.realpath("/usr/bin/python3")
BARE = [
    "bwrap",
    "--ro-bind",
    "/usr",
    "/usr",
    "--symlink",
    "usr/lib",
    "/lib",
    "--symlink",
    "usr/lib64",
    "/lib64",
    "--symlink",
    "usr/bin",
    "/bin",
    "--proc",
    "/proc",
    "--dev",
    "/dev",
    "--tmpfs",
    "/tmp",
    "--unshare-all",
    "--die-with-parent",
    "--new-session",
    PYTHON,
    "-c",
    "print(1)",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))]


def summary(values: list[float]) -> str:
    return f"p50 {pct(values, 50):7.1f} ms   p99 {pct(values, 99):7.1f} ms   (n={len(values)})"


async def bare_run() -> float:
    started = time.perf_counter()
    proc = await asyncio.create_subprocess_exec(*BARE, stdout=asyncio.subprocess.PIPE)
    out, _ = await proc.communicate()
    assert out == b"1\n", out
    return (time.perf_counter() - started) * 1000


# A burst of hundreds of jobs is over the free plan's 20 concurrent: benchmark on a plan
# without limits.
BENCH_PLANS = '{"free": {"included_hours": 100}, "bench": {"included_hours": null}}'


def clean_env() -> dict[str, str]:
    """The caller's environment without BULKHEAD_* settings, but for the database URL."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("BULKHEAD_")}
    env["BULKHEAD_PLANS"] = BENCH_PLANS
    if os.environ.get("BULKHEAD_DATABASE_URL"):
        env["BULKHEAD_DATABASE_URL"] = os.environ["BULKHEAD_DATABASE_URL"]
    return env


def start_up(root: Path, port: int) -> subprocess.Popen[bytes]:
    env = clean_env()
    env["BULKHEAD_LOG_LEVEL"] = "WARNING"
    env["BULKHEAD_WEBHOOK_ALLOW_PRIVATE"] = "1"  # the receiver below is on loopback
    log = open(root / "up.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        [str(BIN), "up", "--port", str(port)],
        cwd=root,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 90
    while not (root / ".bulkhead" / "up.json").exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit("bulkhead up did not start:\n" + (root / "up.log").read_text())
        time.sleep(0.1)
    return proc


def make_key(root: Path) -> str:
    env = clean_env()
    out = subprocess.run(
        [str(BIN), "keys", "create", "--name", "bench", "--plan", "bench", "--json"],
        cwd=root,
        env=env,
        check=True,
        capture_output=True,
        text=True,
    )
    return str(json.loads(out.stdout)["key"])


async def round_trips(url: str, key: str, n: int) -> list[float]:
    times = []
    headers = {"Authorization": f"Bearer {key}"}
    body = {"language": "python", "code": "print(1)"}
    async with aiohttp.ClientSession(headers=headers) as http:
        for _ in range(n):
            started = time.perf_counter()
            async with http.post(f"{url}/v1/jobs?wait=30", json=body) as resp:
                job = await resp.json()
            times.append((time.perf_counter() - started) * 1000)
            assert job["stdout"] == "1\n", job
    return times


async def webhook_latency(url: str, key: str, n: int) -> list[float]:
    """ms from a job's finished_at to its signed webhook arriving at a loopback receiver."""
    lags: list[float] = []
    got = asyncio.Event()

    async def receive(request: web.Request) -> web.Response:
        event = await request.json()
        finished = datetime.fromisoformat(event["data"]["finished_at"].replace("Z", "+00:00"))
        lags.append((datetime.now(UTC) - finished).total_seconds() * 1000)
        got.set()
        return web.Response(status=204)

    app = web.Application()
    app.router.add_post("/hook", receive)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    body = {
        "language": "python",
        "code": "print(1)",
        "callback_url": f"http://127.0.0.1:{port}/hook",
    }
    try:
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {key}"}) as http:
            for _ in range(n):
                got.clear()
                async with http.post(f"{url}/v1/jobs?wait=30", json=body) as resp:
                    await resp.read()
                await asyncio.wait_for(got.wait(), 30)
    finally:
        await runner.cleanup()
    return lags


async def burst(url: str, key: str, n: int) -> float:
    headers = {"Authorization": f"Bearer {key}"}
    body = {"language": "python", "code": "print(1)"}
    async with aiohttp.ClientSession(headers=headers) as http:
        started = time.perf_counter()
        ids = []
        for _ in range(n):
            async with http.post(f"{url}/v1/jobs", json=body) as resp:
                ids.append((await resp.json())["id"])
        for job_id in ids:
            async with http.get(f"{url}/v1/jobs/{job_id}?wait=60") as resp:
                job = await resp.json()
                assert job["status"] == "completed", job
        return n / (time.perf_counter() - started)


async def bare_burst(n: int, parallel: int) -> float:
    sem = asyncio.Semaphore(parallel)

    async def one() -> None:
        async with sem:
            await bare_run()

    started = time.perf_counter()
    await asyncio.gather(*(one() for _ in range(n)))
    return n / (time.perf_counter() - started)


def wrk(url: str, seconds: int, script: Path | None = None) -> float:
    cmd = ["wrk", "-t1", "-c32", f"-d{seconds}s", url]
    if script is not None:
        cmd[1:1] = ["-s", str(script)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    match = re.search(r"Requests/sec:\s+([\d.]+)", out)
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if non2xx:
        raise SystemExit(f"wrk saw {non2xx.group(1)} errors:\n{out}")
    assert match, out
    return float(match.group(1))


HELLO = """
from aiohttp import web
async def hello(request): return web.Response(text="hello")
app = web.Application(); app.router.add_get("/", hello)
web.run_app(app, host="127.0.0.1", port={port}, access_log=None, print=None)
"""


def wait_port(port: int) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"nothing listens on {port}")


def admission(root: Path, key: str, seconds: int) -> tuple[float, float]:
    hello_port = free_port()
    hello = subprocess.Popen([sys.executable, "-c", HELLO.format(port=hello_port)])
    gw_port = free_port()
    state = json.loads((root / ".bulkhead" / "up.json").read_text())
    env = clean_env()
    env.update(
        {
            "BULKHEAD_REDIS_URL": state["redis_url"],
            "BULKHEAD_QUEUE_NAME": "bench:admission",
            "BULKHEAD_LOG_LEVEL": "WARNING",
            "BULKHEAD_DATA_DIR": str(root / ".bulkhead"),
        }
    )
    gateway = subprocess.Popen([str(BIN), "gateway", "--port", str(gw_port)], cwd=root, env=env)
    script = root / "post.lua"
    script.write_text(
        'wrk.method = "POST"\n'
        'wrk.body = \'{"language": "python", "code": "print(1)"}\'\n'
        f'wrk.headers["Authorization"] = "Bearer {key}"\n'
        'wrk.headers["Content-Type"] = "application/json"\n'
    )
    try:
        wait_port(hello_port)
        wait_port(gw_port)
        floor = wrk(f"http://127.0.0.1:{hello_port}/", seconds)
        admitted = wrk(f"http://127.0.0.1:{gw_port}/v1/jobs", seconds, script)
    finally:
        for proc in (hello, gateway):
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=20)
    return admitted, floor


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=100, help="round trips")
    parser.add_argument("--burst", type=int, default=200, help="jobs in the throughput burst")
    parser.add_argument("--seconds", type=int, default=10, help="wrk duration")
    parser.add_argument(
        "--parts",
        default="roundtrip,webhook,throughput,admission",
        help="comma list of parts to run",
    )
    args = parser.parse_args()
    if shutil.which("bwrap") is None or shutil.which("wrk") is None:
        raise SystemExit("needs bwrap and wrk (apt-get install bubblewrap wrk)")
    parts = set(args.parts.split(","))
    with tempfile.TemporaryDirectory(prefix="bulkhead-bench-") as tmp:
        root = Path(tmp)
        port = free_port()
        up = start_up(root, port)
        try:
            key = make_key(root)
            url = f"http://127.0.0.1:{port}"
            await round_trips(url, key, 5)  # warm up
            if "roundtrip" in parts:
                bare = [await bare_run() for _ in range(args.n)]
                jobs = await round_trips(url, key, args.n)
                print(f"bare bwrap python3 print(1): {summary(bare)}")
                print(f"job round trip (?wait):      {summary(jobs)}")
                print(
                    f"  ratio p50 {pct(jobs, 50) / pct(bare, 50):.2f}x (target <= 4x), "
                    f"p99 {pct(jobs, 99) / pct(bare, 50):.2f}x of bare p50 (target <= 10x)"
                )
            if "webhook" in parts:
                lags = await webhook_latency(url, key, min(args.n, 50))
                print(f"webhook after job end:       {summary(lags)} (target p50 <= 50 ms)")
            if "throughput" in parts:
                parallel = os.cpu_count() or 2
                bare_rate = await bare_burst(args.burst, parallel)
                job_rate = await burst(url, key, args.burst)
                print(
                    f"throughput: jobs {job_rate:.1f}/s, bare bwrap {bare_rate:.1f}/s "
                    f"(parallel {parallel}): {100 * job_rate / bare_rate:.0f} % (target >= 60 %)"
                )
            if "admission" in parts:
                admitted, floor = admission(root, key, args.seconds)
                print(
                    f"admission: POST /v1/jobs {admitted:.0f} req/s, aiohttp hello-world "
                    f"{floor:.0f} req/s: {100 * admitted / floor:.1f} % (target >= 20 %)"
                )
        finally:
            up.send_signal(signal.SIGTERM)
            up.wait(timeout=60)


if __name__ == "__main__":
    asyncio.run(main())
