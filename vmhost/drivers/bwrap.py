"""The bwrap driver: Linux namespaces (bubblewrap) + cgroups + rlimits, guest agent over pipes.

The sandbox sees read-only system directories, a generated /etc, /proc, a minimal /dev, a
tmpfs /tmp, the guest agent (read-only) and a private writable /home/user. It has its own
pid/ipc/uts/user/mount/net/cgroup namespaces (network only through slirp4netns when asked
for), runs as the unprivileged sandbox uid, and is killed with its whole process tree on
every path out of ``execute``.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import resource
import secrets
import shutil
import signal
import subprocess
from dataclasses import dataclass
from typing import Any

from vmhost.drivers.base import (
    Driver,
    FileSpec,
    OpenSandbox,
    Outcome,
    Probe,
    RunSink,
    RunSpec,
    SandboxSpec,
)
from vmhost.drivers.capture import OutputCapture
from vmhost.drivers.cgroups import Cgroups, RunCgroup
from vmhost.drivers.guest_exec import run_exec
from vmhost.drivers.layout import GUEST_MOUNT, HOME, RunDir, SandboxLayout
from vmhost.drivers.network import SlirpNetwork
from vmhost.drivers.sandbox_process import Credentials, SandboxProcess
from vmhost.drivers.warm_pool import WarmPool
from vmhost.errors import LanguageUnavailable, ProtocolError, RunError, SandboxError
from vmhost.guest.channel import GuestChannel
from vmhost.images.pyenv import find_pyenv, pyenv_env, pyenv_files
from vmhost.settings import VmhostSettings
from vmhost.templates import load_template

log = logging.getLogger("vmhost.bwrap")

SYSTEM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
SANDBOX_PATH = "/usr/local/bin:/usr/bin:/bin:/usr/local/sbin:/usr/sbin:/sbin"
BASE_ENV = {
    "PATH": SANDBOX_PATH,
    "HOME": HOME,
    "USER": "user",
    "LOGNAME": "user",
    "LANG": "C.UTF-8",
    "TMPDIR": "/tmp",
    "PYTHONUNBUFFERED": "1",
}
SOURCES = {"python": "main.py", "bash": "main.sh", "javascript": "main.js"}
POOL_REFILL_DELAY_S = 0.5  # after a held-open sandbox takes a prestarted one
POOL_CPU_S = 86400.0  # a prestarted sandbox's CPU rlimit; the wall-clock timeout still applies
# import (not run) the agent, so Python loads its precompiled bytecode
AGENT_START = (
    f"import sys; sys.path.insert(0, {GUEST_MOUNT!r}); import agent; sys.exit(agent.main())"
)
AGENT_ENV = {"PATH": SANDBOX_PATH, "HOME": HOME, "LANG": "C.UTF-8"}


@dataclass
class Prestarted:
    """A sandbox whose agent has said hello, waiting in the warm pool for its one run."""

    sandbox: SandboxProcess
    channel: GuestChannel
    run_dir: RunDir
    cgroup: RunCgroup | None

    def alive(self) -> bool:
        proc = self.sandbox.proc
        return proc is not None and proc.returncode is None


def _interpreter(candidates: list[str]) -> str | None:
    """The first candidate that is executable and resolves inside the mounted system dirs."""
    for candidate in candidates:
        path = shutil.which(candidate) if "/" not in candidate else candidate
        if path and os.access(path, os.X_OK):
            real = os.path.realpath(path)
            if any(real == d or real.startswith(d + "/") for d in SYSTEM_DIRS):
                return real
    return None


class BwrapDriver(Driver):
    name = "bwrap"

    def __init__(self, settings: VmhostSettings) -> None:
        super().__init__()
        self.settings = settings
        self.creds = Credentials(settings.sandbox_uid, settings.sandbox_gid)
        self.bwrap = _interpreter(["/usr/bin/bwrap", "bwrap"])
        self.python = _interpreter([settings.python_path or "/usr/bin/python3"])
        self.node = _interpreter([settings.node_path or "/usr/bin/node", "node", "nodejs"])
        self.bash = _interpreter(["/bin/bash", "/usr/bin/bash"])
        self.network = SlirpNetwork()
        self.layout: SandboxLayout | None = None
        self.cgroup_setup: Cgroups | None = None
        self._prefix: list[str] = []
        self._probe = self._check()
        self.pool: WarmPool[Prestarted] | None = None
        if self._probe.available and settings.pool_size > 0:
            self.pool = WarmPool(settings.pool_size, self._prestart, self._discard)

    # --- startup -------------------------------------------------------------
    def _check(self) -> Probe:
        if self.bwrap is None:
            return Probe(False, "bubblewrap (bwrap) is not installed (apt-get install bubblewrap)")
        if self.python is None:
            return Probe(False, "the guest agent needs /usr/bin/python3 on the host")
        if os.geteuid() != 0 and os.geteuid() != self.creds.uid:
            return Probe(
                False, f"the vmhost must run as root to run sandboxes as uid {self.creds.uid}"
            )
        self.layout = SandboxLayout(self.settings.work_dir, self.creds.uid, self.creds.gid)
        self._prefix = self._static_args(self.layout)
        trial = subprocess.run(
            [*self._prefix, "--ro-bind", str(self.layout.etc), "/etc", "/bin/true"],
            capture_output=True,
            preexec_fn=self.creds.drop,
            cwd=str(self.layout.instance),
            timeout=30,
            check=False,
        )
        if trial.returncode != 0:
            self.layout.close()
            self.layout = None
            reason = trial.stderr.decode(errors="replace").strip()
            return Probe(False, f"bwrap cannot create a sandbox here: {reason}")
        if not self.layout.precompile_agent(self.python):
            log.warning("could not precompile the guest agent; sandboxes will start slower")
        self.cgroup_setup = Cgroups()
        self.cgroups = self.cgroup_setup.mode
        self.cgroup_setup.remove_stale()
        return Probe(True, None)

    def _static_args(self, layout: SandboxLayout) -> list[str]:
        assert self.bwrap is not None
        args = [
            self.bwrap, "--unshare-all", "--unshare-user", "--disable-userns",
            "--die-with-parent", "--new-session", "--hostname", "sandbox",
        ]  # fmt: skip
        for directory in SYSTEM_DIRS:
            if os.path.islink(directory):
                args += ["--symlink", os.readlink(directory), directory]
            elif os.path.isdir(directory):
                args += ["--ro-bind", directory, directory]
        args += ["--proc", "/proc", "--dev", "/dev", "--ro-bind", str(layout.guest), GUEST_MOUNT]
        return args

    def probe(self) -> Probe:
        return self._probe

    def languages(self) -> dict[str, bool]:
        return {
            "python": self.python is not None,
            "bash": self.bash is not None,
            "javascript": self.node is not None,
        }

    def warm_ready(self) -> int:
        return self.pool.ready if self.pool is not None else 0

    async def start(self) -> None:
        if self.pool is not None:
            self.pool.start()

    async def close(self) -> None:
        await super().close()
        if self.pool is not None:
            await self.pool.close()
        if self.layout is not None:
            self.layout.close()

    # --- the warm pool -----------------------------------------------------------
    def _poolable(self, spec: RunSpec) -> bool:
        """Prestarted sandboxes have the default limits and no network."""
        return (
            not spec.network
            and spec.memory_mb == self.settings.default_memory_mb
            and spec.vcpus == self.settings.default_vcpus
        )

    def _new_cgroup(self, memory_mb: int, vcpus: int) -> RunCgroup | None:
        if self.cgroup_setup is None:
            return None
        try:
            return self.cgroup_setup.create(
                secrets.token_hex(8), memory_mb, self.settings.pids_max, vcpus
            )
        except OSError as exc:
            raise SandboxError(f"cannot create the run's cgroup: {exc}") from exc

    async def _start_sandbox(
        self, sandbox: SandboxProcess, run_dir: RunDir, network: bool, memory_mb: int,
        timeout_s: float, vcpus: int, binds: tuple[str, ...] = (),
    ) -> GuestChannel:  # fmt: skip
        assert self.layout is not None
        proc = await sandbox.spawn(
            self._args(network, memory_mb, self.layout, run_dir, binds),
            AGENT_ENV,
            str(run_dir.root),
            self._rlimits(timeout_s, vcpus),
            self.network if network else None,
        )
        assert proc.stdout is not None and proc.stdin is not None
        channel = GuestChannel(proc.stdout, proc.stdin)
        await channel.handshake()
        return channel

    async def _prestart(
        self, memory_mb: int | None = None, vcpus: int | None = None, network: bool = False,
        binds: tuple[str, ...] = (), files: tuple[FileSpec, ...] = (),
    ) -> Prestarted:  # fmt: skip
        assert self.layout is not None
        memory_mb = memory_mb or self.settings.default_memory_mb
        vcpus = vcpus or self.settings.default_vcpus
        run_dir = self.layout.create_run_dir(files, {})
        cgroup: RunCgroup | None = None
        sandbox: SandboxProcess | None = None
        try:
            cgroup = self._new_cgroup(memory_mb, vcpus)
            sandbox = SandboxProcess(cgroup, self.creds)
            channel = await self._start_sandbox(
                sandbox, run_dir, network, memory_mb, POOL_CPU_S, vcpus, binds
            )
        except BaseException:
            await asyncio.shield(self._cleanup(sandbox, cgroup, run_dir))
            raise
        return Prestarted(sandbox, channel, run_dir, cgroup)

    async def _discard(self, item: Prestarted) -> None:
        item.sandbox.kill()
        await self._cleanup(item.sandbox, item.cgroup, item.run_dir)

    # --- held-open sandboxes ------------------------------------------------------
    async def open(self, spec: SandboxSpec) -> OpenSandbox:
        if self.layout is None:
            raise SandboxError(f"the bwrap driver is unavailable: {self._probe.reason}")
        if spec.network:
            self.network.require()
        template = load_template(spec.template)
        env = {**BASE_ENV, **spec.env}
        assert self.python is not None
        interpreters = {"python": [self.python, "-u", f"{GUEST_MOUNT}/kernel.py"]}
        if self.node is not None:
            interpreters["javascript"] = [self.node, f"{GUEST_MOUNT}/kernel.js"]
        binds: tuple[str, ...] = ()
        files: tuple[FileSpec, ...] = ()
        if template.has_pip_env:
            pyenv = find_pyenv(template, self.settings.image_dir)
            if pyenv is None:
                raise SandboxError(
                    f"template {template.name!r} is not built on this vmhost: run "
                    f"`bulkhead image build --template {template.name}`",
                    "template_not_built",
                )
            binds = (str(pyenv),)  # mounted at its own path: its scripts name that path
            env.update(pyenv_env(pyenv, spec.env))
            files = tuple(FileSpec(path, data) for path, data in pyenv_files(pyenv))
            interpreters["python"] = [f"{pyenv}/bin/python3", "-u", f"{GUEST_MOUNT}/kernel.py"]
        poolable = (
            template.name == "base"
            and not spec.network
            and spec.memory_mb == self.settings.default_memory_mb
            and spec.vcpus == self.settings.default_vcpus
        )
        item = self.pool.take() if self.pool is not None and poolable else None
        if item is None:
            item = await self._prestart(spec.memory_mb, spec.vcpus, spec.network, binds, files)
        elif self.pool is not None:
            self.pool.start_later(POOL_REFILL_DELAY_S)
        held = item

        async def cleanup() -> None:
            await asyncio.shield(self._cleanup(held.sandbox, held.cgroup, held.run_dir))

        return OpenSandbox(
            channel=held.channel,
            driver=self.name,
            env=env,
            home=HOME,
            interpreters=interpreters,
            kill=held.sandbox.kill,
            cleanup=cleanup,
            alive=held.alive,
            oom_killed=lambda: held.cgroup is not None and held.cgroup.oom_killed(),
        )

    # --- one run -------------------------------------------------------------
    def _command(self, spec: RunSpec) -> tuple[list[str], dict[str, bytes]]:
        if spec.command is not None:
            return list(spec.command), {}
        interpreters = {"python": self.python, "bash": self.bash, "javascript": self.node}
        language = spec.language or ""
        interpreter = interpreters.get(language)
        if interpreter is None:
            raise LanguageUnavailable(f"no interpreter for {language!r} on this vmhost")
        source = SOURCES[language]
        return [interpreter, source], {source: (spec.code or "").encode()}

    def _rlimits(self, timeout_s: float, vcpus: int) -> list[tuple[int, int, int]]:
        cpu = math.ceil(timeout_s * vcpus) + 1
        nproc = self.settings.pids_max * self.settings.max_runs + 64
        return [
            (resource.RLIMIT_CPU, cpu, cpu + 1),
            (resource.RLIMIT_FSIZE, self.settings.max_file_bytes, self.settings.max_file_bytes),
            (resource.RLIMIT_NOFILE, self.settings.nofile, self.settings.nofile),
            (resource.RLIMIT_NPROC, nproc, nproc),
            (resource.RLIMIT_CORE, 0, 0),
        ]

    def _args(
        self, network: bool, memory_mb: int, layout: SandboxLayout, run_dir: RunDir,
        binds: tuple[str, ...] = (),
    ) -> list[str]:  # fmt: skip
        assert self.python is not None
        etc = layout.etc_net if network else layout.etc
        tmp_bytes = min(self.settings.tmp_size_mb, memory_mb) * 1024 * 1024
        extra = [arg for path in binds for arg in ("--ro-bind", path, path)]
        return [
            *self._prefix,
            *extra,
            "--ro-bind", str(etc), "/etc",
            "--size", str(tmp_bytes), "--perms", "1777", "--tmpfs", "/tmp",
            "--bind", str(run_dir.home), HOME, "--chdir", HOME,
            self.python, "-I", "-S", "-B", "-c", AGENT_START,
        ]  # fmt: skip

    async def execute(self, spec: RunSpec, sink: RunSink, cancel: asyncio.Event) -> Outcome:
        if self.layout is None:
            raise SandboxError(f"the bwrap driver is unavailable: {self._probe.reason}")
        layout = self.layout
        argv, sources = self._command(spec)
        if spec.network:
            self.network.require()
        env = {**BASE_ENV, **spec.env}
        warm = self.pool.take() if self.pool is not None and self._poolable(spec) else None
        channel: GuestChannel | None = None
        cgroup: RunCgroup | None = None
        sandbox: SandboxProcess | None = None
        if warm is not None:
            run_dir, cgroup, sandbox, channel = (
                warm.run_dir,
                warm.cgroup,
                warm.sandbox,
                warm.channel,
            )
        else:
            run_dir = layout.create_run_dir((), {})
        try:
            layout.write_files(run_dir, spec.files, sources)
            if sandbox is None:
                cgroup = self._new_cgroup(spec.memory_mb, spec.vcpus)
                sandbox = SandboxProcess(cgroup, self.creds)
            return await self._supervise(spec, sink, cancel, sandbox, run_dir, argv, env, channel)
        finally:
            cleanup = asyncio.ensure_future(self._cleanup(sandbox, cgroup, run_dir))
            try:
                await asyncio.shield(cleanup)
            except asyncio.CancelledError:
                await asyncio.shield(cleanup)  # the task is being cancelled twice: finish first
                raise
            finally:
                if self.pool is not None:
                    self.pool.start()  # refill now that this run no longer needs the CPU

    async def _cleanup(
        self, sandbox: SandboxProcess | None, cgroup: RunCgroup | None, run_dir: RunDir
    ) -> None:
        try:
            if sandbox is not None:
                await sandbox.cleanup()
            elif cgroup is not None:
                await cgroup.remove()
        finally:
            await asyncio.to_thread(SandboxLayout.remove_run_dir, run_dir)

    async def _supervise(
        self,
        spec: RunSpec,
        sink: RunSink,
        cancel: asyncio.Event,
        sandbox: SandboxProcess,
        run_dir: RunDir,
        argv: list[str],
        env: dict[str, str],
        channel: GuestChannel | None,
    ) -> Outcome:
        assert self.layout is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + spec.timeout_s
        capture = OutputCapture(spec.max_output_bytes)
        canceled = asyncio.ensure_future(cancel.wait())
        conversation = asyncio.ensure_future(
            self._converse(spec, sink, sandbox, run_dir, argv, env, capture, channel)
        )
        try:
            done, _ = await asyncio.wait(
                {conversation, canceled},
                timeout=max(deadline - loop.time(), 0),
                return_when=asyncio.FIRST_COMPLETED,
            )
        finally:
            canceled.cancel()
            if not conversation.done():
                sandbox.kill()
                conversation.cancel()
                await asyncio.gather(conversation, return_exceptions=True)
        outcome = Outcome(termination_reason="exit")
        if conversation in done:
            try:
                frame = conversation.result()
            except ProtocolError as exc:
                sandbox.kill()
                outcome = self._failed(exc, sandbox)
            else:
                sandbox.kill()
                outcome.exit_code, outcome.signal = frame["exit_code"], frame["signal"]
                outcome.termination_reason = self._reason(frame["signal"], sandbox.cgroup)
        else:
            outcome.termination_reason = "canceled" if canceled in done else "timeout"
            if outcome.termination_reason == "timeout" and sandbox.cgroup is not None:
                outcome.termination_reason = "oom" if sandbox.cgroup.oom_killed() else "timeout"
        outcome.stdout, outcome.stderr = capture.stdout.text(), capture.stderr.text()
        outcome.stdout_truncated = capture.stdout.truncated
        outcome.stderr_truncated = capture.stderr.truncated
        return outcome

    @staticmethod
    def _reason(signum: int | None, cgroup: RunCgroup | None) -> str:
        if signum == signal.SIGXFSZ:
            return "output_limit"
        if signum == signal.SIGXCPU:
            return "timeout"
        if cgroup is not None and cgroup.oom_killed():
            return "oom"
        return "exit"

    @staticmethod
    def _failed(exc: ProtocolError, sandbox: SandboxProcess) -> Outcome:
        if sandbox.cgroup is not None and sandbox.cgroup.oom_killed():
            return Outcome(termination_reason="oom")
        message = exc.message
        detail = sandbox.stderr_text()
        if detail:
            message = f"{message} (sandbox stderr: {detail[:2000]})"
        log.warning("run failed: %s", message)
        error = RunError(message, exc.code).to_dict()
        return Outcome(termination_reason="internal_error", error=error)

    async def _converse(
        self,
        spec: RunSpec,
        sink: RunSink,
        sandbox: SandboxProcess,
        run_dir: RunDir,
        argv: list[str],
        env: dict[str, str],
        capture: OutputCapture,
        channel: GuestChannel | None,
    ) -> dict[str, Any]:
        if channel is None:  # cold start: no prestarted sandbox fits this run
            channel = await self._start_sandbox(
                sandbox, run_dir, spec.network, spec.memory_mb, spec.timeout_s, spec.vcpus
            )
        return await run_exec(
            channel, argv, HOME, env, spec.stdin or b"", spec.max_output_bytes, capture, sink
        )
