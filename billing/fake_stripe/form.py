"""Decode Stripe's ``application/x-www-form-urlencoded`` bodies with bracketed keys.

Stripe's v1 API takes Rack-style nested parameters::

    payload[stripe_customer_id]=cus_1&payload[value]=42   -> {"payload": {...}}
    expand[]=a&expand[]=b                                   -> {"expand": ["a", "b"]}
    expand[0]=a&expand[1]=b                                 -> {"expand": ["a", "b"]}  (the SDK)
    items[0][price]=p&items[0][quantity]=2                  -> {"items": [{"price": "p", ...}]}

A hash whose keys are exactly ``0..n-1`` becomes a list, except directly under a free-form
hash (``metadata``, ``payload``), whose keys are the caller's own names. A repeated plain key
keeps the last value. ``[]`` may only end a key. Every leaf is a string.
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import parse_qsl

FREE_FORM = frozenset({"metadata", "payload"})

_SEGMENT = re.compile(r"\[([^\[\]]*)\]")


class FormDecodeError(ValueError):
    """A key that cannot be decoded; ``param`` names the offending key."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


def split_key(key: str) -> list[str]:
    """``a[b][]`` -> ``["a", "b", ""]``; malformed brackets raise FormDecodeError."""
    start = key.find("[")
    if start == -1:
        if "]" in key:
            raise FormDecodeError(f"Invalid parameter name: {key}", key)
        return [key]
    if start == 0:
        raise FormDecodeError(f"Invalid parameter name: {key}", key)
    segments = [key[:start]]
    pos = start
    while pos < len(key):
        match = _SEGMENT.match(key, pos)
        if match is None:
            raise FormDecodeError(f"Invalid parameter name: {key}", key)
        segments.append(match.group(1))
        pos = match.end()
    if "" in segments[1:-1]:
        raise FormDecodeError(f"Invalid parameter name: {key} ([] must end a key)", key)
    return segments


def _insert(root: dict[str, Any], key: str, segments: list[str], value: str) -> None:
    node: dict[str, Any] = root
    for depth, segment in enumerate(segments[:-1]):
        following = segments[depth + 1]
        if following == "":
            existing = node.setdefault(segment, [])
            if not isinstance(existing, list):
                raise FormDecodeError(f"Invalid array: {key}", key)
            existing.append(value)
            return
        child = node.setdefault(segment, {})
        if not isinstance(child, dict):
            raise FormDecodeError(f"Invalid hash: {key}", key)
        node = child
    last = segments[-1]
    if isinstance(node.get(last), dict | list):
        raise FormDecodeError(f"Invalid hash: {key}", key)
    node[last] = value


def _listify(value: Any, parent: str | None) -> Any:
    if isinstance(value, list):
        return [_listify(item, None) for item in value]
    if not isinstance(value, dict):
        return value
    converted = {k: _listify(v, k) for k, v in value.items()}
    if parent in FREE_FORM or not converted:
        return converted
    if all(k.isdigit() for k in converted) and sorted(int(k) for k in converted) == list(
        range(len(converted))
    ):
        return [converted[str(i)] for i in range(len(converted))]
    return converted


def decode_pairs(pairs: list[tuple[str, str]]) -> dict[str, Any]:
    """Nested params from already split ``(key, value)`` pairs, in order."""
    root: dict[str, Any] = {}
    for key, value in pairs:
        _insert(root, key, split_key(key), value)
    return {k: _listify(v, k) for k, v in root.items()}


def decode_form(body: str) -> dict[str, Any]:
    """Nested params from a urlencoded string (a request body or a query string)."""
    return decode_pairs(parse_qsl(body, keep_blank_values=True, strict_parsing=False))
