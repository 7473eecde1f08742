"""Host side of the guest-agent protocol (see PROTOCOL.md): framing and frame validation.

Everything that arrives from the guest is untrusted: frames are size-checked, parsed, and
checked against the schema below before any field is used.
"""

from __future__ import annotations

import base64
import binascii
import json
import struct
from collections.abc import Mapping
from typing import Any

from vmhost.errors import ProtocolError

PROTOCOL_VERSION = 1
MAX_FRAME_BYTES = 16 * 1024 * 1024
HEADER = struct.Struct(">I")

_NONE = type(None)
# Guest -> host frame types: field -> (required, allowed types). "v" and "type" are implied.
GUEST_FRAMES: dict[str, dict[str, tuple[bool, tuple[type, ...]]]] = {
    "hello": {
        "agent_version": (True, (str,)),
        "capabilities": (True, (list,)),
        "pid": (False, (int,)),
    },
    "started": {"id": (True, (str,)), "pid": (True, (int, _NONE))},
    "stdout": {"id": (True, (str,)), "data": (True, (str,))},
    "stderr": {"id": (True, (str,)), "data": (True, (str,))},
    "exit": {
        "id": (True, (str,)),
        "exit_code": (True, (int, _NONE)),
        "signal": (True, (int, _NONE)),
    },
    "ok": {
        "id": (True, (str,)),
        "data": (False, (str,)),
        "eof": (False, (bool,)),
        "entries": (False, (list,)),
        "stat": (False, (dict,)),
    },
    "error": {
        "id": (True, (str, _NONE)),
        "code": (True, (str,)),
        "message": (True, (str,)),
    },
}


def encode_frame(frame: Mapping[str, Any]) -> bytes:
    """Serialize one host -> guest frame (adds ``"v"``)."""
    body = json.dumps({"v": PROTOCOL_VERSION, **frame}, separators=(",", ":")).encode()
    if len(body) > MAX_FRAME_BYTES:
        raise ProtocolError(f"frame of {len(body)} bytes exceeds {MAX_FRAME_BYTES}")
    return HEADER.pack(len(body)) + body


def frame_length(header: bytes) -> int:
    (length,) = HEADER.unpack(header)
    if length > MAX_FRAME_BYTES:
        raise ProtocolError(f"guest sent a frame of {length} bytes (max {MAX_FRAME_BYTES})")
    return int(length)


def decode_frame(payload: bytes) -> dict[str, Any]:
    """Parse and validate one guest -> host frame."""
    try:
        frame = json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise ProtocolError(f"guest sent invalid JSON: {exc}") from exc
    if not isinstance(frame, dict):
        raise ProtocolError("guest frame is not a JSON object")
    version = frame.get("v")
    if type(version) is not int or version != PROTOCOL_VERSION:
        raise ProtocolError(f"guest speaks protocol version {version!r}, expected 1")
    kind = frame.get("type")
    schema = GUEST_FRAMES.get(kind) if isinstance(kind, str) else None
    if schema is None:
        raise ProtocolError(f"guest sent unknown frame type {kind!r}")
    for key, value in frame.items():
        if key in ("v", "type"):
            continue
        spec = schema.get(key)
        if spec is None:
            raise ProtocolError(f"guest frame {kind!r} has unknown field {key!r}")
        if type(value) not in spec[1]:
            raise ProtocolError(f"guest frame {kind!r} field {key!r} has the wrong type")
    for key, (required, _types) in schema.items():
        if required and key not in frame:
            raise ProtocolError(f"guest frame {kind!r} lacks field {key!r}")
    return frame


def b64decode(text: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ProtocolError(f"guest sent invalid base64: {exc}") from exc


def b64encode(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")
