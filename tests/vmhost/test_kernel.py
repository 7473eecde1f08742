"""The code-interpreter kernels (vmhost/guest/kernel.py and kernel.js), driven over their
line protocol (KERNEL.md) as the host drives them.

The Python kernel runs on /usr/bin/python3 (the sandboxes' interpreter). The pandas and
matplotlib tests use the code-interpreter template's environment, built by `bulkhead image
build --template code-interpreter` (``make test`` builds it; CI fails without it), or the
python named by BULKHEAD_TEST_CI_PYTHON. The JavaScript tests need `node`.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from vmhost.images.pyenv import find_pyenv
from vmhost.settings import default_image_dir
from vmhost.templates import load_template

GUEST = Path(__file__).resolve().parents[2] / "vmhost" / "guest"
SANDBOX_PYTHON = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

Event = dict[str, Any]


class Kernel:
    def __init__(self, proc: asyncio.subprocess.Process, stderr_path: Path) -> None:
        self.proc = proc
        self.stderr_path = stderr_path
        self.ready: Event = {}
        self.cells = 0

    async def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line.encode() + b"\n")
        await self.proc.stdin.drain()

    async def event(self, within: float) -> Event:
        assert self.proc.stdout is not None
        try:
            line = await asyncio.wait_for(self.proc.stdout.readline(), within)
        except TimeoutError:
            raise AssertionError(f"no event within {within} s; {self.diagnostics()}") from None
        if not line:
            raise AssertionError(f"the kernel closed its stdout; {self.diagnostics()}")
        event: Event = json.loads(line)
        return event

    def diagnostics(self) -> str:
        return f"kernel stderr: {self.stderr_path.read_text(errors='replace')[-2000:]!r}"

    async def start_cell(self, code: str) -> str:
        self.cells += 1
        cell_id = f"cell-{self.cells}"
        await self.send(json.dumps({"id": cell_id, "code": code}))
        return cell_id

    async def events_until_end(self, cell_id: str | None, within: float) -> list[Event]:
        loop = asyncio.get_running_loop()
        events: list[Event] = []
        deadline = loop.time() + within
        while True:
            event = await self.event(max(0.1, deadline - loop.time()))
            event["_at"] = loop.time()
            assert event["id"] == cell_id, (event, events)
            events.append(event)
            if event["type"] == "end":
                return events

    async def run(self, code: str, within: float = 30.0) -> list[Event]:
        """Run one cell; returns its events (each with its arrival time in "_at")."""
        cell_id = await self.start_cell(code)
        return await self.events_until_end(cell_id, within)


async def start_kernel(argv: list[str], home: Path, within: float = 30.0) -> Kernel:
    stderr_path = home / "kernel.stderr"
    with stderr_path.open("wb") as stderr:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            cwd=home,
            env={**os.environ, "HOME": str(home)},
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=stderr,
            limit=64 * 1024 * 1024,
        )
    kernel = Kernel(proc, stderr_path)
    kernel.ready = await kernel.event(within)
    return kernel


async def stop_kernel(kernel: Kernel) -> None:
    if kernel.proc.returncode is None:
        kernel.proc.kill()
    await kernel.proc.wait()


def text(events: list[Event], stream: str = "stdout") -> str:
    return "".join(e["text"] for e in events if e["type"] == stream)


def results(events: list[Event]) -> list[Event]:
    return [e for e in events if e["type"] == "result"]


def only_error(events: list[Event]) -> Event:
    errors = [e for e in events if e["type"] == "error"]
    assert len(errors) == 1, events
    return errors[0]


@pytest.fixture
async def py(tmp_path: Path) -> AsyncIterator[Kernel]:
    kernel = await start_kernel([SANDBOX_PYTHON, "-u", str(GUEST / "kernel.py")], tmp_path)
    yield kernel
    await stop_kernel(kernel)


@pytest.fixture(scope="session")
def ci_python() -> str:
    python = os.environ.get("BULKHEAD_TEST_CI_PYTHON")
    if python:
        return python
    pyenv = find_pyenv(load_template("code-interpreter"), default_image_dir())
    if pyenv is not None:
        return str(pyenv / "bin" / "python3")
    reason = (
        "the code-interpreter template is not built "
        "(bulkhead image build --template code-interpreter)"
    )
    if os.environ.get("CI"):
        pytest.fail(reason)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def ci_home(ci_python: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A HOME shared by the scientific tests, where matplotlib has built its font cache
    (which takes a while and logs a warning when slow) before the kernels start."""
    home = tmp_path_factory.mktemp("ci-home")
    env = {**os.environ, "HOME": str(home), "MPLBACKEND": "Agg"}
    subprocess.run([ci_python, "-c", "import matplotlib.pyplot"], env=env, check=True, timeout=120)
    return home


@pytest.fixture
async def sci(ci_python: str, ci_home: Path) -> AsyncIterator[Kernel]:
    kernel = await start_kernel([ci_python, "-u", str(GUEST / "kernel.py")], ci_home, 60)
    yield kernel
    await stop_kernel(kernel)


@pytest.fixture
async def js(tmp_path: Path) -> AsyncIterator[Kernel]:
    node = shutil.which("node")
    if node is None:
        print("skipping: the JavaScript kernel needs node, which is not on PATH")
        pytest.skip("node is not installed")
    kernel = await start_kernel([node, str(GUEST / "kernel.js")], tmp_path)
    yield kernel
    await stop_kernel(kernel)


# --- Python kernel ---------------------------------------------------------------------


async def test_ready_line(py: Kernel) -> None:
    version = ".".join(map(str, sys.version_info[:3]))
    if SANDBOX_PYTHON != sys.executable:
        proc = await asyncio.create_subprocess_exec(
            SANDBOX_PYTHON, "-c", "import platform; print(platform.python_version())",
            stdout=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, _ = await proc.communicate()
        version = out.decode().strip()
    assert py.ready == {"type": "ready", "language": "python", "version": version}


async def test_output_streams_as_it_happens(py: Kernel) -> None:
    code = "import time\nprint('first', end='')\ntime.sleep(2)\nprint('second')"
    events = await py.run(code)
    assert events[0]["type"] == "stdout" and events[0]["text"] == "first"
    assert text(events) == "firstsecond\n"
    second = next(e for e in events if "second" in e.get("text", ""))
    assert second["_at"] - events[0]["_at"] >= 1.0  # not held back until the cell ended
    assert events[-1]["type"] == "end"


async def test_child_process_output_comes_before_end(py: Kernel) -> None:
    code = (
        "import os, subprocess\n"
        "os.system('echo hi; echo oops >&2')\n"
        "subprocess.run(['echo', 'sub'])\n"
        "print('after')"
    )
    events = await py.run(code)
    assert text(events) == "hi\nsub\nafter\n"
    assert text(events, "stderr") == "oops\n"
    assert events[-1] == {**events[-1], "type": "end", "execution_count": 1}


async def test_large_output_is_complete_and_ordered(py: Kernel) -> None:
    code = "import sys\nfor i in range(20000):\n    print(i)\nsys.stderr.write('done\\n')\n7"
    events = await py.run(code)
    assert text(events) == "".join(f"{i}\n" for i in range(20000))
    assert [e["type"] for e in events][-3:] == ["stderr", "result", "end"]


async def test_state_persists_across_cells(py: Kernel) -> None:
    await py.run("import math\nx = 40\ndef f(v):\n    return v + 2\nclass C:\n    k = 1")
    events = await py.run("f(x) + C.k + math.floor(0.5), __name__")
    assert results(events)[0]["data"]["text/plain"] == "(43, '__main__')"


async def test_last_expression_result(py: Kernel) -> None:
    events = await py.run("1 + 1")
    assert results(events) == [
        {**results(events)[0], "data": {"text/plain": "2"}, "is_main_result": True}
    ]
    assert results(await py.run("y = 5")) == []
    assert results(await py.run("None")) == []
    assert results(await py.run("y;")) == []  # a trailing ";" hides the value
    assert results(await py.run("_ * 10"))[0]["data"] == {"text/plain": "20"}


async def test_rich_reprs_and_failing_ones(py: Kernel) -> None:
    code = (
        "class Rich:\n"
        "    def __repr__(self): return 'Rich()'\n"
        "    def _repr_html_(self): return '<b>rich</b>'\n"
        "    def _repr_markdown_(self): return '**rich**'\n"
        "    def _repr_png_(self): raise RuntimeError('no png')\n"
        "    def _repr_json_(self): return {'a': [1]}\n"
        "Rich()"
    )
    [result] = results(await py.run(code))
    assert result["data"] == {
        "text/plain": "Rich()",
        "text/html": "<b>rich</b>",
        "text/markdown": "**rich**",
        "application/json": {"a": [1]},
    }


async def test_exception_reports_the_cell(py: Kernel) -> None:
    await py.run("pass")
    events = await py.run("def f():\n    raise ValueError('boom')\n\nf()")
    error = only_error(events)
    assert (error["name"], error["value"]) == ("ValueError", "boom")
    tb = "\n".join(error["traceback"])
    assert '"<cell-2>", line 4' in tb and "raise ValueError('boom')" in tb
    assert "kernel.py" not in tb
    assert error["traceback"][-1] == "ValueError: boom"
    assert events[-1]["type"] == "end" and events[-1]["execution_count"] == 2


async def test_syntax_error(py: Kernel) -> None:
    events = await py.run("x = (1,\nprint(")
    error = only_error(events)
    assert error["name"] == "SyntaxError"
    assert any("<cell-1>" in line for line in error["traceback"])
    assert [e["type"] for e in events] == ["error", "end"]
    assert results(await py.run("2 * 3"))[0]["data"]["text/plain"] == "6"


async def test_interrupt_keeps_state(py: Kernel) -> None:
    await py.run("x = 42")
    py.proc.send_signal(signal.SIGINT)  # idle: ignored
    await asyncio.sleep(0.3)
    for code in ("while True:\n    pass", "import time\ntime.sleep(30)"):
        cell_id = await py.start_cell("print('started', flush=True)\n" + code)
        first = await py.event(30)
        assert first["type"] == "stdout", first
        await asyncio.sleep(0.3)
        py.proc.send_signal(signal.SIGINT)
        events = await py.events_until_end(cell_id, 10)
        assert only_error(events)["name"] == "KeyboardInterrupt"
        assert events[-1]["type"] == "end"
    events = await py.run("x + 1")
    assert results(events)[0]["data"]["text/plain"] == "43"
    assert events[-1]["execution_count"] == 4


async def test_execution_count_and_invalid_requests(py: Kernel) -> None:
    assert (await py.run("1"))[-1]["execution_count"] == 1
    assert (await py.run("1/0"))[-1]["execution_count"] == 2
    await py.send(json.dumps({"id": "bad", "code": "1", "extra": True}))
    events = await py.events_until_end("bad", 10)
    assert [e["type"] for e in events] == ["error", "end"]
    assert events[0]["name"] == "ProtocolError" and "extra" in events[0]["value"]
    assert events[1]["execution_count"] is None
    await py.send("this is not json")
    events = await py.events_until_end(None, 10)
    assert [e["type"] for e in events] == ["error", "end"]
    assert (await py.run("'still alive'"))[-1]["execution_count"] == 3


async def test_input_is_refused(py: Kernel) -> None:
    error = only_error(await py.run("input('name? ')"))
    assert error["name"] == "StdinNotImplementedError"
    assert "not supported" in error["value"]
    events = await py.run("import sys, os\nsys.stdin.read(), os.read(0, 10)")
    assert results(events)[0]["data"]["text/plain"] == "('', b'')"


async def test_top_level_await(py: Kernel) -> None:
    events = await py.run("import asyncio\nawait asyncio.sleep(0.01)\n'done'")
    assert results(events)[0]["data"]["text/plain"] == "'done'"


async def test_system_exit_does_not_end_the_kernel(py: Kernel) -> None:
    assert only_error(await py.run("import sys\nsys.exit(3)"))["name"] == "SystemExit"
    assert results(await py.run("'alive'"))[0]["data"]["text/plain"] == "'alive'"


async def test_eof_exits_zero(py: Kernel) -> None:
    await py.run("x = 1")
    assert py.proc.stdin is not None
    py.proc.stdin.close()
    assert await asyncio.wait_for(py.proc.wait(), 10) == 0


# --- Python kernel with pandas and matplotlib --------------------------------------------


async def test_dataframe_has_html(sci: Kernel) -> None:
    events = await sci.run("import pandas as pd\npd.DataFrame({'a': [1, 2], 'b': [3, 4]})", 60)
    [result] = results(events)
    assert "<table" in result["data"]["text/html"]
    assert "a  b" in result["data"]["text/plain"]


def assert_png(result: Event) -> None:
    assert result["is_main_result"] is False
    png = base64.b64decode(result["data"]["image/png"])
    assert png.startswith(PNG_MAGIC) and len(png) > 1000
    assert result["data"]["text/plain"] == "<Figure size 640x480 with 1 Axes>"


async def test_matplotlib_figures(sci: Kernel) -> None:
    events = await sci.run(
        "import matplotlib.pyplot as plt\nplt.plot([1, 2, 3])\nplt.show()\nprint('shown')", 60
    )
    assert events[0]["type"] == "result" and events[-1]["type"] == "end"
    assert_png(events[0])  # sent by show(), before what the cell printed afterwards
    assert text(events) == "shown\n" and len(results(events)) == 1
    events = await sci.run("plt.plot([1, 2, 3])\nplt.title('left open');", 60)
    assert [e["type"] for e in events] == ["result", "end"]
    assert_png(events[0])
    events = await sci.run("import matplotlib\nplt.get_fignums(), matplotlib.get_backend()")
    assert results(events)[0]["data"]["text/plain"].lower() == "([], 'agg')"
    assert all(e["type"] != "stderr" for e in events)


async def test_matplotlib_no_warning_on_show(sci: Kernel) -> None:
    events = await sci.run(
        "import warnings\nwarnings.simplefilter('always')\n"
        "import matplotlib.pyplot as plt\nfig, ax = plt.subplots()\nax.plot([3, 1])\nplt.show()",
        60,
    )
    assert text(events, "stderr") == ""
    assert [e["type"] for e in events] == ["result", "end"]
    assert_png(events[0])


# --- JavaScript kernel -----------------------------------------------------------------


async def test_js_ready_and_console(js: Kernel) -> None:
    assert js.ready["type"] == "ready" and js.ready["language"] == "javascript"
    events = await js.run("console.log('hello', 1 + 1); console.error('bad'); console.warn('w')")
    assert text(events) == "hello 2\n"
    assert text(events, "stderr") == "bad\nw\n"
    assert results(events) == [] and events[-1]["execution_count"] == 1


async def test_js_state_and_completion_value(js: Kernel) -> None:
    await js.run("let a = 40;\nconst b = 1;\nfunction f(x) { return x + b }\nclass K {}")
    events = await js.run("f(a) + 1")
    assert results(events)[0]["data"] == {"text/plain": "42"}
    assert results(events)[0]["is_main_result"] is True
    events = await js.run("({ x: [1, 2], s: 'str', k: new K() })")
    assert results(events)[0]["data"]["text/plain"] == "{ x: [ 1, 2 ], s: 'str', k: K {} }"
    assert results(await js.run("let unused = 1")) == []
    assert results(await js.run("require('path').join('a', 'b')"))[0]["data"] == {
        "text/plain": "'a/b'"
    }


async def test_js_errors(js: Kernel) -> None:
    error = only_error(await js.run("function g() { null.x }\ng()"))
    assert error["name"] == "TypeError"
    assert "Cannot read properties of null" in error["value"]
    assert any("<cell-1>:1" in line for line in error["traceback"])
    assert not any("kernel.js" in line for line in error["traceback"])
    assert only_error(await js.run("x +"))["name"] == "SyntaxError"
    assert results(await js.run("'ok'"))[0]["data"] == {"text/plain": "'ok'"}


async def test_js_await(js: Kernel) -> None:
    code = (
        "const v = await new Promise((resolve) => setTimeout(() => {\n"
        "  console.log('tick');\n"
        "  resolve(21);\n"
        "}, 50));\n"
        "const { p, q: [r] } = { p: 1, q: [2] }\n"
        "v * 2 + p + r"
    )
    events = await js.run(code)
    assert [e["type"] for e in events] == ["stdout", "result", "end"]
    assert events[0]["text"] == "tick\n"
    assert results(events)[0]["data"] == {"text/plain": "45"}
    assert results(await js.run("[v, p, r]"))[0]["data"] == {"text/plain": "[ 21, 1, 2 ]"}
    error = only_error(await js.run("await Promise.reject(new RangeError('nope'))"))
    assert (error["name"], error["value"]) == ("RangeError", "nope")


async def test_js_interrupt_keeps_state(js: Kernel) -> None:
    await js.run("let kept = 'yes'")
    js.proc.send_signal(signal.SIGINT)  # idle: ignored
    await asyncio.sleep(0.3)
    for code in ("while (true) {}", "await new Promise(() => {})"):
        cell_id = await js.start_cell("console.log('started');\n" + code)
        assert (await js.event(10))["type"] == "stdout"
        await asyncio.sleep(0.3)
        js.proc.send_signal(signal.SIGINT)
        events = await js.events_until_end(cell_id, 10)
        assert only_error(events)["name"] == "KeyboardInterrupt"
    assert results(await js.run("kept"))[0]["data"] == {"text/plain": "'yes'"}


async def test_js_invalid_request_and_eof(js: Kernel) -> None:
    await js.send(json.dumps({"id": "bad", "code": "1", "extra": True}))
    events = await js.events_until_end("bad", 10)
    assert [e["type"] for e in events] == ["error", "end"]
    assert events[1]["execution_count"] is None
    assert js.proc.stdin is not None
    js.proc.stdin.close()
    assert await asyncio.wait_for(js.proc.wait(), 10) == 0
