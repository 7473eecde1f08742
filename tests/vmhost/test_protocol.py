"""The guest agent speaking the framed protocol over plain pipes (no bwrap)."""

from __future__ import annotations

import base64
import json
import os
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from vmhost.guest import protocol

AGENT = Path(__file__).resolve().parents[2] / "vmhost" / "guest" / "agent.py"
PYTHON = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable


class AgentPipe:
    def __init__(self, tmp_path: Path) -> None:
        self.proc = subprocess.Popen(
            [PYTHON, "-I", "-S", "-B", str(AGENT)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            cwd=tmp_path,
        )

    def send(self, frame: dict[str, Any]) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(protocol.encode_frame(frame))
        self.proc.stdin.flush()

    def send_raw(self, payload: bytes) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(struct.pack(">I", len(payload)) + payload)
        self.proc.stdin.flush()

    def recv(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        header = self.proc.stdout.read(4)
        assert len(header) == 4, "agent closed the stream"
        return protocol.decode_frame(self.proc.stdout.read(protocol.frame_length(header)))

    def until(self, kind: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        seen = []
        while True:
            frame = self.recv()
            seen.append(frame)
            if frame["type"] == kind:
                return frame, seen

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                stream.close()


@pytest.fixture
def agent(tmp_path: Path) -> Any:
    pipe = AgentPipe(tmp_path)
    yield pipe
    pipe.close()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def test_hello_then_exec_streams_and_exits(agent: AgentPipe) -> None:
    hello = agent.recv()
    assert hello["type"] == "hello" and hello["v"] == 1
    assert "exec" in hello["capabilities"] and isinstance(hello["agent_version"], str)
    code = "import sys; print(sys.stdin.read()[::-1]); print('e', file=sys.stderr); sys.exit(4)"
    agent.send({"type": "exec", "id": "1", "argv": [PYTHON, "-c", code], "cwd": None,
                "env": {"PATH": "/usr/bin:/bin"}, "stdin": b64(b"abc"),
                "max_output_bytes": 100})  # fmt: skip
    exit_frame, frames = agent.until("exit")
    out = b"".join(base64.b64decode(f["data"]) for f in frames if f["type"] == "stdout")
    err = b"".join(base64.b64decode(f["data"]) for f in frames if f["type"] == "stderr")
    assert frames[0]["type"] == "started" and isinstance(frames[0]["pid"], int)
    assert (out, err) == (b"cba\n", b"e\n")
    assert (exit_frame["exit_code"], exit_frame["signal"]) == (4, None)


def test_oom_score_adj_of_user_process(agent: AgentPipe) -> None:
    agent.recv()
    agent.send({"type": "exec", "id": "1", "argv": ["cat", "/proc/self/oom_score_adj"]})
    _, frames = agent.until("exit")
    out = b"".join(base64.b64decode(f["data"]) for f in frames if f["type"] == "stdout")
    assert out.strip() == b"1000"


def test_interactive_stdin_signal_and_output_budget(agent: AgentPipe) -> None:
    agent.recv()
    agent.send({"type": "exec", "id": "cat", "argv": ["cat"], "stdin_open": True,
                "max_output_bytes": 4})  # fmt: skip
    assert agent.recv()["type"] == "started"
    agent.send({"type": "stdin", "id": "cat", "data": b64(b"0123456789"), "eof": False})
    frame = agent.recv()
    assert frame["type"] == "stdout"
    assert base64.b64decode(frame["data"]) == b"01234", "budget is max_output_bytes + 1"
    agent.send({"type": "signal", "id": "cat", "signal": 15})
    exit_frame, _ = agent.until("exit")
    assert exit_frame["exit_code"] is None and exit_frame["signal"] == 15


def test_file_operations(agent: AgentPipe, tmp_path: Path) -> None:
    agent.recv()
    requests: list[dict[str, Any]] = [
        {"type": "mkdir", "id": "1", "path": "sub/dir", "parents": True},
        {"type": "write_file", "id": "2", "path": "sub/dir/f.txt", "data": b64(b"hi"),
         "mode": 0o600},
        {"type": "read_file", "id": "3", "path": "sub/dir/f.txt"},
        {"type": "stat", "id": "4", "path": "sub/dir/f.txt"},
        {"type": "list_dir", "id": "5", "path": "sub/dir"},
        {"type": "remove", "id": "6", "path": "sub", "recursive": True},
        {"type": "stat", "id": "7", "path": "sub"},
    ]  # fmt: skip
    replies = {}
    for request in requests:
        agent.send(request)
        reply = agent.recv()
        replies[reply["id"]] = reply
    assert replies["1"]["type"] == "ok"
    assert base64.b64decode(replies["3"]["data"]) == b"hi"
    assert replies["4"]["stat"]["type"] == "file" and replies["4"]["stat"]["mode"] == 0o600
    assert [e["name"] for e in replies["5"]["entries"]] == ["f.txt"]
    assert replies["6"]["type"] == "ok"
    assert replies["7"]["type"] == "error" and replies["7"]["code"] == "not_found"
    assert not (tmp_path / "sub").exists()


@pytest.mark.parametrize(
    ("payload", "code"),
    [
        (b"not json", "invalid_frame"),
        (b"[1, 2]", "invalid_frame"),
        (json.dumps({"v": 2, "type": "stat", "id": "1", "path": "."}).encode(), "version_mismatch"),
        (json.dumps({"v": 1, "type": "dance", "id": "1"}).encode(), "unknown_type"),
        (
            json.dumps({"v": 1, "type": "stat", "id": "1", "path": ".", "x": 1}).encode(),
            "unknown_field",
        ),
        (json.dumps({"v": 1, "type": "exec", "id": "1", "argv": "ls"}).encode(), "invalid_field"),
    ],
)
def test_bad_frames_get_error_frames(agent: AgentPipe, payload: bytes, code: str) -> None:
    agent.recv()
    agent.send_raw(payload)
    reply = agent.recv()
    assert reply["type"] == "error" and reply["code"] == code
    agent.send({"type": "stat", "id": "after", "path": "."})
    assert agent.recv()["type"] == "ok", "the agent keeps serving after a bad frame"


def test_shutdown_ends_the_agent(agent: AgentPipe) -> None:
    agent.recv()
    agent.send({"type": "exec", "id": "bg", "argv": ["sleep", "1000"]})
    assert agent.recv()["type"] == "started"
    agent.send({"type": "shutdown", "id": "s"})
    assert agent.until("ok")[0]["id"] == "s"
    assert agent.proc.wait(timeout=10) == 0


def test_host_rejects_bad_guest_frames() -> None:
    from vmhost.errors import ProtocolError

    for frame in ({"v": 1, "type": "exit", "id": "1", "exit_code": 0},
                  {"v": 1, "type": "stdout", "id": "1", "data": "", "extra": 1},
                  {"v": 2, "type": "hello", "agent_version": "x", "capabilities": []}):  # fmt: skip
        with pytest.raises(ProtocolError):
            protocol.decode_frame(json.dumps(frame).encode())
    with pytest.raises(ProtocolError):
        protocol.frame_length(struct.pack(">I", protocol.MAX_FRAME_BYTES + 1))
