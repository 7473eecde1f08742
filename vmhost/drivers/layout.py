"""The host-side directory layout of bwrap sandboxes.

Built once at startup under the work dir: a per-instance directory holding the generated
``/etc`` trees (one without and one with a resolv.conf) and a copy of the guest agent. Per
run: a private directory whose ``home`` becomes the sandbox's ``/home/user``.

    <work_dir>/                 0711 root
      inst-<pid>-<hex>/         0755: etc/, etc-net/, guest/{agent,kernel}.py, guest/kernel.js
                                (read-only binds)
      run-<pid>-<hex>/          0711 root
        home/                   0700 sandbox uid: the job's files and main.<ext>
"""

from __future__ import annotations

import os
import secrets
import shutil
import stat
import subprocess
from dataclasses import dataclass
from pathlib import Path

from vmhost.drivers.base import FileSpec
from vmhost.errors import ConfigError, RunError

GUEST_SOURCES = Path(__file__).resolve().parent.parent / "guest"
GUEST_FILES = ("agent.py", "kernel.py", "kernel.js")  # the agent and the code kernels
GUEST_MOUNT = "/opt/bulkhead/guest"
HOME = "/home/user"
COPIED_ETC = (
    "ld.so.cache", "ld.so.conf", "ld.so.conf.d", "localtime", "os-release", "protocols",
    "services", "ssl", "ca-certificates", "alternatives", "mime.types",
)  # fmt: skip
NSSWITCH = "passwd: files\ngroup: files\nshadow: files\nhosts: files dns\nservices: files\n"
HOSTS = "127.0.0.1 localhost sandbox\n::1 localhost ip6-localhost ip6-loopback\n"
SLIRP_DNS = "10.0.2.3"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _traversable(path: Path, uid: int, gid: int) -> bool:
    for directory in [path, *path.parents]:
        st = directory.stat()
        if st.st_uid == uid:
            bit = stat.S_IXUSR
        elif st.st_gid == gid:
            bit = stat.S_IXGRP
        else:
            bit = stat.S_IXOTH
        if not st.st_mode & bit:
            return False
    return True


@dataclass(frozen=True)
class RunDir:
    root: Path
    home: Path


class SandboxLayout:
    def __init__(self, work_dir: Path, uid: int, gid: int) -> None:
        self.work_dir = work_dir
        self.uid = uid
        self.gid = gid
        try:
            work_dir.mkdir(parents=True, exist_ok=True)
            if work_dir.stat().st_uid == os.geteuid():
                work_dir.chmod(0o711)
        except OSError as exc:
            raise ConfigError(f"cannot create the vmhost work dir {work_dir}: {exc}") from exc
        if not _traversable(work_dir, uid, gid):
            raise ConfigError(
                f"the vmhost work dir {work_dir} is not traversable by the sandbox uid {uid} "
                "(a parent directory lacks the x bit; /root is mode 700): set "
                "BULKHEAD_VMHOST_WORK_DIR elsewhere"
            )
        self.remove_stale()
        self.instance = work_dir / f"inst-{os.getpid()}-{secrets.token_hex(4)}"
        self.instance.mkdir(mode=0o755)
        self.instance.chmod(0o755)
        self.etc = self._build_etc("etc", resolv=None)
        self.etc_net = self._build_etc("etc-net", resolv=f"nameserver {SLIRP_DNS}\n")
        self.guest = self.instance / "guest"
        self.guest.mkdir(mode=0o755)
        for name in GUEST_FILES:
            if name != "agent.py" and not (GUEST_SOURCES / name).exists():
                continue  # a kernel missing from this install: its contexts fail to start
            shutil.copyfile(GUEST_SOURCES / name, self.guest / name)
            (self.guest / name).chmod(0o644)

    def precompile_agent(self, python: str) -> bool:
        """Compile the agent with the sandbox's interpreter so each start loads bytecode.

        Returns False (and the agent is compiled at every start) if that fails.
        """
        result = subprocess.run(
            [python, "-I", "-S", "-c", "import py_compile, sys; "
             "py_compile.compile(sys.argv[1], doraise=True)", str(self.guest / "agent.py")],
            capture_output=True, timeout=60, check=False,
        )  # fmt: skip
        for path in self.guest.rglob("*"):
            path.chmod(0o755 if path.is_dir() else 0o644)
        return result.returncode == 0

    def _build_etc(self, name: str, resolv: str | None) -> Path:
        etc = self.instance / name
        etc.mkdir(mode=0o755)
        for entry in COPIED_ETC:
            source = Path("/etc") / entry
            target = etc / entry
            if source.is_symlink() and entry == "localtime":
                target.symlink_to(os.readlink(source))
            elif source.is_dir():
                shutil.copytree(source, target, symlinks=True)
            elif source.is_file():
                shutil.copyfile(source, target)
        files = {
            "passwd": f"root:x:0:0:root:/root:/usr/sbin/nologin\n"
            f"user:x:{self.uid}:{self.gid}:sandbox:{HOME}:/bin/bash\n",
            "group": f"root:x:0:\nuser:x:{self.gid}:\n",
            "hosts": HOSTS,
            "hostname": "sandbox\n",
            "nsswitch.conf": NSSWITCH,
        }
        if resolv is not None:
            files["resolv.conf"] = resolv
        for filename, content in files.items():
            (etc / filename).write_text(content)
        for directory, subdirs, filenames in os.walk(etc):
            for sub in subdirs:
                path = Path(directory) / sub
                if not path.is_symlink():
                    path.chmod(0o755)
            for filename in filenames:
                path = Path(directory) / filename
                if not path.is_symlink():
                    path.chmod(0o644)
        return etc

    def remove_stale(self) -> None:
        """Remove instance and run dirs left by vmhost processes that no longer exist."""
        for entry in self.work_dir.iterdir():
            kind, _, rest = entry.name.partition("-")
            pid = rest.split("-", 1)[0]
            if kind in ("inst", "run") and pid.isdigit() and not _pid_alive(int(pid)):
                shutil.rmtree(entry, ignore_errors=True)

    def run_dirs(self) -> list[Path]:
        return sorted(p for p in self.work_dir.glob(f"run-{os.getpid()}-*"))

    def create_run_dir(self, files: tuple[FileSpec, ...], extra: dict[str, bytes]) -> RunDir:
        root = self.work_dir / f"run-{os.getpid()}-{secrets.token_hex(8)}"
        root.mkdir(mode=0o711)
        home = root / "home"
        home.mkdir(mode=0o700)
        os.chown(home, self.uid, self.gid)
        run_dir = RunDir(root, home)
        try:
            self.write_files(run_dir, files, extra)
        except RunError:
            shutil.rmtree(root, ignore_errors=True)
            raise
        return run_dir

    def write_files(
        self, run_dir: RunDir, files: tuple[FileSpec, ...], extra: dict[str, bytes]
    ) -> None:
        """Place the job's files (and its source) in the run's home, owned by the sandbox."""
        try:
            for spec in files:
                self._write(run_dir.home, spec.path, spec.content)
            for name, content in extra.items():
                self._write(run_dir.home, name, content)
        except OSError as exc:
            raise RunError(f"cannot place the job's files: {exc}", "invalid_path") from exc

    def _write(self, home: Path, relative: str, content: bytes) -> None:
        target = home / relative
        directory = home
        for part in Path(relative).parts[:-1]:
            directory = directory / part
            if not directory.exists():
                directory.mkdir(mode=0o755)
                os.chown(directory, self.uid, self.gid)
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o644)
        try:
            os.fchown(fd, self.uid, self.gid)
            view = memoryview(content)
            while view:
                view = view[os.write(fd, view) :]
        finally:
            os.close(fd)

    @staticmethod
    def remove_run_dir(run_dir: RunDir) -> None:
        shutil.rmtree(run_dir.root, ignore_errors=True)

    def close(self) -> None:
        shutil.rmtree(self.instance, ignore_errors=True)
