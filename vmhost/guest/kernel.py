"""Bulkhead Python kernel: stateful, notebook-style cell execution inside a sandbox.

Stdlib-only and standalone; the host starts it as ``python3 -u kernel.py`` with pipes for
stdin/stdout/stderr and the sandbox home as cwd. The line protocol (JSON requests on stdin,
JSON events on the original stdout) is described in KERNEL.md next to this file.

How output is captured: at startup the kernel keeps private dups of the original stdin and
stdout (the protocol channel), points fd 0 at /dev/null and fds 1/2 at pipes. A reader
thread turns whatever arrives on those pipes -- from ``print``, C extensions or child
processes alike -- into ``stdout``/``stderr`` events as it happens. Before the kernel sends
anything itself (a result, an error, ``end``) it asks the reader thread to drain both pipes,
so every event keeps the order in which the output was produced.

SIGINT raises KeyboardInterrupt only while user code runs (the ``interruptible`` flag);
anywhere else, including while the kernel writes events, it is ignored.
"""

from __future__ import annotations

import ast
import base64
import builtins
import codecs
import io
import json
import linecache
import os
import select
import signal
import sys
import threading
import traceback
from collections.abc import Callable
from typing import Any

CO_COROUTINE = 0x80
MIME_METHODS = (
    ("text/html", "_repr_html_"),
    ("text/markdown", "_repr_markdown_"),
    ("text/latex", "_repr_latex_"),
    ("image/svg+xml", "_repr_svg_"),
    ("image/png", "_repr_png_"),
    ("image/jpeg", "_repr_jpeg_"),
    ("application/json", "_repr_json_"),
)
MAX_PENDING = 1024 * 1024  # output buffered while no cell runs (background processes)


class StdinNotImplementedError(RuntimeError):
    """Raised by input(): stdin is the protocol channel, cells cannot read it."""


class Channel:
    """Thread-safe writer of JSON lines on the protocol fd."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.lock = threading.Lock()

    def write(self, event: dict[str, Any]) -> None:
        line = json.dumps(event, separators=(",", ":")) + "\n"
        data = memoryview(line.encode("ascii"))
        with self.lock:
            try:
                while data:
                    data = data[os.write(self.fd, data) :]
            except OSError:
                os._exit(1)  # the host is gone


class Reader(threading.Thread):
    """Reads the fd 1/2 pipes and turns their bytes into stdout/stderr events."""

    def __init__(self, channel: Channel, fds: dict[int, str]) -> None:
        super().__init__(name="kernel-output", daemon=True)
        self.channel = channel
        self.fds = fds
        self.decoders = {fd: codecs.getincrementaldecoder("utf-8")("replace") for fd in fds}
        self.wake_r, self.wake_w = os.pipe()
        self.cond = threading.Condition()
        self.cell_id: str | None = None
        self.pending: list[tuple[str, str]] = []
        self.pending_size = 0
        self.requested = self.done = 0
        self.final = False
        for fd in (*fds, self.wake_r):
            os.set_blocking(fd, False)

    def run(self) -> None:
        poller = select.poll()
        for fd in (*self.fds, self.wake_r):
            poller.register(fd, select.POLLIN)
        while True:
            for fd, _ in poller.poll():
                if fd != self.wake_r:
                    self._read(fd)
                    continue
                _read_nb(self.wake_r)
                with self.cond:
                    target, final = self.requested, self.final
                for out_fd in self.fds:  # bounded, in case a background process keeps writing
                    for _ in range(64):
                        if not self._read(out_fd):
                            break
                    if final:
                        self._deliver(out_fd, self.decoders[out_fd].decode(b"", final=True))
                with self.cond:
                    self.done = target
                    self.cond.notify_all()

    def _read(self, fd: int) -> bool:
        data = _read_nb(fd)
        if data:
            self._deliver(fd, self.decoders[fd].decode(data))
        return bool(data)

    def _deliver(self, fd: int, text: str) -> None:
        if not text:
            return
        with self.cond:
            if self.cell_id is None:  # idle: keep it for the next cell
                if self.pending_size < MAX_PENDING:
                    self.pending.append((self.fds[fd], text))
                    self.pending_size += len(text)
                return
            self.channel.write({"type": self.fds[fd], "id": self.cell_id, "text": text})

    def sync(self, final: bool = False) -> None:
        """Return once everything written to fds 1/2 so far has been sent as events."""
        with self.cond:
            self.requested += 1
            self.final = final
            target = self.requested
        os.write(self.wake_w, b"!")
        with self.cond:
            while self.done < target:
                self.cond.wait()

    def set_cell(self, cell_id: str | None) -> None:
        with self.cond:
            self.cell_id = cell_id
            if cell_id is not None:
                for stream, text in self.pending:
                    self.channel.write({"type": stream, "id": cell_id, "text": text})
                self.pending, self.pending_size = [], 0


def _read_nb(fd: int) -> bytes:
    try:
        return os.read(fd, 65536)
    except BlockingIOError:
        return b""


class _Stream(io.TextIOWrapper):
    """sys.stdout/sys.stderr: every write reaches the fd at once, like ``python -u``."""

    def write(self, s: str) -> int:
        n = super().write(s)
        self.flush()
        return n


class Kernel:
    def __init__(self) -> None:
        proto_in, proto_out, self.host_stderr = os.dup(0), os.dup(1), os.dup(2)
        self.requests = os.fdopen(proto_in, "rb")
        self.channel = Channel(proto_out)
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        os.close(devnull)
        fds: dict[int, str] = {}
        for target, name in ((1, "stdout"), (2, "stderr")):
            r, w = os.pipe()
            os.dup2(w, target)
            os.close(w)
            fds[r] = name
        self.reader = Reader(self.channel, fds)
        self.reader.start()
        self.streams: list[_Stream] = []
        for name, fd in (("stdout", 1), ("stderr", 2)):
            raw = io.FileIO(fd, "w", closefd=False)
            stream = _Stream(
                io.BufferedWriter(raw), "utf-8", "backslashreplace", line_buffering=True
            )
            setattr(sys, name, stream)
            setattr(sys, f"__{name}__", stream)
            self.streams.append(stream)
        sys.stdin = open(0, encoding="utf-8", closefd=False)
        builtins.input = _no_input
        os.environ["MPLBACKEND"] = "Agg"
        sys.meta_path.insert(0, _PyplotHook(self))
        self.ns: dict[str, Any] = {"__name__": "__main__", "__builtins__": builtins}
        self.count = 0
        self.interruptible = False
        self.loop: Any = None
        signal.signal(signal.SIGINT, self._on_sigint)

    def _on_sigint(self, signum: int, frame: Any) -> None:
        if self.interruptible:
            raise KeyboardInterrupt

    def _guarded(self, fn: Callable[..., Any], *args: Any) -> tuple[Any, BaseException | None]:
        """Run user-facing code with SIGINT enabled; return (value, exception)."""
        self.interruptible = True
        try:
            return fn(*args), None
        except BaseException as exc:
            return None, exc
        finally:
            self.interruptible = False

    def send(self, event: dict[str, Any]) -> None:
        """Send an event from the main thread after the output produced before it."""
        previous, self.interruptible = self.interruptible, False
        try:
            for stream in self.streams:
                try:
                    stream.flush()
                except Exception:
                    pass
            self.reader.sync()
            self.channel.write(event)
        finally:
            self.interruptible = previous

    def serve(self) -> None:
        version = ".".join(map(str, sys.version_info[:3]))
        self.channel.write({"type": "ready", "language": "python", "version": version})
        for line in self.requests:
            cell_id: Any = None
            try:
                request = json.loads(line)
                if not isinstance(request, dict):
                    raise ValueError("a request must be a JSON object")
                cell_id = request.get("id")
                if not isinstance(cell_id, str):
                    cell_id = None
                    raise ValueError('"id" must be a string')
                if not isinstance(request.get("code"), str):
                    raise ValueError('"code" must be a string')
                unknown = sorted(set(request) - {"id", "code"})
                if unknown:
                    raise ValueError(f"unknown field(s): {', '.join(unknown)}")
            except ValueError as exc:
                self.reader.set_cell(cell_id)
                error = {"name": "ProtocolError", "value": str(exc), "traceback": []}
                self.send({"type": "error", "id": cell_id, **error})
                self.send({"type": "end", "id": cell_id, "execution_count": None})
                self.reader.set_cell(None)
                continue
            self.execute(cell_id, request["code"])
        os._exit(0)

    def execute(self, cell_id: str, code: str) -> None:
        self.count += 1
        self.reader.set_cell(cell_id)
        filename = f"<cell-{self.count}>"
        linecache.cache[filename] = (len(code), None, code.splitlines(True), filename)
        error: BaseException | None
        try:
            body, last = _compile(code, filename)
        except (SyntaxError, ValueError, OverflowError) as exc:
            value, error = None, exc
        else:
            value, error = self._guarded(self._run, body, last)
        if error is None and value is not None:
            self.ns["_"] = value
            bundle, error = self._guarded(_bundle, value)
            if bundle is not None:
                self.send({"type": "result", "id": cell_id, "data": bundle, "is_main_result": True})
        if error is not None:
            self.send({"type": "error", "id": cell_id, **_describe(error)})
        self.emit_figures()
        self.reader.sync(final=True)
        self.send({"type": "end", "id": cell_id, "execution_count": self.count})
        self.reader.set_cell(None)

    def _run(self, body: Any, last: Any) -> Any:
        value = None
        for code in (body, last):
            if code is None:
                continue
            value = eval(code, self.ns)
            if code.co_flags & CO_COROUTINE:  # top-level await
                if self.loop is None:
                    import asyncio

                    self.loop = asyncio.new_event_loop()
                value = self.loop.run_until_complete(value)
        return value

    def emit_figures(self) -> None:
        """Send every open matplotlib figure as an image/png result, then close them."""
        plt = sys.modules.get("matplotlib.pyplot")
        if plt is None or self.reader.cell_id is None:
            return
        try:
            for num in plt.get_fignums():
                figure = plt.figure(num)
                buf = io.BytesIO()
                figure.savefig(buf, format="png")
                png = base64.b64encode(buf.getvalue()).decode()
                data = {"image/png": png, "text/plain": repr(figure)}
                event = {"type": "result", "id": self.reader.cell_id, "data": data}
                self.send({**event, "is_main_result": False})
            plt.close("all")
        except Exception:
            traceback.print_exc()  # a stderr event of the cell


class _PyplotHook:
    """Meta-path finder that replaces ``matplotlib.pyplot.show`` as pyplot is imported."""

    def __init__(self, kernel: Kernel) -> None:
        self.kernel = kernel

    def find_spec(self, name: str, path: Any, target: Any = None) -> Any:
        if name != "matplotlib.pyplot":
            return None
        for finder in sys.meta_path:
            find = getattr(finder, "find_spec", None)
            spec = None if finder is self or find is None else find(name, path, target)
            if spec is not None and spec.loader is not None:
                spec.loader.exec_module = self._wrap(spec.loader.exec_module)
                return spec
        return None

    def _wrap(self, exec_module: Callable[[Any], None]) -> Callable[[Any], None]:
        def patched(module: Any) -> None:
            exec_module(module)
            module.show = lambda *args, **kwargs: self.kernel.emit_figures()

        return patched


def _no_input(prompt: object = "") -> str:
    raise StdinNotImplementedError("input() is not supported in the code interpreter")


def _compile(code: str, filename: str) -> tuple[Any, Any]:
    """Split a cell into its statements and, if it ends with an expression, that expression."""
    flags = ast.PyCF_ALLOW_TOP_LEVEL_AWAIT
    tree = ast.parse(code, filename, "exec")
    last = None
    # like IPython, a trailing ";" hides the value of the last expression
    if tree.body and isinstance(tree.body[-1], ast.Expr) and not code.rstrip().endswith(";"):
        expr = ast.Expression(tree.body[-1].value)
        del tree.body[-1]
        last = compile(expr, filename, "eval", flags=flags, dont_inherit=True)
    body = compile(tree, filename, "exec", flags=flags, dont_inherit=True)
    return body, last


def _bundle(value: Any) -> dict[str, Any]:
    """The MIME bundle of a cell's value: repr() plus what its _repr_*_ methods offer."""
    try:
        data: dict[str, Any] = {"text/plain": repr(value)}
    except Exception as exc:
        data = {"text/plain": f"<{type(value).__name__} object; repr() failed: {exc!r}>"}
    if isinstance(value, type):  # a class, not an instance: its _repr_*_ are unbound
        return data
    for mime, name in (*MIME_METHODS, ("*", "_repr_mimebundle_")):
        try:  # a missing, failing or odd repr method is skipped
            method = getattr(value, name, None)
            if not callable(method):
                continue
            out = method()
            if isinstance(out, tuple) and len(out) == 2:  # (data, metadata)
                out = out[0]
            if isinstance(out, bytes) and mime.startswith("image/"):
                out = base64.b64encode(out).decode()
            json.dumps(out, allow_nan=False)
            if mime == "*":
                data.update({k: v for k, v in out.items() if k != "text/plain"})
            elif mime == "application/json" or isinstance(out, str):
                data[mime] = out
        except Exception:
            continue
    return data


def _describe(exc: BaseException) -> dict[str, Any]:
    """Error event fields; the traceback starts at the cell and skips the kernel's frames."""
    report = traceback.TracebackException.from_exception(exc)
    frames = list(report.stack)
    while frames and not frames[0].filename.startswith("<cell-"):
        frames.pop(0)
    frames = [frame for frame in frames if frame.filename != __file__]
    report.stack = traceback.StackSummary.from_list(frames)
    lines = "".join(report.format()).splitlines()
    return {"name": type(exc).__name__, "value": str(exc), "traceback": lines}


if __name__ == "__main__":
    kernel = Kernel()
    try:
        kernel.serve()
    except BaseException:  # a kernel bug: report it where the host can see it
        os.write(kernel.host_stderr, traceback.format_exc().encode())
        os._exit(70)
