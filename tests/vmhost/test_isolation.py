"""What the sandbox can and cannot see or reach."""

from __future__ import annotations

import asyncio
import secrets
import shutil
import socket
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.vmhost.conftest import Vmhost

PROBE = """
import os, sys
for path in sys.argv[1:]:
    try:
        if os.path.isdir(path):
            os.listdir(path)
        else:
            open(path).read()
        print('READABLE', path)
    except OSError as exc:
        print('blocked', path, type(exc).__name__)
"""


@pytest.fixture
async def host_listener() -> AsyncIterator[int]:
    """A TCP listener on the host's 127.0.0.1 that records connections."""
    hits: list[int] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        hits.append(1)
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield port
    finally:
        server.close()
        await server.wait_closed()
        assert not hits, "the sandbox reached the host listener"


async def test_runs_as_sandbox_uid_with_private_home(vmhost: Vmhost) -> None:
    code = "import os; print(os.getuid(), os.getgid(), os.getcwd(), os.environ['HOME'])"
    _, result = await vmhost.run(language="python", code=code)
    assert result["stdout"] == "65534 65534 /home/user /home/user\n"


async def test_cannot_read_host_paths(vmhost: Vmhost) -> None:
    marker = Path("/tmp") / f"bulkhead-marker-{secrets.token_hex(4)}"
    marker.write_text("secret")
    marker.chmod(0o644)
    project_db = Path.cwd() / ".bulkhead" / f"marker-{secrets.token_hex(4)}"
    project_db.parent.mkdir(exist_ok=True)
    project_db.write_text("db")
    try:
        paths = [str(marker), "/work", "/work/main", "/root", str(project_db),
                 str(vmhost.work_dir), "/etc/shadow", "/var/lib/bulkhead"]  # fmt: skip
        files = [{"path": "probe.py", "content": PROBE, "encoding": "utf8"}]
        _, result = await vmhost.run(command=["python3", "probe.py", *paths], files=files)
        assert "READABLE" not in result["stdout"], result["stdout"]
        assert result["stdout"].count("blocked") == len(paths)
        _, listing = await vmhost.run(command=["ls", "/", "/tmp", "/etc"])
        assert "bulkhead-marker" not in listing["stdout"]
        assert "shadow" not in listing["stdout"]
    finally:
        marker.unlink()
        project_db.unlink()


async def test_cannot_reach_host_loopback(vmhost: Vmhost, host_listener: int) -> None:
    code = (
        "import socket\n"
        f"for host in ('127.0.0.1', '10.0.2.2'):\n"
        "    try:\n"
        f"        socket.create_connection((host, {host_listener}), timeout=2)\n"
        "        print('CONNECTED', host)\n"
        "    except OSError as exc:\n"
        "        print('refused', host, type(exc).__name__)\n"
        "print(sorted(name for _, name in socket.if_nameindex()))\n"
    )
    _, result = await vmhost.run(language="python", code=code)
    assert "CONNECTED" not in result["stdout"]
    assert result["stdout"].endswith("['lo']\n"), "no network interface but loopback"


def _internet_reachable() -> bool:
    try:
        urllib.request.urlopen("https://pypi.org/simple/", timeout=5).close()
        return True
    except OSError:
        return False


async def test_network_through_slirp(vmhost: Vmhost, host_listener: int) -> None:
    if shutil.which("slirp4netns") is None:
        pytest.skip("slirp4netns is not installed: network:true cannot be tested")
    code = (
        "import socket\n"
        "print(sorted(name for _, name in socket.if_nameindex()))\n"
        f"for host in ('127.0.0.1', '10.0.2.2'):\n"
        "    try:\n"
        f"        socket.create_connection((host, {host_listener}), timeout=2)\n"
        "        print('CONNECTED', host)\n"
        "    except OSError as exc:\n"
        "        print('refused', host)\n"
        "try:\n"
        "    socket.create_connection(('pypi.org', 443), timeout=10).close()\n"
        "    print('internet ok')\n"
        "except OSError as exc:\n"
        "    print('internet failed', exc)\n"
    )
    _, result = await vmhost.run(language="python", code=code, network=True)
    assert result["exit_code"] == 0, result
    assert "tap0" in result["stdout"]
    assert "CONNECTED" not in result["stdout"]
    if _internet_reachable():
        assert "internet ok" in result["stdout"], result["stdout"]
    else:
        print("the host itself has no route to pypi.org: outbound check skipped")


async def test_network_unavailable_without_slirp(vmhost: Vmhost) -> None:
    vmhost.driver.network.binary = None
    _, result = await vmhost.run(language="python", code="print(1)", network=True)
    assert result["termination_reason"] == "internal_error"
    assert result["exit_code"] is None
    assert result["error"]["code"] == "network_unavailable"


async def test_socket_family_in_sandbox_is_isolated(vmhost: Vmhost) -> None:
    host_name = socket.gethostname()
    _, result = await vmhost.run(command=["hostname"])
    assert result["stdout"].strip() == "sandbox" != host_name
