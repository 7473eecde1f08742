"""Runs through POST /v1/runs: languages, stdin, files, streaming, caps, exit codes."""

from __future__ import annotations

import base64
import json
import time

from tests.vmhost.conftest import Vmhost
from tests.vmhost.helpers import assert_clean, sandbox_pids


async def test_python_stdout_stderr_exit_code(vmhost: Vmhost) -> None:
    before = sandbox_pids()
    code = "import sys\nprint('hello')\nprint('oops', file=sys.stderr)\nsys.exit(3)\n"
    lines, result = await vmhost.run(language="python", code=code)
    assert result["exit_code"] == 3
    assert result["signal"] is None
    assert result["stdout"] == "hello\n"
    assert result["stderr"] == "oops\n"
    assert result["termination_reason"] == "exit"
    assert result["error"] is None
    assert result["driver"] == "bwrap"
    assert result["run_id"] == lines[0]["run_id"]
    assert result["started_at"].endswith("Z") and result["finished_at"].endswith("Z")
    assert isinstance(result["duration_ms"], int)
    streamed = "".join(line["data"] for line in lines if line["type"] == "stdout")
    assert streamed == "hello\n"
    await assert_clean(vmhost, before)


async def test_bash_and_javascript(vmhost: Vmhost) -> None:
    _, result = await vmhost.run(language="bash", code="echo bash $((6*7)); echo err >&2; exit 5")
    assert (result["stdout"], result["stderr"], result["exit_code"]) == ("bash 42\n", "err\n", 5)
    if not vmhost.driver.languages()["javascript"]:
        print("node is not installed: javascript run skipped")
        return
    js = "console.log('js', 6*7); console.error('e'); process.exit(2)"
    _, result = await vmhost.run(language="javascript", code=js)
    assert (result["stdout"], result["stderr"], result["exit_code"]) == ("js 42\n", "e\n", 2)


async def test_command_and_env(vmhost: Vmhost) -> None:
    _, result = await vmhost.run(
        command=["sh", "-c", 'echo "$GREETING $HOME $(pwd) $(id -u)"'], env={"GREETING": "hi"}
    )
    assert result["stdout"] == "hi /home/user /home/user 65534\n"
    assert result["exit_code"] == 0
    _, missing = await vmhost.run(command=["no-such-binary-here"])
    assert missing["exit_code"] == 127
    assert "no-such-binary-here" in missing["stderr"]


async def test_stdin_and_files(vmhost: Vmhost) -> None:
    files = [
        {"path": "data/input.txt", "content": "from a file", "encoding": "utf8"},
        {"path": "/home/user/bin.dat", "content": base64.b64encode(b"\x00\x01\xff").decode(),
         "encoding": "base64"},
    ]  # fmt: skip
    code = (
        "import sys\n"
        "print(sys.stdin.read().upper())\n"
        "print(open('data/input.txt').read())\n"
        "print(list(open('/home/user/bin.dat', 'rb').read()))\n"
    )
    _, result = await vmhost.run(language="python", code=code, stdin="some input", files=files)
    assert result["stdout"] == "SOME INPUT\nfrom a file\n[0, 1, 255]\n"


async def test_large_stdin_is_streamed_in_chunks(vmhost: Vmhost) -> None:
    data = "x" * (3 * 1024 * 1024 + 17)
    code = "import sys\nprint(len(sys.stdin.read()))"
    _, result = await vmhost.run(language="python", code=code, stdin=data)
    assert result["stdout"] == f"{len(data)}\n"


async def test_output_streams_before_the_run_ends(vmhost: Vmhost) -> None:
    code = "import time\nprint('first', flush=True)\ntime.sleep(3)\nprint('second')\n"
    body = vmhost.body(language="python", code=code)
    async with vmhost.session.post(f"{vmhost.url}/v1/runs", json=body) as resp:
        arrivals = []
        async for raw in resp.content:
            arrivals.append((time.monotonic(), json.loads(raw)))
    assert arrivals and arrivals[-1][1]["type"] == "result", arrivals
    assert arrivals[-1][1]["stdout"] == "first\nsecond\n", arrivals[-1][1]
    chunks = [(t, line) for t, line in arrivals if line["type"] == "stdout"]
    first = next((t for t, line in chunks if line["data"].startswith("first")), None)
    assert first is not None, f"no stdout chunk starts with 'first': {chunks}"
    end = arrivals[-1][0]
    assert end - first >= 2.0, "the first chunk must arrive while the job is still running"


async def test_output_cap_sets_truncated_and_keeps_running(vmhost: Vmhost) -> None:
    code = (
        "import sys\n"
        "for i in range(3000):\n"
        "    sys.stdout.write('y' * 1000)\n"
        "sys.stderr.write('short')\n"
        "sys.stdout.flush()\n"
        "open('done', 'w').write('ok')\n"
        "sys.exit(7)\n"
    )
    lines, result = await vmhost.run(language="python", code=code, max_output_bytes=5000)
    assert result["stdout"] == "y" * 5000
    assert result["stdout_truncated"] is True
    assert result["stderr"] == "short"
    assert result["stderr_truncated"] is False
    assert result["exit_code"] == 7, "the process keeps running past the cap"
    assert result["termination_reason"] == "exit"
    streamed = "".join(line["data"] for line in lines if line["type"] == "stdout")
    assert streamed == "y" * 5000


async def test_utf8_split_across_chunks_is_decoded(vmhost: Vmhost) -> None:
    code = (
        "import os, time\n"
        "data = 'é€'.encode()\n"
        "os.write(1, data[:1]); time.sleep(0.2); os.write(1, data[1:])\n"
    )
    _, result = await vmhost.run(language="python", code=code)
    assert result["stdout"] == "é€"
