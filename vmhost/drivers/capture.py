"""Host-side output capture: the per-stream byte cap, truncation flags and UTF-8 decoding."""

from __future__ import annotations

import codecs


class StreamCapture:
    """Keeps at most ``cap`` bytes of one stream; the rest is counted and discarded."""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.data = bytearray()
        self.truncated = False
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, chunk: bytes) -> str:
        """Accept a chunk; returns the newly decodable text within the cap ('' if none)."""
        room = self.cap - len(self.data)
        if len(chunk) > room:
            self.truncated = True
            chunk = chunk[: max(room, 0)]
        if not chunk:
            return ""
        self.data += chunk
        return self._decoder.decode(chunk)

    def text(self) -> str:
        return self.data.decode("utf-8", errors="replace")


class OutputCapture:
    """stdout and stderr of one run."""

    def __init__(self, cap: int) -> None:
        self.streams = {"stdout": StreamCapture(cap), "stderr": StreamCapture(cap)}

    def feed(self, stream: str, chunk: bytes) -> str:
        return self.streams[stream].feed(chunk)

    @property
    def stdout(self) -> StreamCapture:
        return self.streams["stdout"]

    @property
    def stderr(self) -> StreamCapture:
        return self.streams["stderr"]
