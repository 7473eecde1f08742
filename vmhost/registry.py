"""The runs a vmhost is serving right now: run_id uniqueness, concurrency cap, cancel."""

from __future__ import annotations

import asyncio

from vmhost.errors import Busy, RunExists


class RunRegistry:
    def __init__(self, max_runs: int) -> None:
        self.max_runs = max_runs
        self._runs: dict[str, asyncio.Event] = {}

    def __len__(self) -> int:
        return len(self._runs)

    def reserve(self, run_id: str) -> asyncio.Event:
        """Claim ``run_id``; the returned event is set when the run is canceled."""
        if run_id in self._runs:
            raise RunExists(f"run {run_id!r} is already running")
        if len(self._runs) >= self.max_runs:
            raise Busy(f"this vmhost is running its maximum of {self.max_runs} runs")
        event = asyncio.Event()
        self._runs[run_id] = event
        return event

    def release(self, run_id: str) -> None:
        self._runs.pop(run_id, None)

    def cancel(self, run_id: str) -> bool:
        event = self._runs.get(run_id)
        if event is None:
            return False
        event.set()
        return True

    def cancel_all(self) -> None:
        for event in self._runs.values():
            event.set()
