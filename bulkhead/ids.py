"""Prefixed, time-sortable identifiers (``job_…``, ``key_…``, ``msg_…``).

An id is the prefix, 12 hex digits of milliseconds since the epoch and 12 random hex digits,
so ids sort by creation time and make a stable pagination cursor.
"""

from __future__ import annotations

import secrets
import time


def new_id(prefix: str) -> str:
    millis = int(time.time() * 1000)
    return f"{prefix}_{millis:012x}{secrets.token_hex(6)}"
