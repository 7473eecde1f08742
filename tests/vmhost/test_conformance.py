"""One conformance suite for every sandbox driver, calling the Driver API directly.

Each test runs against bwrap (namespaces) and qemu (a microVM; TCG when KVM does not
work). One driver per module, warm pool on, so the qemu half stays fast: one boot and
snapshot, then restores. Where the drivers differ (the kernel a job sees, what a memory
limit reports, networking) the test says what each one does.

The qemu half skips with the reason when qemu or the image build is not possible here,
except in CI (CI=true), where that fails the run instead. The base image is built once per
session (content-addressed: a no-op when it is up to date).
"""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import pytest
import pytest_asyncio

from tests.vmhost.conftest import bwrap_skip_reason
from tests.vmhost.helpers import pids_with_marker, wait_until
from vmhost.drivers.base import Driver, FileSpec, RunResult, RunSpec
from vmhost.drivers.bwrap import BwrapDriver
from vmhost.drivers.qemu import QemuDriver
from vmhost.errors import VmhostError
from vmhost.images import ImageInfo, build_image
from vmhost.settings import VmhostSettings, default_image_dir
from vmhost.templates import load_template

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
MEMORY_MB = 256  # the drivers' default size here, so qemu runs restore from the snapshot
pytestmark = pytest.mark.asyncio(loop_scope="module")


def _unavailable(reason: str) -> None:
    if IN_CI:
        pytest.fail(f"CI must run the qemu conformance tests: {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def qemu_image() -> ImageInfo:
    """The base microVM image, built if needed (about a minute the first time)."""
    if shutil.which("qemu-system-x86_64") is None:
        _unavailable("qemu-system-x86_64 is not installed (apt-get install qemu-system-x86)")
    if os.geteuid() != 0:
        _unavailable("building microVM images needs root")
    try:
        return build_image(load_template("base"), default_image_dir(), print)
    except VmhostError as exc:
        _unavailable(f"cannot build the base image: {exc.message}")
        raise


@dataclass
class Recorder:
    """A RunSink that remembers when each chunk arrived."""

    chunks: list[tuple[float, str, str]] = field(default_factory=list)

    async def started(self, started_at: datetime) -> None:
        return None

    async def output(self, stream: str, text: str) -> None:
        self.chunks.append((time.monotonic(), stream, text))


@pytest_asyncio.fixture(scope="module", loop_scope="module", params=["bwrap", "qemu"])
async def driver(request: pytest.FixtureRequest) -> AsyncIterator[Driver]:
    reason = bwrap_skip_reason()
    if reason:
        pytest.skip(reason)
    work_dir = Path("/var/lib/bulkhead") / f"conformance-{secrets.token_hex(4)}"
    env = {
        "BULKHEAD_VMHOST_TOKEN": "conformance",
        "BULKHEAD_VMHOST_WORK_DIR": str(work_dir),
        "BULKHEAD_SANDBOX_MEMORY_MB": str(MEMORY_MB),
        "BULKHEAD_SANDBOX_POOL": "1",
        "BULKHEAD_QEMU_POOL": "1",
    }
    settings = VmhostSettings.from_env(env)
    built: Driver
    if request.param == "qemu":
        image = request.getfixturevalue("qemu_image")
        built = QemuDriver(settings, image.path.parent)
        # only the base template's image matters here
        assert isinstance(built, QemuDriver)
        built.pools = {k: v for k, v in built.pools.items() if k == "base"}
    else:
        built = BwrapDriver(settings)
    probe = built.probe()
    if not probe.available:
        if request.param == "qemu":
            _unavailable(f"qemu driver: {probe.reason}")
        pytest.skip(f"bwrap driver: {probe.reason}")
    await built.start()
    try:
        yield built
    finally:
        await built.close()
        shutil.rmtree(work_dir, ignore_errors=True)
    if isinstance(built, QemuDriver):
        assert not [vm for vm in built._vms if vm.alive()], "a VM outlived the driver"


def spec(**fields: object) -> RunSpec:
    values: dict[str, object] = {
        "run_id": "run-" + secrets.token_hex(6),
        "language": None,
        "code": None,
        "command": None,
        "stdin": None,
        "env": {},
        "files": (),
        "timeout_s": 30.0,
        "vcpus": 1,
        "memory_mb": MEMORY_MB,
        "network": False,
        "template": "base",
        "max_output_bytes": 1024 * 1024,
    }
    values.update(fields)
    return RunSpec(**values)  # type: ignore[arg-type]


async def run(driver: Driver, **fields: object) -> tuple[RunResult, Recorder]:
    sink = Recorder()
    result = await driver.run(spec(**fields), sink)
    return result, sink


async def test_exec_python(driver: Driver) -> None:
    result, _ = await run(driver, language="python", code="print('hello', 6 * 7)")
    assert result.outcome.termination_reason == "exit", result.outcome
    assert (result.outcome.exit_code, result.outcome.stdout) == (0, "hello 42\n")
    assert result.driver == driver.name


async def test_user_code_runs_unprivileged(driver: Driver) -> None:
    """bwrap: the sandbox uid (65534); qemu: the guest's "user" (1000), not root."""
    result, _ = await run(driver, command=("sh", "-c", "id -u; touch ~/mine; stat -c %u ~/mine"))
    uid, owner = result.outcome.stdout.split()
    assert uid != "0" and owner == uid, result.outcome


async def test_exec_bash_exit_code_and_stderr(driver: Driver) -> None:
    code = "echo out; echo err >&2; exit 7"
    result, _ = await run(driver, language="bash", code=code)
    outcome = result.outcome
    assert (outcome.termination_reason, outcome.exit_code, outcome.signal) == ("exit", 7, None)
    assert (outcome.stdout, outcome.stderr) == ("out\n", "err\n")


async def test_killed_by_signal(driver: Driver) -> None:
    result, _ = await run(driver, command=("bash", "-c", "kill -9 $$"))
    assert (result.outcome.exit_code, result.outcome.signal) == (None, 9)
    assert result.outcome.termination_reason == "exit"


async def test_command_not_found(driver: Driver) -> None:
    result, _ = await run(driver, command=("no-such-program-here",))
    assert result.outcome.exit_code == 127
    assert "no-such-program-here" in result.outcome.stderr


async def test_output_streams_before_the_end(driver: Driver) -> None:
    code = "import time\nprint('first', flush=True)\ntime.sleep(1.5)\nprint('second')"
    result, sink = await run(driver, language="python", code=code)
    ended = time.monotonic()
    assert result.outcome.stdout == "first\nsecond\n"
    first = next(at for at, stream, text in sink.chunks if "first" in text)
    assert ended - first > 1.0, "the first line arrived only with the end of the run"


async def test_stdin_small_and_streamed(driver: Driver) -> None:
    result, _ = await run(driver, command=("cat",), stdin=b"line one\nline two\n")
    assert result.outcome.stdout == "line one\nline two\n"
    big = os.urandom(3 * 1024 * 1024)  # above the inline limit: sent in stdin frames
    result, _ = await run(driver, command=("sh", "-c", "wc -c; echo done"), stdin=big)
    assert result.outcome.stdout.split() == [str(len(big)), "done"]


async def test_timeout_kills_the_sandbox(driver: Driver) -> None:
    # a non-default size: bwrap gets a fresh sandbox, qemu a cold-booted VM (no pool, no
    # snapshot), whose qemu process is recognisable by its "-m 320" argument
    marker = "conformance-timeout-" + secrets.token_hex(4)
    command = ("bash", "-c", f"sleep 120; : {marker}")
    clock = time.monotonic()
    result, _ = await run(driver, command=command, timeout_s=2.0, memory_mb=320)
    assert result.outcome.termination_reason == "timeout"
    assert result.outcome.exit_code is None
    assert time.monotonic() - clock < 30
    gone = marker if isinstance(driver, BwrapDriver) else "\0-m\x00320\0"
    assert await wait_until(lambda: not pids_with_marker(gone), within=10)


async def test_cancel(driver: Driver) -> None:
    cancel = asyncio.Event()
    task = asyncio.ensure_future(driver.run(spec(command=("sleep", "60")), Recorder(), cancel))
    await asyncio.sleep(1.0)
    cancel.set()
    result = await asyncio.wait_for(task, 20)
    assert result.outcome.termination_reason == "canceled"


async def test_files_in(driver: Driver) -> None:
    files = (FileSpec("data/in.txt", b"from the host\n"), FileSpec("top.bin", bytes(range(256))))
    cmd = "cat data/in.txt; wc -c < top.bin; pwd"
    result, _ = await run(driver, command=("bash", "-c", cmd), files=files)
    assert result.outcome.stdout == "from the host\n256\n/home/user\n", result.outcome


async def test_files_written_by_the_job_stay_private(driver: Driver) -> None:
    token = secrets.token_hex(8)
    cmd = f"echo {token} > out.txt && mkdir -p d && cp out.txt d/copy && cat d/copy"
    result, _ = await run(driver, command=("bash", "-c", cmd))
    assert result.outcome.stdout == f"{token}\n", result.outcome
    # a later run (a new sandbox, maybe from the same snapshot) never sees them
    result, _ = await run(driver, command=("bash", "-c", "ls -A; grep -rs . /tmp || true"))
    assert token not in result.outcome.stdout
    assert "out.txt" not in result.outcome.stdout


async def test_output_cap(driver: Driver) -> None:
    code = "import sys\nsys.stdout.write('x' * 200000)\nprint('err', file=sys.stderr)"
    result, _ = await run(driver, language="python", code=code, max_output_bytes=1000)
    outcome = result.outcome
    assert outcome.stdout_truncated and len(outcome.stdout) == 1000
    assert not outcome.stderr_truncated and outcome.stderr == "err\n"
    assert outcome.exit_code == 0


async def test_memory_limit(driver: Driver) -> None:
    # touch twice the sandbox's memory, 16 MiB at a time; bwrap: the run's cgroup OOM
    # kills it ("oom"; without cgroups only a non-zero exit); qemu: the guest kernel's OOM
    # killer ends the process, and the driver reads oom_kill from the guest ("oom")
    code = "chunks = []\nwhile True:\n    chunks.append(b'x' * (16 << 20))"
    result, _ = await run(driver, language="python", code=code, timeout_s=60)
    outcome = result.outcome
    if isinstance(driver, QemuDriver) or driver.cgroups != "none":
        assert outcome.termination_reason == "oom", outcome
    else:
        assert outcome.exit_code != 0, outcome


async def test_kernel_seen_by_the_job(driver: Driver) -> None:
    result, _ = await run(driver, command=("uname", "-r"))
    release = result.outcome.stdout.strip()
    if isinstance(driver, QemuDriver):
        assert release != os.uname().release  # the guest's own kernel
        assert release == driver.images["base"].kernel_release
    else:
        assert release == os.uname().release  # namespaces share the host kernel


async def test_random_state_and_clock_are_fresh(driver: Driver) -> None:
    cmd = "head -c 16 /dev/urandom | od -An -tx1; python3 -c 'import os; print(os.urandom(8))'"
    outputs = set()
    for _ in range(2):
        result, _ = await run(driver, command=("sh", "-c", cmd + "; date +%s"))
        lines = result.outcome.stdout.strip().splitlines()
        assert abs(int(lines[-1]) - time.time()) < 10, "the sandbox clock is off"
        outputs.add("\n".join(lines[:-1]))
    assert len(outputs) == 2, "two sandboxes produced the same random bytes"


async def test_network_request(driver: Driver) -> None:
    """network=True either gives the run a network (bwrap: slirp4netns; reachability is
    tested in test_isolation) or fails with a clear code (qemu has no network device)."""
    result, _ = await run(driver, command=("true",), network=True)
    if isinstance(driver, QemuDriver):
        assert result.outcome.termination_reason == "internal_error"
        assert result.outcome.error is not None
        assert result.outcome.error["code"] == "network_unsupported"
    else:
        assert result.outcome.termination_reason == "exit", result.outcome
        assert result.outcome.exit_code == 0


async def test_languages(driver: Driver) -> None:
    languages = driver.languages()
    assert languages["python"] and languages["bash"]


async def test_open_sandbox_runs_commands_until_cleanup(driver: Driver) -> None:
    from vmhost.drivers.base import SandboxSpec
    from vmhost.drivers.capture import OutputCapture
    from vmhost.drivers.guest_exec import run_exec

    sandbox = await driver.open(
        SandboxSpec(
            sandbox_id="sbx-" + secrets.token_hex(4),
            template="base",
            env={"GREETING": "hi"},
            vcpus=1,
            memory_mb=MEMORY_MB,
            network=False,
            lifetime_s=60,
        )  # fmt: skip
    )
    try:
        assert sandbox.alive() and sandbox.driver == driver.name
        outputs = []
        for cmd in ("echo $GREETING > state.txt", "cat state.txt; pwd"):
            capture = OutputCapture(1024)
            frame = await run_exec(
                sandbox.channel, ["sh", "-c", cmd], sandbox.home, sandbox.env, b"", 1024,
                capture, Recorder(),
            )  # fmt: skip
            assert frame["exit_code"] == 0
            outputs.append(capture.stdout.text())
        assert outputs[1] == f"hi\n{sandbox.home}\n"  # state kept between commands
        assert "python" in sandbox.interpreters
    finally:
        await sandbox.cleanup()
    assert await wait_until(lambda: not sandbox.alive(), within=10)
