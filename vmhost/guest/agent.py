"""Bulkhead guest agent: runs inside a sandbox and speaks the framed JSON protocol.

Stdlib-only and standalone (it is copied into every sandbox and started with
``python3 -I -S -B agent.py``). Startup cost matters, so it imports only C-level modules
(``_json`` instead of ``json``, ``_signal`` instead of ``signal``, ``select.poll`` instead of
``selectors``). The protocol is described in PROTOCOL.md next to this file.

Transport: frames are read from fd 0 and written to fd 1 (pipes for the bwrap driver, a
virtio-serial port for microVMs). The agent never relies on the transport closing: it exits
on a ``shutdown`` request, and also when the transport reports EOF.

``typing`` is imported for the type checker only: on the Python here it costs ~9 ms of the
agent's ~16 ms start, paid by every sandbox. The vmhost also precompiles this file so the
sandbox imports bytecode instead of compiling the source on every start.
"""

from __future__ import annotations

import _json
import _signal
import binascii
import errno
import os
import select
import struct
import sys

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

VERSION = 1
AGENT_VERSION = "1.0.0"
MAX_FRAME = 16 * 1024 * 1024
MAX_READ_FILE = 8 * 1024 * 1024
# "uid:gid" the agent runs processes and file operations as when it runs as root itself
# (microVMs: the agent needs root to set the clock after a restore, user code does not)
RUN_AS_ENV = "BULKHEAD_RUN_AS"
CHUNK = 65536
CAPABILITIES = ["exec", "stdin", "signal", "files", "background"]

POLL_IN = select.POLLIN | select.POLLHUP | select.POLLERR
# Fields each request type accepts: name -> (required, allowed types).
STR, INT, BOOL, NONE, DICT, LIST = str, int, bool, type(None), dict, list
REQUESTS: dict[str, dict[str, tuple[bool, tuple[type, ...]]]] = {
    "exec": {
        "argv": (True, (LIST,)),
        "cwd": (False, (STR, NONE)),
        "env": (False, (DICT, NONE)),
        "stdin": (False, (STR, NONE)),
        "stdin_open": (False, (BOOL,)),
        "max_output_bytes": (False, (INT, NONE)),
    },
    "stdin": {"data": (False, (STR, NONE)), "eof": (False, (BOOL,))},
    "signal": {"signal": (True, (INT,))},
    "write_file": {
        "path": (True, (STR,)),
        "data": (True, (STR,)),
        "mode": (False, (INT, NONE)),
        "append": (False, (BOOL,)),
    },
    "read_file": {"path": (True, (STR,)), "offset": (False, (INT,)), "length": (False, (INT,))},
    "move": {"source": (True, (STR,)), "destination": (True, (STR,))},
    "list_dir": {"path": (True, (STR,))},
    "stat": {"path": (True, (STR,)), "follow": (False, (BOOL,))},
    "remove": {"path": (True, (STR,)), "recursive": (False, (BOOL,))},
    "mkdir": {"path": (True, (STR,)), "parents": (False, (BOOL,)), "mode": (False, (INT, NONE))},
    "shutdown": {},
    "sync": {"time_ns": (True, (INT,)), "entropy": (True, (STR,))},
}
ERRNO_CODES = {
    errno.ENOENT: "not_found",
    errno.EEXIST: "exists",
    errno.ENOTDIR: "not_a_directory",
    errno.EISDIR: "is_a_directory",
    errno.EACCES: "permission_denied",
    errno.EPERM: "permission_denied",
    errno.ENOTEMPTY: "not_empty",
    errno.ENOSPC: "no_space",
    errno.EFBIG: "too_large",
}


class ProtocolError(Exception):
    def __init__(self, code: str, message: str, frame_id: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.frame_id = frame_id


class _DecodeContext:
    strict = True
    object_hook = None
    object_pairs_hook = None
    parse_float = float
    parse_int = int

    @staticmethod
    def parse_constant(name: str) -> Any:
        raise ValueError("non-finite number " + name)


_scan: Any = _json.make_scanner(_DecodeContext())  # type: ignore[arg-type]
_encode: Any = _json.make_encoder(
    None,
    None,  # type: ignore[arg-type]
    _json.encode_basestring_ascii,
    None,
    ":",
    ",",
    False,
    False,
    False,
)


def decode_frame(payload: bytes) -> dict[str, Any]:
    try:
        text = payload.decode("utf-8")
        obj, end = _scan(text, 0)
    except Exception as exc:  # _json raises StopIteration / ValueError variants
        raise ProtocolError("invalid_frame", f"frame is not valid JSON: {exc}") from None
    if end != len(text) or not isinstance(obj, dict):
        raise ProtocolError("invalid_frame", "frame must be exactly one JSON object")
    return obj


def encode_frame(obj: dict[str, Any]) -> bytes:
    body = "".join(_encode(obj, 0)).encode("ascii")
    return struct.pack(">I", len(body)) + body


def b64encode(data: bytes) -> str:
    return binascii.b2a_base64(data, newline=False).decode("ascii")


def b64decode(text: str, frame_id: str | None) -> bytes:
    try:
        return binascii.a2b_base64(text.encode("ascii"), strict_mode=True)
    except (binascii.Error, UnicodeEncodeError):
        raise ProtocolError("invalid_field", "data is not valid base64", frame_id) from None


def validate(frame: dict[str, Any]) -> tuple[str, str]:
    frame_id = frame.get("id")
    if not isinstance(frame_id, str) or not frame_id:
        frame_id = None
    if frame.get("v") != VERSION or type(frame.get("v")) is not int:
        raise ProtocolError("version_mismatch", f'expected "v": {VERSION}', frame_id)
    kind = frame.get("type")
    fields = REQUESTS.get(kind) if isinstance(kind, str) else None
    if fields is None:
        raise ProtocolError("unknown_type", f"unknown frame type {kind!r}", frame_id)
    if frame_id is None:
        raise ProtocolError("invalid_field", "id must be a non-empty string")
    for key, value in frame.items():
        if key in ("v", "type", "id"):
            continue
        spec = fields.get(key)
        if spec is None:
            raise ProtocolError("unknown_field", f"unknown field {key!r} in {kind}", frame_id)
        if type(value) not in spec[1]:
            raise ProtocolError("invalid_field", f"field {key!r} has the wrong type", frame_id)
    for key, (required, _types) in fields.items():
        if required and key not in frame:
            raise ProtocolError("invalid_field", f"missing field {key!r} in {kind}", frame_id)
    return str(kind), frame_id


class Process:
    """One exec'd command: its pipes, output budget and stdin backlog."""

    def __init__(
        self, frame_id: str, pid: int, stdin_fd: int, out_fd: int, err_fd: int, budget: int
    ) -> None:
        self.id = frame_id
        self.pid = pid
        self.stdin_fd: int | None = stdin_fd
        self.stdin_buf = bytearray()
        self.stdin_eof = False
        self.streams = {out_fd: "stdout", err_fd: "stderr"}
        self.budget = {"stdout": budget, "stderr": budget}
        self.pidfd = os.pidfd_open(pid)


def _child(
    argv: list[str],
    cwd: str | None,
    env: dict[str, str] | None,
    fds: tuple[int, int, int],
    errpipe: int,
) -> None:
    try:
        os.setsid()
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
        os.closerange(3, errpipe)
        os.closerange(errpipe + 1, 1 << 16)
        for sig in (_signal.SIGPIPE, _signal.SIGXFSZ, _signal.SIGINT, _signal.SIGTERM):
            _signal.signal(sig, _signal.SIG_DFL)
        try:
            fd = os.open("/proc/self/oom_score_adj", os.O_WRONLY)
            os.write(fd, b"1000")
            os.close(fd)
        except OSError:
            pass
        if RUN_AS is not None:
            os.setgroups([])
            os.setgid(RUN_AS[1])
            os.setuid(RUN_AS[0])
        if cwd:
            os.chdir(cwd)
        if env is None:
            os.execvp(argv[0], argv)
        os.execvpe(argv[0], argv, env)
    except OSError as exc:
        os.write(errpipe, str(exc.errno).encode("ascii"))
    finally:
        os._exit(127)


class Agent:
    def __init__(self, rfd: int, wfd: int) -> None:
        self.rfd = rfd
        self.wfd = wfd
        self.inbuf = bytearray()
        self.poll = select.poll()
        self.procs: dict[str, Process] = {}
        self.by_fd: dict[int, Process] = {}
        self.running = True

    # --- transport ---------------------------------------------------------
    def send(self, frame: dict[str, Any]) -> None:
        frame["v"] = VERSION
        data = encode_frame(frame)
        view = memoryview(data)
        while view:
            written = os.write(self.wfd, view)
            view = view[written:]

    def send_error(self, frame_id: str | None, code: str, message: str) -> None:
        self.send({"type": "error", "id": frame_id, "code": code, "message": message})

    def read_transport(self) -> None:
        data = os.read(self.rfd, CHUNK)
        if not data:
            self.running = False
            return
        self.inbuf += data
        while len(self.inbuf) >= 4:
            (length,) = struct.unpack(">I", self.inbuf[:4])
            if length > MAX_FRAME:
                self.send_error(None, "frame_too_large", f"frame of {length} bytes")
                self.running = False
                return
            if len(self.inbuf) < 4 + length:
                return
            payload = bytes(self.inbuf[4 : 4 + length])
            del self.inbuf[: 4 + length]
            try:
                self.dispatch(decode_frame(payload))
            except ProtocolError as exc:
                self.send_error(exc.frame_id, exc.code, exc.message)

    # --- requests ----------------------------------------------------------
    def dispatch(self, frame: dict[str, Any]) -> None:
        kind, frame_id = validate(frame)
        if kind == "exec":
            self.do_exec(frame_id, frame)
        elif kind == "stdin":
            self.do_stdin(frame_id, frame)
        elif kind == "signal":
            self.do_signal(frame_id, frame["signal"])
        elif kind == "shutdown":
            for proc in self.procs.values():
                self.kill(proc)
            self.send({"type": "ok", "id": frame_id})
            self.running = False
        else:
            try:
                with _as_sandbox_user(kind != "sync"):
                    result = FILE_OPS[kind](frame, frame_id)
            except OSError as exc:
                code = ERRNO_CODES.get(exc.errno or 0, "io_error")
                raise ProtocolError(code, f"{kind}: {exc}", frame_id) from None
            reply = {"type": "ok", "id": frame_id}
            reply.update(result)
            self.send(reply)

    def do_exec(self, frame_id: str, frame: dict[str, Any]) -> None:
        argv = frame["argv"]
        if not argv or not all(isinstance(arg, str) for arg in argv):
            raise ProtocolError("invalid_field", "argv must be a non-empty string list", frame_id)
        env = frame.get("env")
        if env is not None and not all(
            isinstance(k, str) and isinstance(v, str) and "=" not in k for k, v in env.items()
        ):
            raise ProtocolError("invalid_field", "env must map names to strings", frame_id)
        if frame_id in self.procs:
            raise ProtocolError("duplicate_id", f"id {frame_id} is already running", frame_id)
        stdin = frame.get("stdin")
        data = b64decode(stdin, frame_id) if stdin is not None else b""
        budget = frame.get("max_output_bytes")
        budget = -1 if budget is None else budget + 1  # +1 lets the host see the overflow
        in_r, in_w = os.pipe()
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        errpipe_r, errpipe_w = os.pipe2(os.O_CLOEXEC)
        pid = os.fork()
        if pid == 0:
            _child(argv, frame.get("cwd"), env, (in_r, out_w, err_w), errpipe_w)
        for fd in (in_r, out_w, err_w, errpipe_w):
            os.close(fd)
        failure = os.read(errpipe_r, 64)
        os.close(errpipe_r)
        if failure:
            os.waitpid(pid, 0)
            for fd in (in_w, out_r, err_r):
                os.close(fd)
            err = int(failure)
            msg = f"bulkhead: cannot execute {argv[0]}: {os.strerror(err)}\n"
            self.send({"type": "started", "id": frame_id, "pid": None})
            self.send({"type": "stderr", "id": frame_id, "data": b64encode(msg.encode())})
            code = 127 if err == errno.ENOENT else 126
            self.send({"type": "exit", "id": frame_id, "exit_code": code, "signal": None})
            return
        for fd in (in_w, out_r, err_r):
            os.set_blocking(fd, False)
        proc = Process(frame_id, pid, in_w, out_r, err_r, budget)
        self.procs[frame_id] = proc
        for fd in (out_r, err_r, proc.pidfd):
            self.by_fd[fd] = proc
            self.poll.register(fd, POLL_IN)
        self.by_fd[in_w] = proc
        self.send({"type": "started", "id": frame_id, "pid": pid})
        proc.stdin_buf += data
        proc.stdin_eof = not frame.get("stdin_open", False)
        self.flush_stdin(proc)

    def do_stdin(self, frame_id: str, frame: dict[str, Any]) -> None:
        proc = self.procs.get(frame_id)
        if proc is None or proc.stdin_fd is None:
            raise ProtocolError(
                "unknown_id", f"no process with open stdin for {frame_id}", frame_id
            )
        if frame.get("data") is not None:
            proc.stdin_buf += b64decode(frame["data"], frame_id)
        if frame.get("eof", False):
            proc.stdin_eof = True
        self.flush_stdin(proc)

    def do_signal(self, frame_id: str, signum: int) -> None:
        proc = self.procs.get(frame_id)
        if proc is None:
            raise ProtocolError("unknown_id", f"no running process for {frame_id}", frame_id)
        try:
            os.killpg(proc.pid, signum)
        except ProcessLookupError:
            pass
        except (OSError, ValueError) as exc:
            raise ProtocolError("invalid_field", f"signal: {exc}", frame_id) from None
        self.send({"type": "ok", "id": frame_id})

    # --- process I/O -------------------------------------------------------
    def flush_stdin(self, proc: Process) -> None:
        fd = proc.stdin_fd
        if fd is None:
            return
        try:
            while proc.stdin_buf:
                written = os.write(fd, proc.stdin_buf[:CHUNK])
                del proc.stdin_buf[:written]
        except BlockingIOError:
            self.poll.register(fd, select.POLLOUT)
            return
        except BrokenPipeError:
            proc.stdin_buf.clear()
            proc.stdin_eof = True
        if proc.stdin_eof:
            self.close_stdin(proc)
        else:
            try:
                self.poll.unregister(fd)
            except KeyError:
                pass

    def close_stdin(self, proc: Process) -> None:
        fd = proc.stdin_fd
        if fd is None:
            return
        proc.stdin_fd = None
        try:
            self.poll.unregister(fd)
        except KeyError:
            pass
        self.by_fd.pop(fd, None)
        os.close(fd)

    def read_output(self, proc: Process, fd: int) -> bool:
        """Read one chunk; returns False at EOF (or when the pipe has nothing)."""
        try:
            data = os.read(fd, CHUNK)
        except BlockingIOError:
            return False
        if not data:
            self.poll.unregister(fd)
            del self.by_fd[fd]
            del proc.streams[fd]
            os.close(fd)
            return False
        name = proc.streams[fd]
        budget = proc.budget[name]
        if budget >= 0:
            data = data[:budget]
            proc.budget[name] = budget - len(data)
        if data:
            self.send({"type": name, "id": proc.id, "data": b64encode(data)})
        return True

    def reap(self, proc: Process) -> None:
        _, status = os.waitpid(proc.pid, 0)
        for fd in list(proc.streams):
            # Drain what the process left in the pipe; bounded in case a background
            # grandchild keeps writing.
            for _ in range(64):
                if fd not in proc.streams or not self.read_output(proc, fd):
                    break
        for fd in list(proc.streams):  # held open by a background grandchild
            self.poll.unregister(fd)
            del self.by_fd[fd]
            os.close(fd)
        proc.streams.clear()
        if proc.stdin_fd is not None:
            self.close_stdin(proc)
        self.poll.unregister(proc.pidfd)
        del self.by_fd[proc.pidfd]
        os.close(proc.pidfd)
        del self.procs[proc.id]
        if os.WIFSIGNALED(status):
            code, sig = None, os.WTERMSIG(status)
        else:
            code, sig = os.waitstatus_to_exitcode(status), None
        self.send({"type": "exit", "id": proc.id, "exit_code": code, "signal": sig})

    def kill(self, proc: Process) -> None:
        try:
            os.killpg(proc.pid, _signal.SIGKILL)
        except OSError:
            pass

    def serve(self) -> None:
        self.poll.register(self.rfd, POLL_IN)
        self.send(
            {
                "type": "hello",
                "agent_version": AGENT_VERSION,
                "capabilities": CAPABILITIES,
                "pid": os.getpid(),
            }
        )
        while self.running:
            for fd, _events in self.poll.poll():
                if fd == self.rfd:
                    self.read_transport()
                    continue
                proc = self.by_fd.get(fd)
                if proc is None:
                    continue
                if fd == proc.pidfd:
                    self.reap(proc)
                elif fd == proc.stdin_fd:
                    self.flush_stdin(proc)
                elif fd in proc.streams:
                    self.read_output(proc, fd)
        for proc in list(self.procs.values()):
            self.kill(proc)


# --- file operations -------------------------------------------------------
def _stat_dict(path: str, name: str | None = None, follow: bool = False) -> dict[str, Any]:
    st = os.stat(path) if follow else os.lstat(path)
    mode = st.st_mode
    if (mode & 0o170000) == 0o040000:
        kind = "dir"
    elif (mode & 0o170000) == 0o100000:
        kind = "file"
    elif (mode & 0o170000) == 0o120000:
        kind = "symlink"
    else:
        kind = "other"
    info: dict[str, Any] = {
        "type": kind,
        "size": st.st_size,
        "mode": mode & 0o7777,
        "mtime": st.st_mtime,
    }
    if name is not None:
        info["name"] = name
    return info


def op_write_file(frame: dict[str, Any], frame_id: str) -> dict[str, Any]:
    data = b64decode(frame["data"], frame_id)
    mode = frame.get("mode")
    flags = os.O_WRONLY | os.O_CREAT | (os.O_APPEND if frame.get("append") else os.O_TRUNC)
    fd = os.open(frame["path"], flags, 0o644 if mode is None else mode)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        if mode is not None:
            os.fchmod(fd, mode)
    finally:
        os.close(fd)
    return {}


def op_read_file(frame: dict[str, Any], frame_id: str) -> dict[str, Any]:
    path = frame["path"]
    if "offset" in frame or "length" in frame:  # one chunk of a file of any size
        offset, length = frame.get("offset", 0), frame.get("length", MAX_READ_FILE)
        if offset < 0 or not 0 <= length <= MAX_READ_FILE:
            raise ProtocolError("invalid_field", "offset or length out of range", frame_id)
        with open(path, "rb") as handle:
            handle.seek(offset)
            data = handle.read(length)
        return {"data": b64encode(data), "eof": len(data) < length}
    if os.stat(path).st_size > MAX_READ_FILE:
        raise ProtocolError("too_large", f"file is larger than {MAX_READ_FILE} bytes", frame_id)
    with open(path, "rb") as handle:
        data = handle.read(MAX_READ_FILE + 1)
    if len(data) > MAX_READ_FILE:
        raise ProtocolError("too_large", f"file is larger than {MAX_READ_FILE} bytes", frame_id)
    return {"data": b64encode(data)}


def op_list_dir(frame: dict[str, Any], frame_id: str) -> dict[str, Any]:
    path = frame["path"]
    names = sorted(os.listdir(path))
    return {"entries": [_stat_dict(os.path.join(path, name), name) for name in names]}


def op_stat(frame: dict[str, Any], frame_id: str) -> dict[str, Any]:
    return {"stat": _stat_dict(frame["path"], follow=frame.get("follow", False))}


def _remove_tree(path: str) -> None:
    for entry in os.scandir(path):
        if entry.is_dir(follow_symlinks=False):
            _remove_tree(entry.path)
        else:
            os.unlink(entry.path)
    os.rmdir(path)


def op_remove(frame: dict[str, Any], frame_id: str) -> dict[str, Any]:
    path = frame["path"]
    if os.path.isdir(path) and not os.path.islink(path):
        if frame.get("recursive", False):
            _remove_tree(path)
        else:
            os.rmdir(path)
    else:
        os.unlink(path)
    return {}


def op_move(frame: dict[str, Any], frame_id: str) -> dict[str, Any]:
    destination = frame["destination"]
    if os.path.lexists(destination):
        raise ProtocolError("exists", f"move: {destination} already exists", frame_id)
    os.rename(frame["source"], destination)
    return {}


RNDRESEEDCRNG = 0x5207  # <linux/random.h>: reseed the kernel CRNG from its input pool


def op_sync(frame: dict[str, Any], frame_id: str) -> dict[str, Any]:
    """After a snapshot restore: mix fresh host entropy into the kernel RNG (and reseed it)
    and set the wall clock, both best effort (they need root in the guest)."""
    import time  # built in; only restored microVMs pay for it

    entropy = b64decode(frame["entropy"], frame_id)
    try:
        time.clock_settime_ns(time.CLOCK_REALTIME, frame["time_ns"])
    except (OSError, ValueError, OverflowError):
        pass
    fd = os.open("/dev/urandom", os.O_WRONLY)
    try:
        os.write(fd, entropy)
        try:
            import fcntl

            fcntl.ioctl(fd, RNDRESEEDCRNG)
        except (ImportError, OSError):
            pass
    finally:
        os.close(fd)
    return {}


def op_mkdir(frame: dict[str, Any], frame_id: str) -> dict[str, Any]:
    mode = frame.get("mode")
    mode = 0o755 if mode is None else mode
    if frame.get("parents", False):
        os.makedirs(frame["path"], mode, exist_ok=True)
    else:
        os.mkdir(frame["path"], mode)
    return {}


FILE_OPS = {
    "write_file": op_write_file,
    "read_file": op_read_file,
    "list_dir": op_list_dir,
    "stat": op_stat,
    "remove": op_remove,
    "mkdir": op_mkdir,
    "move": op_move,
    "sync": op_sync,
}


class _as_sandbox_user:
    """File operations run with the sandbox user's effective ids, so they create files it
    owns and follow symlinks it planted with its own rights only."""

    def __init__(self, wanted: bool) -> None:
        self.active = wanted and RUN_AS is not None and os.geteuid() == 0

    def __enter__(self) -> None:
        if self.active and RUN_AS is not None:
            os.setegid(RUN_AS[1])
            os.seteuid(RUN_AS[0])

    def __exit__(self, *_exc: object) -> None:
        if self.active:
            os.seteuid(0)
            os.setegid(0)


def _run_as() -> tuple[int, int] | None:
    raw = os.environ.get(RUN_AS_ENV, "")
    if not raw or os.geteuid() != 0:
        return None
    uid, _, gid = raw.partition(":")
    return int(uid), int(gid or uid)


RUN_AS: tuple[int, int] | None = None


def main() -> int:
    global RUN_AS
    RUN_AS = _run_as()
    # If the host end of the transport goes away, writing to it ends the agent.
    _signal.signal(_signal.SIGPIPE, _signal.SIG_DFL)
    Agent(0, 1).serve()
    return 0


if __name__ == "__main__":
    sys.exit(main())
